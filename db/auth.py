"""Accounts without any UI: password hashing, login with a rate limit, roles, and
signed session tokens. The app (``ui/auth.py``), the CLI (``users`` commands) and
the tests share this module; it imports neither Streamlit nor ``osad_core``.

- Passwords: Argon2id through ``argon2-cffi`` (its RFC 9106 defaults); only the hash is
  stored. A hash made with older parameters is replaced at the next login.
- Rate limit: failed logins are rows in the database, so every app process sees the
  same count. ``MAX_FAILURES_USER`` failures for one username, or
  ``MAX_FAILURES_CLIENT`` from one client address (higher: several people behind one
  address must not lock each other out with typos), within ``WINDOW_S`` lock further
  attempts until the oldest of them ages out. A locked login is refused before the
  password is checked.
- Session tokens: ``itsdangerous`` signs ``{user, password fingerprint}`` with a secret
  made on first use (``<data dir>/session.key``, mode 0600). A token expires after
  ``SESSION_MAX_AGE_S`` and stops working when the password changes or the account is
  disabled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from . import users as qu
from .engine import data_dir, init_db, session_scope
from .models import ROLES, User, utcnow

log = logging.getLogger("osad.auth")

MAX_FAILURES_USER = 5
MAX_FAILURES_CLIENT = 20
WINDOW_S = 15 * 60
SESSION_MAX_AGE_S = 12 * 3600  # one working shift
MIN_PASSWORD_LENGTH = 8
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

# What each role may do; a role may also do everything of the roles below it.
RANK = {"viewer": 0, "labeller": 1, "admin": 2}
ACTIONS = {
    "view": "viewer",
    "label": "labeller",
    "train": "labeller",
    "cancel": "labeller",
    "export": "labeller",
    "score": "labeller",
    "upload": "labeller",
    "create_project": "labeller",
    "delete_project": "admin",
    "import_folder": "admin",
    "manage_users": "admin",
}

_hasher = PasswordHasher()
_dummy: list[str] = []


def _dummy_hash() -> str:
    """Verified against when the username is unknown, so both cases take the same time."""
    if not _dummy:
        _dummy.append(_hasher.hash(secrets.token_hex(16)))
    return _dummy[0]


class LoginError(Exception):
    """A refused login; the message is safe to show (it never says which part was wrong)."""


class NotAllowed(ValueError):
    """An action the user's role does not allow. A ``ValueError`` so that every page's
    existing "bad input → one sentence" handling shows it the same way."""


ACTION_TEXT = {
    "view": "see this", "label": "change labels", "train": "start training", "cancel": "cancel jobs",
    "export": "export scores or models", "score": "score new images", "upload": "upload images",
    "create_project": "create projects", "delete_project": "delete projects",
    "import_folder": "import folders from the server", "manage_users": "manage users",
}


def require(account: "Account | None", action: str) -> None:
    """Raise :class:`NotAllowed` unless ``account`` may perform ``action``."""
    if account is None or not account.can(action):
        who = f"Your role ({account.role})" if account is not None else "Logged-out visitors"
        raise NotAllowed(f"{who} cannot {ACTION_TEXT[action]}.")


class LockedOut(LoginError):
    def __init__(self, seconds: float):
        self.seconds = max(1.0, float(seconds))
        minutes = max(1, round(self.seconds / 60))
        super().__init__(f"Too many failed logins: try again in {minutes} minute{'s' if minutes != 1 else ''}.")


@dataclass(frozen=True)
class Account:
    """What the app keeps of a logged-in user (no hash)."""

    username: str
    role: str

    def can(self, action: str) -> bool:
        return can(self.role, action)


def can(role: str | None, action: str) -> bool:
    """Whether ``role`` may perform ``action`` (one of :data:`ACTIONS`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return role in RANK and RANK[role] >= RANK[ACTIONS[action]]


# --- passwords and users ------------------------------------------------------------


def check_username(username: str) -> str:
    username = (username or "").strip()
    if not USERNAME_RE.match(username):
        raise ValueError("A username has 1 to 64 letters, digits or . _ @ - and starts with a letter or digit.")
    return username


def hash_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD_LENGTH:
        raise ValueError(f"A password needs at least {MIN_PASSWORD_LENGTH} characters.")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password or "")
    except (VerificationError, InvalidHashError):
        return False


def create_user(username: str, password: str, role: str, url: str | None = None) -> Account:
    username = check_username(username)
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}; choose one of {', '.join(ROLES)}.")
    digest = hash_password(password)
    init_db(url)
    with session_scope(url) as s:
        user = qu.add_user(s, username, digest, role)
        return Account(user.username, user.role)


def _keep_an_admin(s, user: User, role: str, disabled: bool) -> None:
    if user.role == "admin" and not user.disabled and (role != "admin" or disabled) \
            and qu.count_active_admins(s) <= 1:
        raise ValueError(f"{user.username} is the last active admin; make another admin first.")


