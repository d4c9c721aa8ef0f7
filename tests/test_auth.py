"""Accounts without the UI: Argon2 hashes, login, the rate limit, roles, session tokens,
and the ``users`` command line. Real hashing and a real SQLite database throughout."""
from __future__ import annotations

import io
import os
import stat
from datetime import timedelta

import pytest

from db import auth, session_scope, utcnow
from db import queries as q
from db import users as qu


def test_password_is_stored_as_an_argon2id_hash_and_verified():
    h = auth.hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert auth.verify_password(h, "correct horse")
    assert not auth.verify_password(h, "correct hors")
    assert not auth.verify_password("not a hash", "correct horse")
    with pytest.raises(ValueError, match="at least 8 characters"):
        auth.hash_password("short")


def test_create_user_validates_and_stores_only_the_hash():
    acc = auth.create_user("alice", "s3cret-pass", "admin")
    assert acc == auth.Account("alice", "admin")
    with session_scope() as s:
        u = qu.get_user(s, "alice")
        assert u.password_hash.startswith("$argon2id$") and not u.disabled and u.created_at.tzinfo
    with pytest.raises(ValueError, match="already exists"):
        auth.create_user("alice", "another-pass", "viewer")
    with pytest.raises(ValueError, match="Unknown role"):
        auth.create_user("bob", "s3cret-pass", "root")
    with pytest.raises(ValueError, match="username"):
        auth.create_user("bob smith", "s3cret-pass", "viewer")


def test_authenticate_right_wrong_unknown_and_disabled():
    auth.create_user("alice", "s3cret-pass", "admin")
    auth.create_user("vic", "viewer-pass", "viewer")
    assert auth.authenticate("alice", "s3cret-pass") == auth.Account("alice", "admin")
    assert auth.authenticate(" vic ", "viewer-pass").role == "viewer"
    messages = set()
    for name, pw in (("alice", "wrong-pass"), ("nobody", "s3cret-pass"), ("alice", "")):
        with pytest.raises(auth.LoginError) as e:
            auth.authenticate(name, pw)
        messages.add(str(e.value))
    assert len(messages) == 1, "the message never tells which part was wrong"
    auth.set_disabled("vic")
    with pytest.raises(auth.LoginError):
        auth.authenticate("vic", "viewer-pass")
    auth.set_disabled("vic", False)
    assert auth.authenticate("vic", "viewer-pass").username == "vic"
    auth.set_password("vic", "new-viewer-pass")
    with pytest.raises(auth.LoginError):
        auth.authenticate("vic", "viewer-pass")
    assert auth.authenticate("vic", "new-viewer-pass").username == "vic"


def test_five_failures_lock_a_username_for_15_minutes_then_unlock(caplog):
    auth.create_user("alice", "s3cret-pass", "admin")
    t0 = utcnow()
    for i in range(auth.MAX_FAILURES_USER):
        with pytest.raises(auth.LoginError) as e:
            auth.authenticate("alice", "guess", client="10.0.0.7", now=t0 + timedelta(seconds=i))
        assert not isinstance(e.value, auth.LockedOut)
    # locked: even the right password is refused, and the message says for how long
    with pytest.raises(auth.LockedOut) as e:
        auth.authenticate("alice", "s3cret-pass", client="10.0.0.8", now=t0 + timedelta(seconds=10))
    assert 880 < e.value.seconds <= 900 and "try again in 15 minutes" in str(e.value)
    assert "failed login (wrong password): user 'alice' from 10.0.0.7" in caplog.text
    # other users are not locked
    auth.create_user("bob", "bobs-password", "viewer")
    assert auth.authenticate("bob", "bobs-password", client="10.0.0.8", now=t0 + timedelta(seconds=11)).username == "bob"
    # the oldest failure ages out after the window: unlocked, and a success clears the count
    later = t0 + timedelta(seconds=auth.WINDOW_S + 1)
    assert auth.authenticate("alice", "s3cret-pass", now=later).username == "alice"
    with session_scope() as s:
        assert qu.recent_login_failures(s, t0 - timedelta(seconds=1), 10, username="alice") == []


def test_one_client_guessing_many_usernames_is_locked_too():
    auth.create_user("alice", "s3cret-pass", "admin")
    t0 = utcnow()
    with pytest.raises(auth.LoginError):
        auth.authenticate("user0", "guess", client="203.0.113.5", now=t0)
    with session_scope() as s:  # the other failures as rows (each real one costs an Argon2 check)
        for i in range(1, auth.MAX_FAILURES_CLIENT):
            qu.add_login_failure(s, f"user{i}", "203.0.113.5", at=t0)
    with pytest.raises(auth.LockedOut):
        auth.authenticate("alice", "s3cret-pass", client="203.0.113.5", now=t0 + timedelta(seconds=1))
    # another address, and local visitors (no address), are not affected
    assert auth.authenticate("alice", "s3cret-pass", client="203.0.113.6", now=t0 + timedelta(seconds=2))
    assert auth.authenticate("alice", "s3cret-pass", client=None, now=t0 + timedelta(seconds=3))


