"""Login and roles through ``streamlit.testing.v1.AppTest``: what a logged-out visitor,
a viewer, a labeller and an admin see and may do, on a database seeded with one real
tiny run (the fixtures of ``test_app_pages``)."""
from __future__ import annotations

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from db import auth as accounts
from db import session_scope
from db import queries as q
from test_app_pages import REPO, _no_worker, app, click, ok, seeded, seeded_templates, _database, texts  # noqa: F401 (fixtures)

PASSWORDS = {"alice": "admin-pass-1", "lea": "labeller-pass", "vic": "viewer-pass"}


@pytest.fixture
def team():
    """One account per role."""
    for name, role in (("alice", "admin"), ("lea", "labeller"), ("vic", "viewer")):
        accounts.create_user(name, PASSWORDS[name], role)


@pytest.fixture
def network_address():
    """The server as ``make run HOST=0.0.0.0`` starts it."""
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    yield
    st_config.set_option("server.address", before)


def as_user(name: str, page: str | None = None):
    """The app for a user who has logged in (the session remembers the username)."""
    return app(page, auth_user=name)


def button_keys(at) -> set[str]:
    return {b.key for b in at.button if b.key}


def login_form_only(at) -> None:
    assert [t.value for t in at.title] == ["OSAD Studio"]
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    assert [b.label for b in at.button] == ["Log in"]
    assert not at.sidebar.selectbox and not at.selectbox and not at.tabs


def test_network_without_accounts_says_how_to_create_the_first_admin(network_address):
    at = app()
    assert "python -m osad_core users add NAME --role admin" in texts(at)
    assert "This server listens on the network, so it needs a login, and no account exists yet." in texts(at)
    assert not at.text_input and not at.button and not at.sidebar.selectbox and not at.expander


def test_required_login_without_accounts_also_says_how_to_create_the_first_admin(monkeypatch):
    monkeypatch.setenv("OSAD_REQUIRE_LOGIN", "1")
    at = app()
    assert "This server requires a login (OSAD_REQUIRE_LOGIN), and no account exists yet." in texts(at)
    assert not at.text_input and not at.button


def test_logged_out_visitor_sees_only_the_login_form_then_logs_in_and_out(seeded, team):
    at = app()
    login_form_only(at)
    with pytest.raises(ValueError, match=r"Known pages: \['Log in'\]"):
        at.switch_page("pages/label.py")  # no other page is registered for a logged-out visitor
    for page in ("label", "train", "results", "inspect", "users"):  # a page file run on its own draws nothing
        direct = AppTest.from_file(str(REPO / "pages" / f"{page}.py"), default_timeout=90).run()
        ok(direct)
        assert not direct.title and not direct.button and not direct.dataframe, page
    at.text_input(key="login_user").input("alice")
    at.text_input(key="login_password").input("wrong-password")
    click(at, "Log in")
    assert [e.value for e in at.error] == ["Wrong username or password, or the account is disabled."]
    login_form_only(at)
    at.text_input(key="login_password").input(PASSWORDS["alice"])
    click(at, "Log in")
    assert [t.value for t in at.title] == ["Projects"]
    assert any("**alice** · admin" in m.value for m in at.sidebar.markdown)
    assert not [w for w in at.sidebar.text_input if w.key == "user_name"], "no free-text name with login on"
    at.button(key="logout").click().run()
    ok(at)
    login_form_only(at)


def test_failed_logins_lock_the_username_with_a_message_saying_how_long(team):
    at = app()
    for _ in range(accounts.MAX_FAILURES_USER):
        at.text_input(key="login_user").input("vic")
        at.text_input(key="login_password").input("not-the-password")
        click(at, "Log in")
    at.text_input(key="login_password").input(PASSWORDS["vic"])
    click(at, "Log in")
    assert [e.value for e in at.error] == ["Too many failed logins: try again in 15 minutes."]
    login_form_only(at)


def test_a_loopback_app_without_accounts_works_as_before_with_a_free_text_name():
    at = app()
    assert [t.value for t in at.title] == ["Projects"]
    assert at.sidebar.text_input(key="user_name").value
    assert "elpv_demo" in button_keys(at)