def set_role(username: str, role: str, url: str | None = None) -> None:
    init_db(url)
    with session_scope(url) as s:
        user = qu.require_user(s, username)
        _keep_an_admin(s, user, role, user.disabled)
        qu.update_user(s, username, role=role)


def set_password(username: str, password: str, url: str | None = None) -> None:
    digest = hash_password(password)
    init_db(url)
    with session_scope(url) as s:
        qu.update_user(s, username, password_hash=digest)
        qu.clear_login_failures(s, username)


def set_disabled(username: str, disabled: bool = True, url: str | None = None) -> None:
    init_db(url)
    with session_scope(url) as s:
        user = qu.require_user(s, username)
        _keep_an_admin(s, user, user.role, disabled)
        qu.update_user(s, username, disabled=disabled)


def list_accounts(url: str | None = None) -> list[dict]:
    init_db(url)
    with session_scope(url) as s:
        return [{"username": u.username, "role": u.role, "disabled": u.disabled, "created_at": u.created_at}
                for u in qu.list_users(s)]


def accounts_exist(url: str | None = None) -> bool:
    init_db(url)
    with session_scope(url) as s:
        return qu.count_users(s) > 0


def active_account(username: str, url: str | None = None) -> Account | None:
    """The account as it is now (role changes and disabling act at once), or None."""
    with session_scope(url) as s:
        user = qu.get_user(s, username)
        if user is None or user.disabled:
            return None
        return Account(user.username, user.role)


# --- login --------------------------------------------------------------------------


def _locked_for(times: list[datetime], limit: int, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``times`` (newest first) fall in the window."""
    if len(times) < limit:
        return 0.0
    return (times[limit - 1] + timedelta(seconds=WINDOW_S) - now).total_seconds()


def lockout_seconds(username: str, client: str | None, now: datetime | None = None, url: str | None = None) -> float:
    now = now or utcnow()
    since = now - timedelta(seconds=WINDOW_S)
    with session_scope(url) as s:
        wait = _locked_for(qu.recent_login_failures(s, since, MAX_FAILURES_USER, username=username),
                           MAX_FAILURES_USER, now)
        if client:
            wait = max(wait, _locked_for(qu.recent_login_failures(s, since, MAX_FAILURES_CLIENT, client=client),
                                         MAX_FAILURES_CLIENT, now))
    return wait


def authenticate(username: str, password: str, client: str | None = None, now: datetime | None = None,
                 url: str | None = None) -> Account:
    """The account for a correct username and password, else :class:`LoginError`.

    ``client`` is the visitor's address when known (the per-client limit only applies
    then, so that every local visitor does not share one counter).
    """
    username = (username or "").strip()[:200]
    now = now or utcnow()
    init_db(url)
    wait = lockout_seconds(username, client, now, url)
    if wait > 0:
        log.warning("login refused (locked for %.0f s): user %r from %s", wait, username, client or "local")
        raise LockedOut(wait)
    with session_scope(url) as s:
        user = qu.get_user(s, username)
        ok = verify_password(user.password_hash if user is not None else _dummy_hash(), password)
        if ok and user is not None and not user.disabled:
            qu.clear_login_failures(s, username)
            if _hasher.check_needs_rehash(user.password_hash):
                user.password_hash = _hasher.hash(password)
            log.info("login: user %r (%s) from %s", user.username, user.role, client or "local")
            return Account(user.username, user.role)
        qu.add_login_failure(s, username, client or "local", at=now)
        qu.prune_login_failures(s, now - timedelta(seconds=WINDOW_S))
    why = "disabled account" if ok else ("unknown user" if user is None else "wrong password")
    log.warning("failed login (%s): user %r from %s", why, username, client or "local")
    raise LoginError("Wrong username or password, or the account is disabled.")


# --- session tokens -----------------------------------------------------------------


def _secret_path() -> Path:
    return data_dir() / "session.key"


def session_secret() -> str:
    """The signing secret, made on first use; readable by the owner only."""
    path = _secret_path()
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(session_secret(), salt="osad-session")


def _fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def issue_token(username: str, url: str | None = None) -> str:
    with session_scope(url) as s:
        user = qu.require_user(s, username)
        return _serializer().dumps({"u": user.username, "p": _fingerprint(user.password_hash)})


def account_from_token(token: str | None, max_age_s: float = SESSION_MAX_AGE_S, url: str | None = None) -> Account | None:
    """The account a valid, unexpired token names, or None."""
    if not token:
        return None
    try:
        data = _serializer().loads(token, max_age=max_age_s)
    except BadSignature:  # also covers SignatureExpired
        return None
    if not isinstance(data, dict):
        return None
    with session_scope(url) as s:
        user = qu.get_user(s, str(data.get("u")))
        if user is None or user.disabled or data.get("p") != _fingerprint(user.password_hash):
            return None
        return Account(user.username, user.role)
