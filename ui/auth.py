"""Who is using the app, and what they may do: the login gate, the session cookie and
the one place pages ask for permission (:func:`can`, :func:`require`, :func:`actor`).

Login is on when the server listens beyond loopback, when any account exists, or with
``OSAD_REQUIRE_LOGIN=1``. Otherwise (the single-user default) everybody may do
everything and the sidebar's free-text name goes into the history. Password checks,
the rate limit and the roles matrix are in :mod:`db.auth`, testable without Streamlit.
"""
from __future__ import annotations

import json
import logging
import os

import streamlit as st

from db import auth as core
from db.auth import Account, NotAllowed

log = logging.getLogger("osad.auth")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COOKIE = "osad_session"
_USER = "auth_user"  # session-state key: the logged-in username


def on_network() -> bool:
    """Whether the server listens beyond loopback (unset, 0.0.0.0 and :: all do)."""
    address = str(st.get_option("server.address") or "").strip().strip("[]")
    return address not in LOOPBACK


def login_required() -> bool:
    forced = os.environ.get("OSAD_REQUIRE_LOGIN", "").strip().lower() in ("1", "true", "yes", "on")
    return forced or on_network() or core.accounts_exist()


def _client() -> str | None:
    try:
        ip = st.context.ip_address
    except Exception:  # no browser connection (bare mode)
        return None
    return ip if isinstance(ip, str) and ip else None  # None for local visitors


def current() -> Account | None:
    """The logged-in account, re-read from the database (a role change or a disabled
    account acts at once), or None."""
    name = st.session_state.get(_USER)
    if not name:
        return None
    acc = core.active_account(name)
    if acc is None:
        st.session_state.pop(_USER, None)
    return acc


def actor() -> Account:
    """Who acts now: the logged-in account, or with login off the sidebar's name with
    every permission (the single-user app)."""
    if st.session_state.get("auth_on"):
        acc = current()
        return acc if acc is not None else Account("", "none")
    from . import common

    return Account(common.free_text_name(), "admin")


def can(action: str) -> bool:
    return actor().can(action)


def require(action: str) -> Account:
    """The acting account if it may perform ``action``, else :class:`NotAllowed`.
    Every page action calls this, so a hidden button is never the only guard."""
    acc = actor()
    core.require(acc, action)
    return acc


# --- cookie -------------------------------------------------------------------------


def _cookie_script(value: str, max_age: int) -> None:
    secure = "; Secure" if str(getattr(st.context, "url", "") or "").startswith("https:") else ""
    cookie = f"{COOKIE}={value}; Max-Age={max_age}; Path=/; SameSite=Strict{secure}"
    st.html(f"<script>document.cookie = {json.dumps(cookie)};</script>", unsafe_allow_javascript=True)


def _from_cookie() -> Account | None:
    if st.session_state.get("auth_logged_out"):
        return None  # this browser tab logged out; its connection still carries the old cookie
    try:
        token = st.context.cookies.get(COOKIE)
    except Exception:
        return None
    acc = core.account_from_token(token)
    if acc is not None:
        log.info("session resumed from cookie: user %r from %s", acc.username, _client() or "local")
    return acc


def _logout() -> None:
    name = st.session_state.pop(_USER, None)
    st.session_state["auth_logged_out"] = True
    st.session_state["auth_cookie"] = ""
    log.info("logout: user %r", name)


# --- gate ---------------------------------------------------------------------------


def _first_admin_message() -> None:
    st.title("OSAD Studio")
    why = ("This server listens on the network, so it needs a login" if on_network()
           else "This server requires a login (OSAD_REQUIRE_LOGIN)")
    st.error(f"{why}, and no account exists yet.", icon=":material/lock:")
    st.markdown(
        "Create the first admin on the server, then reload this page:\n\n"
        "```bash\npython -m osad_core users add NAME --role admin\n```\n\n"
        "Or start the app for this machine only (`make run`, which listens on 127.0.0.1).")


def _login_form() -> None:
    st.title("OSAD Studio")
    st.caption("Log in to continue.")
    with st.form("login", width=380):
        username = st.text_input("Username", key="login_user", autocomplete="username")
        password = st.text_input("Password", type="password", key="login_password",
                                 autocomplete="current-password")
        go = st.form_submit_button("Log in", type="primary")
    if go:
        try:
            acc = core.authenticate(username, password, client=_client())
        except core.LoginError as exc:
            st.error(str(exc), icon=":material/lock:")
            return
        st.session_state[_USER] = acc.username
        st.session_state.pop("auth_logged_out", None)
        st.session_state["auth_cookie"] = core.issue_token(acc.username)
        st.rerun()


def gate() -> Account | None:
    """Stop the script run unless the visitor may see the app.

    Returns the logged-in account (None when login is off)."""
    required = login_required()
    st.session_state["auth_on"] = required
    if not required:
        return None
    acc = current()
    if acc is None:
        acc = _from_cookie()
        if acc is not None:
            st.session_state[_USER] = acc.username
    if acc is None:
        if st.session_state.pop("auth_cookie", None) == "":
            _cookie_script("", 0)  # logged out: forget the cookie in this browser
        # The only page a logged-out visitor gets; registering it as the navigation also
        # keeps Streamlit from listing the files in pages/ in the sidebar.
        view = _login_form if core.accounts_exist() else _first_admin_message
        login = st.Page(view, title="Log in", icon=":material/lock:", url_path="login")
        st.navigation([login], position="hidden").run()
        st.stop()
    return acc


def sidebar_box(acc: Account | None) -> None:
    """Who is logged in, their role, and Logout (only when login is on)."""
    if acc is None:
        return
    token = st.session_state.pop("auth_cookie", None)
    if token:
        _cookie_script(token, core.SESSION_MAX_AGE_S)
    c1, c2 = st.columns([3, 2], vertical_alignment="center")
    c1.markdown(f":material/person: **{acc.username}** · {acc.role}")
    c2.button("Log out", key="logout", on_click=_logout)


__all__ = ["Account", "NotAllowed", "actor", "can", "current", "gate", "login_required", "on_network", "require",
           "sidebar_box"]