def test_roles_matrix():
    expected = {
        "viewer": {"view"},
        "labeller": {"view", "label", "train", "cancel", "export", "score", "upload", "create_project"},
        "admin": set(auth.ACTIONS),
    }
    for role, allowed in expected.items():
        assert {a for a in auth.ACTIONS if auth.can(role, a)} == allowed, role
    assert not any(auth.can(None, a) for a in auth.ACTIONS)
    assert not any(auth.can("none", a) for a in auth.ACTIONS)
    with pytest.raises(auth.NotAllowed, match=r"Your role \(labeller\) cannot delete projects\."):
        auth.require(auth.Account("lea", "labeller"), "delete_project")
    auth.require(auth.Account("al", "admin"), "delete_project")
    with pytest.raises(ValueError):
        auth.can("admin", "fly")


def test_the_last_active_admin_stays_an_admin():
    auth.create_user("alice", "s3cret-pass", "admin")
    for change in (lambda: auth.set_role("alice", "viewer"), lambda: auth.set_disabled("alice")):
        with pytest.raises(ValueError, match="last active admin"):
            change()
    auth.create_user("root2", "s3cret-pass", "admin")
    auth.set_role("alice", "viewer")
    assert [(a["username"], a["role"]) for a in auth.list_accounts()] == [("alice", "viewer"), ("root2", "admin")]


def test_session_token_is_signed_expires_and_dies_with_the_password():
    from db import data_dir

    auth.create_user("alice", "s3cret-pass", "labeller")
    token = auth.issue_token("alice")
    assert auth.account_from_token(token) == auth.Account("alice", "labeller")
    key = data_dir() / "session.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(key.read_text()) >= 48
    assert auth.account_from_token(token[:-2] + ("AA" if token[-2:] != "AA" else "BB")) is None
    assert auth.account_from_token(token, max_age_s=-1) is None  # expired
    assert auth.account_from_token("") is None
    auth.set_role("alice", "viewer")  # a role change follows the account, the token stays valid
    assert auth.account_from_token(token).role == "viewer"
    auth.set_password("alice", "changed-pass")
    assert auth.account_from_token(token) is None
    token = auth.issue_token("alice")
    auth.create_user("root", "s3cret-pass", "admin")
    auth.set_disabled("alice")
    assert auth.account_from_token(token) is None


# --- command line ---------------------------------------------------------------------------


def cli(monkeypatch, capsys, *argv, stdin=""):
    from osad_core.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_users_add_list_set_role_passwd_disable(monkeypatch, capsys):
    rc, out, _ = cli(monkeypatch, capsys, "users", "list")
    assert rc == 0 and "no accounts yet" in out
    rc, out, _ = cli(monkeypatch, capsys, "users", "add", "alice", "--role", "admin", "--password-stdin",
                     stdin="s3cret-pass\n")
    assert (rc, out.strip()) == (0, "added alice (admin)")
    assert auth.authenticate("alice", "s3cret-pass").role == "admin"  # the newline is not part of it
    rc, _, err = cli(monkeypatch, capsys, "users", "add", "bob", "--role", "viewer", "--password-stdin",
                     stdin="short\n")
    assert rc == 2 and err.strip() == "error: A password needs at least 8 characters."
    rc, _, err = cli(monkeypatch, capsys, "users", "add", "bob", "--role", "viewer")  # no terminal, no stdin flag
    assert rc == 2 and "--password-stdin" in err
    assert cli(monkeypatch, capsys, "users", "add", "bob", "--role", "viewer", "--password-stdin",
               stdin="bobs-password\n")[0] == 0
    assert cli(monkeypatch, capsys, "users", "set-role", "bob", "labeller")[0] == 0
    assert cli(monkeypatch, capsys, "users", "passwd", "bob", "--password-stdin", stdin="bobs-new-pass\n")[0] == 0
    assert cli(monkeypatch, capsys, "users", "disable", "bob")[0] == 0
    rc, out, _ = cli(monkeypatch, capsys, "users", "list")
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    assert lines[0].split()[:3] == ["alice", "admin", "active"]
    assert lines[1].split()[:3] == ["bob", "labeller", "disabled"]
    rc, _, err = cli(monkeypatch, capsys, "users", "disable", "alice")
    assert rc == 2 and "last active admin" in err
    rc, _, err = cli(monkeypatch, capsys, "users", "passwd", "nobody", "--password-stdin", stdin="whatever-pass\n")
    assert rc == 2 and "no user named 'nobody'" in err


# --- schema -----------------------------------------------------------------------------------


def test_accounts_migration_upgrades_a_database_with_runs_and_downgrades(tmp_path):
    from alembic import command
    from sqlalchemy import inspect, text

    import db
    from db import engine as db_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    with engine.begin() as conn:
        command.upgrade(db_engine.alembic_config(url, connection=conn), "0001")
        conn.execute(text("INSERT INTO projects (id, name, description, source, created_at) "
                          "VALUES (1, 'p', '', 'cli', '2025-01-01 00:00:00')"))
        conn.execute(text("INSERT INTO runs (id, project_id, method, config_json, protocol_json, status, source, "
                          "created_at) VALUES (7, 1, 'dra', '{}', '{}', 'done', 'cli', '2025-01-01 00:00:00')"))
    engine.dispose()
    db.init_db(url)  # the app's own upgrade path
    with db.session_scope(url) as s:
        run = q.get_run(s, 7)
        assert run.method == "dra" and run.created_by is None
    auth.create_user("alice", "s3cret-pass", "admin", url=url)
    engine = db.get_engine(url)
    with engine.begin() as conn:
        command.downgrade(db_engine.alembic_config(url, connection=conn), "0001")
    tables = set(inspect(engine).get_table_names())
    assert "users" not in tables and "login_failures" not in tables
    assert "created_by" not in {c["name"] for c in inspect(engine).get_columns("runs")}
