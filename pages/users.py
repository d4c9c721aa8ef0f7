"""Users (admins only): add accounts, change roles, reset passwords, disable or enable.

Accounts are never deleted (the label history and runs keep naming them). The same
actions exist on the command line: ``python -m osad_core users ...``.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from db import auth as accounts
from db.models import ROLES
from ui import auth, common

ROLE_HELP = ("admin: everything, including users, server-folder imports and deleting projects · "
             "labeller: label, train, cancel, export · viewer: read only")


def _flash() -> None:
    msg = st.session_state.pop("users_flash", None)
    if msg:
        st.success(msg, icon=":material/check_circle:")


def _done(msg: str) -> None:
    st.session_state["users_flash"] = msg
    st.rerun()


def add_form() -> None:
    with st.form("user_add", clear_on_submit=True):
        st.markdown("**Add a user**")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Username", key="ua_name")
        role = c2.selectbox("Role", ROLES, index=ROLES.index("labeller"), key="ua_role", help=ROLE_HELP)
        password = c3.text_input("Password", type="password", key="ua_password",
                                 help=f"At least {accounts.MIN_PASSWORD_LENGTH} characters.")
        go = st.form_submit_button("Add user", type="primary")
    if go:
        try:
            auth.require("manage_users")
            acc = accounts.create_user(name, password, role)
        except ValueError as exc:
            common.show_error(exc)
        else:
            _done(f"Added {acc.username} ({acc.role}).")


def change_form(names: list[str]) -> None:
    with st.form("user_change"):
        st.markdown("**Change a user**")
        c1, c2, c3 = st.columns(3)
        name = c1.selectbox("User", names, key="uc_name")
        role = c2.selectbox("New role", ["(keep)", *ROLES], key="uc_role", help=ROLE_HELP)
        password = c3.text_input("New password", type="password", key="uc_password",
                                 help="Leave empty to keep the password.")
        state = st.radio("Account", ["(keep)", "enable", "disable"], horizontal=True, key="uc_state")
        go = st.form_submit_button("Apply", type="primary")
    if go:
        done = []
        try:
            auth.require("manage_users")
            if password:
                accounts.set_password(name, password)
                done.append("password reset")
            if role != "(keep)":
                accounts.set_role(name, role)
                done.append(f"role {role}")
            if state != "(keep)":
                accounts.set_disabled(name, state == "disable")
                done.append(f"{state}d")
        except ValueError as exc:
            common.show_error(exc)
            return
        _done(f"{name}: {', '.join(done)}." if done else "Nothing to change.")


def main() -> None:
    st.title("Users")
    if not auth.can("manage_users"):
        st.error("Only admins manage users.", icon=":material/lock:")
        return
    _flash()
    rows = accounts.list_accounts()
    st.caption(ROLE_HELP)
    st.dataframe(pd.DataFrame([{"user": r["username"], "role": r["role"],
                                "state": "disabled" if r["disabled"] else "active",
                                "created": r["created_at"]} for r in rows]),
                 hide_index=True, width="stretch")
    add_form()
    if rows:
        change_form([r["username"] for r in rows])


common.run_page(main)
