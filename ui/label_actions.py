"""What the Label page's buttons do: label, split, undo / redo, the "label next" queue and
a retrain. Each runs as a widget callback, before the page draws, and leaves a toast or a
one-sentence error for the page to show.
"""
from __future__ import annotations

import streamlit as st

from db import session_scope
from db import queries as q
from osad_core.data import DataError
from ui import auth, common, label_next, training
from ui.label_grid import LABEL_NAMES, clear_selection, selected

NEW_TYPE = "+ new type…"


def notify(text: str, icon: str = ":material/check_circle:") -> None:
    st.session_state.setdefault("label_toasts", []).append((text, icon))


def fail(exc: Exception) -> None:
    st.session_state["label_error"] = common.sentence(exc)


def anomaly_type() -> str:
    pick = st.session_state.get("type_pick")
    if pick == NEW_TYPE or pick is None:
        return str(st.session_state.get("type_new") or "").strip()
    return str(pick)


def apply(ids: list[int] | None, action: str, after_focus: int | None = None) -> None:
    """Apply ``action`` (normal / anomaly / unlabeled / test / train) to ``ids``, or to
    the current selection when ``ids`` is None."""
    ids = sorted(selected()) if ids is None else list(ids)
    try:
        user = auth.require("label").username
        if not ids:
            raise ValueError("Select images first (tick their boxes, or “Select page”).")
        with session_scope() as s:
            if action in ("test", "train"):
                q.set_split(s, ids, action, author=user)
                what = "held out for testing" if action == "test" else "moved to training"
            elif action == "anomaly":
                dt = anomaly_type()
                if not dt:
                    raise ValueError("Type a defect type for the anomaly (e.g. “crack”).")
                q.set_labels(s, ids, "anomaly", dt, author=user)
                st.session_state["last_type"] = dt
                what = f"anomaly ({dt})"
            else:
                q.set_labels(s, ids, action, None, author=user)
                what = LABEL_NAMES[action]
    except ValueError as exc:
        fail(exc)
        return
    notify(f"{len(ids)} image{'s' if len(ids) != 1 else ''} → {what}")
    if after_focus is None:
        clear_selection()
    else:
        st.session_state["advance_from"] = (after_focus, ids[0])


# undo and redo walk the same append-only history: (query, toast when something changed, when nothing did)
HISTORY_STEPS = {
    "undo": (q.undo_last, "Undone: {n} image{s} restored", ":material/undo:", "Nothing of yours to undo"),
    "redo": (q.redo_last, "Redone: {n} image{s} labelled again", ":material/redo:",
             "Nothing of yours to redo: only your last undo can be redone"),
}


def history_step(project_id: int, how: str) -> None:
    """Undo the user's last label change, or redo what their last undo took back."""
    step, done, icon, nothing = HISTORY_STEPS[how]
    try:
        user = auth.require("label").username
    except ValueError as exc:
        fail(exc)
        return
    with session_scope() as s:
        n = step(s, project_id, author=user)
    if n:
        notify(done.format(n=n, s="s" if n != 1 else ""), icon)
    else:
        notify(nothing, ":material/info:")


def new_queue(run, n: int, strategy: str) -> bool:
    """Choose the images to label next; opens the first in the large view."""
    try:
        ids, how = label_next.make_queue(run, int(n), strategy)
    except ValueError as exc:
        fail(exc)
        st.session_state.pop("next_queue", None)
        return False
    st.session_state["next_queue"] = {"run": run.id, "strategy": strategy, "n": int(n), "ids": ids, "how": how}
    st.session_state["label_page"] = 0
    st.session_state["focus_idx"] = 0
    return True


def retrain(run_id: int) -> None:
    try:
        new_run, job_id = training.retrain(run_id, auth.actor())
    except (DataError, ValueError) as exc:
        fail(exc)
        return
    st.session_state.setdefault("watched_jobs", {})[job_id] = new_run
    notify(f"Run {new_run} queued: run {run_id}'s configuration on today's labels", ":material/rocket_launch:")
