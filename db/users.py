"""SQL for accounts and failed logins.

Password hashing, the rate limit and the roles live in :mod:`db.auth`; this module
only reads and writes rows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from .models import ROLES, LoginFailure, User, utcnow


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; choose one of {', '.join(ROLES)}.")


def add_user(s: Session, username: str, password_hash: str, role: str) -> User:
    _check_role(role)
    if get_user(s, username) is not None:
        raise ValueError(f"A user named {username!r} already exists.")
    user = User(username=username, password_hash=password_hash, role=role, disabled=False, created_at=utcnow())
    s.add(user)
    s.flush()
    return user


def get_user(s: Session, username: str) -> User | None:
    return s.scalar(select(User).where(User.username == username))


def require_user(s: Session, username: str) -> User:
    user = get_user(s, username)
    if user is None:
        raise ValueError(f"There is no user named {username!r}.")
    return user


def list_users(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.username)))


def count_users(s: Session) -> int:
    """All accounts, disabled ones included: once any account exists, login is on."""
    return int(s.scalar(select(func.count()).select_from(User)) or 0)


def count_active_admins(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(User)
                        .where(User.role == "admin", User.disabled.is_(False))) or 0)


def update_user(s: Session, username: str, **values) -> User:
    """Set ``role``, ``password_hash`` and/or ``disabled`` of an existing user."""
    unknown = set(values) - {"role", "password_hash", "disabled"}
    if unknown:
        raise TypeError(f"cannot set {', '.join(sorted(unknown))} of a user")
    if "role" in values:
        _check_role(values["role"])
    user = require_user(s, username)
    for key, value in values.items():
        setattr(user, key, value)
    s.flush()
    return user


# --- failed logins ------------------------------------------------------------------


def add_login_failure(s: Session, username: str, client: str, at: datetime | None = None) -> None:
    s.add(LoginFailure(username=username[:200], client=client[:64], created_at=at or utcnow()))
    s.flush()


def recent_login_failures(s: Session, since: datetime, limit: int, username: str | None = None,
                          client: str | None = None) -> list[datetime]:
    """Times of the newest ``limit`` failures after ``since`` for a username or a client."""
    q = select(LoginFailure.created_at).where(LoginFailure.created_at > since)
    if username is not None:
        q = q.where(LoginFailure.username == username)
    if client is not None:
        q = q.where(LoginFailure.client == client)
    return list(s.scalars(q.order_by(LoginFailure.created_at.desc()).limit(limit)))


def clear_login_failures(s: Session, username: str) -> None:
    s.execute(delete(LoginFailure).where(LoginFailure.username == username))


def prune_login_failures(s: Session, before: datetime) -> None:
    """Forget failures too old to count, so the table stays small."""
    s.execute(delete(LoginFailure).where(LoginFailure.created_at < before))


__all__ = ["add_user", "get_user", "require_user", "list_users", "count_users", "count_active_admins",
           "update_user", "add_login_failure", "recent_login_failures", "clear_login_failures",
           "prune_login_failures"]