def test_viewer_sees_data_but_cannot_label_train_or_export(seeded, team):
    from ui import training

    at = as_user("vic", "label")
    assert at.title[0].value.startswith("Label") and "Read only" in texts(at)
    assert not {"bulk_normal", "bulk_anomaly", "undo", "select_page"} & button_keys(at)
    assert not at.checkbox, "no selection boxes for a viewer"
    at.button(key=f"zoom_{q_first_image(seeded.project_id)}").click().run()
    ok(at)
    assert "kb_prev" in button_keys(at) and "kb_normal" not in button_keys(at)

    at = as_user("vic", "train")
    assert "train_button" not in button_keys(at) and not [b for b in at.button if b.label == "Retrain"]
    assert "Read only" in texts(at)
    at = as_user("vic", "results")
    assert "results_retrain" not in button_keys(at) and at.tabs[0].label == "Curves"
    at = as_user("vic", "inspect")
    assert [t.label for t in at.tabs] == ["Images by score"]
    at = as_user("vic", "projects")
    assert not at.expander and not {k for k in button_keys(at) if k.startswith(("delete_", "train_"))}

    # the actions refuse too, not only the missing buttons
    vic = accounts.Account("vic", "viewer")
    req = training.request_for_run(seeded.run_id)
    for action in (lambda: training.enqueue(req, vic), lambda: training.retrain(seeded.run_id, vic),
                   lambda: training.cancel(1, vic)):
        with pytest.raises(accounts.NotAllowed, match=r"Your role \(viewer\) cannot"):
            action()
    with session_scope() as s:
        assert q.list_jobs(s) == []


def q_first_image(project_id: int) -> int:
    with session_scope() as s:
        return min(im.id for im in q.get_images(s, project_id))


def test_a_refused_action_shows_one_sentence_when_called_anyway(seeded, team):
    """A viewer's session whose state still asks for a label change (as a stale browser
    tab would) gets the refusal, and nothing changes."""
    def script():
        import streamlit as st

        from ui import auth, common

        st.session_state["auth_on"] = True
        try:
            auth.require("label")
        except ValueError as exc:
            common.show_error(exc)
        else:
            st.success("allowed")

    at = AppTest.from_function(script)
    at.session_state["auth_user"] = "vic"
    at.run()
    assert [e.value for e in at.error] == ["Your role (viewer) cannot change labels."]
    at.session_state["auth_user"] = "lea"
    at.run()
    assert not at.error and at.success[0].value == "allowed"


def test_labeller_labels_and_trains_under_their_name_but_cannot_delete_or_import(seeded, team):
    at = as_user("lea", "projects")
    assert not {k for k in button_keys(at) if k.startswith("delete_")}
    assert [t.label for t in at.tabs] == ["Upload images or a zip", "ELPV demo"]
    assert not [w for w in at.text_input if w.key == "folder_path"]

    at = as_user("lea", "label")
    image_id = q_first_image(seeded.project_id)
    at.checkbox(key=f"tick_0_{image_id}").check().run()
    at.button(key="bulk_normal").click().run()
    ok(at)
    with session_scope() as s:
        assert q.label_history(s, project_id=seeded.project_id, limit=1)[0]["author"] == "lea"

    at = as_user("lea", "train")
    at.button(key="train_button").click().run()
    ok(at)
    with session_scope() as s:
        (job,) = q.list_jobs(s, "queued")
        assert job.created_by == "lea" and q.get_run(s, job.run_id).created_by == "lea"
    at = as_user("lea", "train")
    assert any(f"Run {job.run_id}" in m.value and "by lea" in m.value for m in at.markdown)
    assert f"cancel_{job.id}" in button_keys(at)


def test_admin_imports_folders_deletes_projects_and_manages_users(seeded, team, tmp_path):
    from conftest import make_mvtec

    with session_scope() as s:
        q.update_run(s, seeded.run_id, created_by="lea")
    at = as_user("alice", "results")
    assert any("run %d by lea" % seeded.run_id in c.value for c in at.caption)

    at = as_user("alice", "projects")
    parts = make_mvtec(tmp_path / "bolts", n_train=3, n_test_good=1, n_defect=1)
    at.text_input(key="folder_path").input(str(parts))
    click(at, "Create project", form="from_folder")
    assert "Created project “bolts”" in texts(at)
    at.button(key=f"delete_{seeded.project_id}").click().run()
    at.button(key=f"del_yes_{seeded.project_id}").click().run()
    ok(at)
    with session_scope() as s:
        assert [p["name"] for p in q.list_projects(s)] == ["bolts"]

    at = as_user("alice", "users")
    assert [t.value for t in at.title] == ["Users"]
    at.text_input(key="ua_name").input("olga")
    at.selectbox(key="ua_role").set_value("viewer")
    at.text_input(key="ua_password").input("olgas-password")
    click(at, "Add user")
    assert "Added olga (viewer)." in texts(at)
    at.selectbox(key="uc_name").set_value("vic")
    at.selectbox(key="uc_role").set_value("labeller")
    at.radio(key="uc_state").set_value("disable")
    click(at, "Apply")
    assert "vic: role labeller, disabled." in texts(at)
    assert {(a["username"], a["role"], a["disabled"]) for a in accounts.list_accounts()} >= {
        ("olga", "viewer", False), ("vic", "labeller", True)}
    # a disabled account is logged out at its next click
    login_form_only(as_user("vic"))
    # the Users page is for admins only: not even registered for others
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        as_user("lea", "users")
