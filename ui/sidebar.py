"""The global sidebar: project switcher, your name (while login is off), compute, worker state, backbone
weights in use, database location."""
from __future__ import annotations

import streamlit as st

from db import session_scope
from db.engine import permission_warnings
from db import queries as q

from . import common, training


def _on_switch() -> None:
    common.set_project(st.session_state.get("sb_project"))


def project_switcher() -> None:
    with session_scope() as s:
        projects = [(p["id"], p["name"], p["images"]) for p in q.list_projects(s)]
    ids = [p[0] for p in projects]
    pid = common.current_project_id()
    if pid not in ids:
        pid = None
        if ids:  # a fresh session opens the newest project
            pid = max(ids)
        common.set_project(pid)
    if not ids:
        st.caption("No project yet — create one on the Projects page.")
        return
    names = {p[0]: f"{p[1]}  ({p[2]:,} images)" for p in projects}
    if st.session_state.get("sb_project") != pid:
        st.session_state["sb_project"] = pid
    st.selectbox("Project", ids, format_func=lambda i: names.get(i, str(i)), key="sb_project", on_change=_on_switch)


def _worker_state() -> tuple[str, str]:
    """(level, text) of the worker: idle / training run N, 43 % / not running."""
    with session_scope() as s:
        workers = q.alive_workers(s, max_age_s=20)
        running = q.list_jobs(s, "running")
        queued = q.list_jobs(s, "queued")
    if running:
        job = running[0]
        frac = (job.progress_json or {}).get("fraction")
        pct = f", {frac * 100:.0f} %" if isinstance(frac, (int, float)) else ""
        text = f"training run {job.run_id}{pct}"
        if len(running) > 1:
            text += f" (+{len(running) - 1} more)"
        if queued:
            text += f" · {len(queued)} waiting"
        return "running", text
    if queued and not workers:
        started = training.maybe_start_worker()
        return "waiting", f"{len(queued)} job(s) waiting · " + ("starting a worker…" if started else "no worker alive")
    if workers:
        return "idle", f"idle ({len(workers)} worker{'s' if len(workers) > 1 else ''} alive)"
    return "off", "not running — starts when you press Train"


@st.fragment(run_every=3)
def worker_status() -> None:
    level, text = _worker_state()
    icon = {"running": ":material/settings:", "waiting": ":material/hourglass_empty:",
            "idle": ":material/check_circle:", "off": ":material/radio_button_unchecked:"}[level]
    st.markdown(f"**Worker** &nbsp; {icon} {text}")


def render_top() -> None:
    project_switcher()
    if st.session_state.get("auth_on"):
        return  # the logged-in user signs every change
    st.session_state.setdefault("user_name", common.default_user())
    st.text_input("Your name", key="user_name", help="Stored with every label change in the history.")


def render_facts() -> None:
    st.divider()
    info = common.compute_info()
    st.markdown(f"**Compute** &nbsp; {info['label']}")
    worker_status()
    w = common.weights_info()
    of = f" ({w.method}, the default method)" if getattr(w, "method", None) else ""
    st.markdown(f"**Backbone**{of} &nbsp; {w.name} · {w.weights}")
    if w.weights_source == "random":
        st.error(f"Random init — results will be weak. {w.warning or ''}", icon=":material/error:")
    elif w.warning:
        st.warning(w.warning, icon=":material/warning:")
    st.caption(f"Database: `{common.database_location()}`")
    for warning in permission_warnings():
        st.warning(warning, icon=":material/lock_open:")
