"""Label: a paginated thumbnail grid with filters, bulk tagging, undo, shortcuts and a
large view of one image (with its heatmap when a run exists).

Every change is one ``queries.set_labels``/``set_split`` batch with the user's name: an
append-only history that ``undo_last`` walks back. Only the shown page's thumbnails
are loaded (made once, cached on disk), so the grid stays quick with thousands of images.
The grid and its selection live in ``ui/label_grid.py``, the large view and the mask
editor in ``ui/label_view.py``, what the buttons do in ``ui/label_actions.py``.
"""
from __future__ import annotations

import math

import streamlit as st

from db import session_scope
from db import queries as q
from osad_core import active
from ui import auth, browser_events, common, fmt, label_next
from ui import label_actions as act
from ui.label_grid import (COLUMNS, LABEL_NAMES, PAGE_SIZE, SPLIT_NAMES, card, clear_selection, pager, query,
                           range_ends, select_ids, select_range, selected, shift_click)
from ui.label_view import history_frame, large_view

MODES = {"all": "All images", "next": "Label next"}
SORTS = {
    "name": "name",
    "score_desc": "anomaly score, high → low",
    "score_asc": "anomaly score, low → high",
    "uncertain": "most uncertain first (closest to the threshold)",
}


# --- state helpers ---------------------------------------------------------------------------


def _reset_page() -> None:
    # the filters are hidden in "Label next": a change reported for them then is stale
    # (a leftover element of the other view) and must not close the large view
    if st.session_state.get("label_mode") == "next":
        return
    st.session_state["label_page"] = 0
    st.session_state.pop("focus_idx", None)


def _clear_group() -> None:
    st.session_state.pop("grid_ids", None)
    st.session_state["label_page"] = 0
    st.session_state.pop("focus_idx", None)


def _switch_mode() -> None:
    st.session_state["label_page"] = 0
    st.session_state.pop("focus_idx", None)


# --- data ------------------------------------------------------------------------------------


def latest_run(project_id: int):
    with session_scope() as s:
        for r in q.list_runs(s, project_id):
            if r.run.status == "done":
                return r.run
    return None


@st.cache_data(show_spinner=False, max_entries=64)
def _score_range(run_id: int, finished: str) -> tuple[float, float] | None:
    with session_scope() as s:
        return q.score_range(s, run_id)


def score_range(run) -> tuple[float, float] | None:
    """Min/max score of a finished run (cached: a run's scores never change)."""
    return _score_range(run.id, str(run.finished_at))


def _filters(run, types: list[str]) -> dict:
    c1, c2, c3, c4, c5 = st.columns([1.2, 1.2, 1, 1.6, 1.6])
    label = c1.multiselect("Label", list(LABEL_NAMES), format_func=LABEL_NAMES.get, key="f_label",
                           on_change=_reset_page, placeholder="all")
    dtype = c2.multiselect("Defect type", types, key="f_type", on_change=_reset_page, placeholder="all")
    split = c3.multiselect("Split", list(SPLIT_NAMES), format_func=SPLIT_NAMES.get, key="f_split",
                           on_change=_reset_page, placeholder="all")
    sorts = list(SORTS) if run is not None else ["name"]
    if run is not None and run.threshold is None:
        sorts.remove("uncertain")
    if st.session_state.get("f_sort") not in sorts:
        st.session_state["f_sort"] = "name"
    sort = c4.selectbox("Sort by", sorts, format_func=SORTS.get, key="f_sort", on_change=_reset_page,
                        help=None if run else "Scores appear after the first finished training run.")
    score_min = score_max = None
    rng = score_range(run) if run is not None else None
    if rng is not None and rng[1] > rng[0]:
        lo, hi = rng
        key = f"f_score_{run.id}"
        val = c5.slider(f"Score range (run {run.id})", lo, hi, (lo, hi), step=(hi - lo) / 200, key=key,
                        on_change=_reset_page, format="%.3f")
        if val[0] > lo or val[1] < hi:
            score_min, score_max = val
    else:
        c5.caption("Score filter: after the first finished run.")
    return dict(label=label or None, defect_type=dtype or None, split=split or None,
                score_run_id=run.id if run is not None else None, score_min=score_min, score_max=score_max,
                sort=sort)


# --- toolbar ---------------------------------------------------------------------------------


def type_picker(types: list[str]) -> None:
    """The defect type that “Anomaly” (and key 2) applies; new types are typed in."""
    options = types + [act.NEW_TYPE]
    last = st.session_state.get("last_type")
    if st.session_state.get("type_pick") not in options:
        st.session_state["type_pick"] = last if last in options else (types[0] if types else act.NEW_TYPE)
    st.selectbox("Defect type", options, key="type_pick", width=190, label_visibility="collapsed",
                 help="Defect type for “Anomaly”")
    if st.session_state.get("type_pick") == act.NEW_TYPE:
        st.text_input("New defect type", key="type_new", placeholder="new type, e.g. crack", width=190,
                      label_visibility="collapsed")


def bulk_toolbar(project_id: int, page_ids: list[int], types: list[str], keyboard: bool) -> None:
    """Actions on the selection; they own the shortcuts when no large view is open."""
    sel = sorted(selected())
    with st.container(horizontal=True, vertical_alignment="center", key="bulk_bar", gap="small"):
        st.markdown(f"**{len(sel)} selected**", width="content")
        st.button("Select page", key="select_page", on_click=select_ids, args=(page_ids,))
        ends = range_ends(page_ids)
        # Shift-click does the same with the mouse (ui/browser_events.py); the button is there
        # for keyboard users and says how many images the range holds
        st.button(f"Select range ({ends[1] - ends[0] + 1})" if ends else "Select range", key="select_range",
                  on_click=select_range, args=(page_ids,), disabled=ends is None, icon=":material/select_all:",
                  help="Tick the first and the last image of a run of images, then select all between them "
                       "(or Shift-click the last one)")
        st.button("Clear", key="select_clear", on_click=clear_selection, disabled=not sel)
        st.button("Normal", key="bulk_normal", on_click=act.apply, args=(None, "normal"), disabled=not sel,
                  shortcut="1" if keyboard else None, icon=":material/check_circle:")
        type_picker(types)
        st.button(f"Anomaly: {act.anomaly_type() or '…'}", key="bulk_anomaly", on_click=act.apply, args=(None, "anomaly"),
                  disabled=not sel, shortcut="2" if keyboard else None, icon=":material/report:")
        st.button("Unlabelled", key="bulk_unlabeled", on_click=act.apply, args=(None, "unlabeled"), disabled=not sel)
        st.button("Hold out for testing", key="bulk_test", on_click=act.apply, args=(None, "test"), disabled=not sel)
        st.button("Use for training", key="bulk_train", on_click=act.apply, args=(None, "train"), disabled=not sel)
        st.button("Undo", key="undo", on_click=act.history_step, args=(project_id, "undo"), shortcut="U", icon=":material/undo:",
                  help="Undo your last label change (U)")
        st.button("Redo", key="redo", on_click=act.history_step, args=(project_id, "redo"), shortcut="Shift+U", icon=":material/redo:",
                  help="Redo what your last undo took back (Shift+U)")


# --- label next ----------------------------------------------------------------------------


def next_panel(project_id: int, run) -> dict | None:
    """The “Label next” queue of the latest run; returns the filter that shows it, or None."""
    if run is None:
        st.info("“Label next” appears after the first finished training run: train on the Train page.")
        return None
    opts = label_next.strategies(run)
    if st.session_state.get("next_strategy") not in opts:
        st.session_state["next_strategy"] = next(iter(opts))
    with st.container(horizontal=True, vertical_alignment="bottom", key="next_bar"):
        strategy = st.selectbox("Choose by", list(opts), format_func=opts.get, key="next_strategy", width=330,
                                help="Every strategy then spreads the queue over the run's embedding space, so "
                                     "it does not hold near-copies of one image.")
        n = st.number_input("Images", 1, 200, active.DEFAULT_N, key="next_n", width=110)
        queue = st.session_state.get("next_queue")
        if queue is None or (queue["run"], queue["strategy"], queue["n"]) != (run.id, strategy, n):
            if not act.new_queue(run, n, strategy):
                st.error(st.session_state.pop("label_error"), icon=":material/warning:")
                return None
            queue = st.session_state["next_queue"]
        st.button("New queue", key="next_new", on_click=act.new_queue, args=(run, n, strategy),
                  icon=":material/refresh:", help="Choose again among the images that are still unlabelled")
        ids = queue["ids"]
        with session_scope() as s:
            done = sum(im.label != "unlabeled" for im in q.get_images(s, project_id, ids))
        if auth.can("train"):
            st.button("Retrain with these", key="next_retrain", on_click=act.retrain, args=(run.id,),
                      type="primary" if done else "secondary", icon=":material/model_training:", disabled=not done,
                      help=f"Queue run {run.id}'s configuration again, on today's labels")
    st.progress(done / len(ids), text=f"{done} of {len(ids)} labelled · chosen from the images run {run.id} "
                                      f"scored that were unlabelled, {opts[strategy]}; {queue.get('how', '')}")
    return dict(image_ids=ids, score_run_id=run.id, sort=label_next.QUEUE_SORTS[strategy])


def history(project_id: int) -> None:
    with st.expander("Label history (append-only; newest first)"):
        with session_scope() as s:
            hist = q.label_history(s, project_id=project_id, limit=300)
        changes = [h for h in hist if h["previous_label"] is not None]
        if not changes:
            st.caption("No label changes yet — the import's labels are the starting point.")
        else:
            st.dataframe(history_frame(changes), hide_index=True, width="stretch")


# --- page ------------------------------------------------------------------------------------


def main() -> None:
    project = common.require_project()
    if project is None:
        return
    pid = project.id
    for text, icon in st.session_state.pop("label_toasts", []):
        st.toast(text, icon=icon)
    with session_scope() as s:
        counts = q.label_counts(s, pid)
        types = q.defect_types(s, pid)
    run = latest_run(pid)
    st.title(f"Label · {project.name}")
    bs = counts["by_split"]
    st.caption(f"{fmt.counts_line(counts)} · training: {bs['train']['normal']:,} normal + "
               f"{bs['train']['anomaly']:,} anomaly · held out: {bs['test']['normal']:,} normal + "
               f"{bs['test']['anomaly']:,} anomaly"
               + (f" · scores from run {run.id} ({run.method})" if run is not None else ""))
    err = st.session_state.pop("label_error", None)
    if err:
        st.error(err, icon=":material/warning:")
    if counts["images"] == 0:
        st.info("This project has no images.")
        return

    mode = st.radio("View", list(MODES), format_func=MODES.get, horizontal=True, key="label_mode",
                    on_change=_switch_mode, label_visibility="collapsed")
    flt = next_panel(pid, run) if mode == "next" else _filters(run, types)
    if flt is None:
        history(pid)
        return
    group = st.session_state.get("grid_ids")
    if group and mode == "all":  # images picked elsewhere (a box or lasso on the t-SNE map)
        flt["image_ids"] = group["ids"]
        with st.container(horizontal=True, vertical_alignment="center", key="grid_ids_bar"):
            st.markdown(f"Only the **{len(group['ids'])} images** {group['what']}, with the filters "
                        "above.", width="content")
            st.button("Show all", key="grid_ids_clear", icon=":material/close:", on_click=_clear_group)
    try:
        page = int(st.session_state.get("label_page", 0))
        rows, total = query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        if page >= pages:
            page = pages - 1
            st.session_state["label_page"] = page
            rows, total = query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)
    except ValueError as exc:
        common.show_error(exc)
        return

    # after labelling in the large view, step on unless the image left the filtered view
    adv = st.session_state.pop("advance_from", None)
    if adv is not None and "focus_idx" in st.session_state:
        idx, image_id = adv
        still, _ = query(pid, flt, idx, 1)
        if still and still[0].image.id == image_id and idx + 1 < total:
            st.session_state["focus_idx"] = idx + 1
        elif idx >= total:
            st.session_state["focus_idx"] = max(0, total - 1)
    focus = "focus_idx" in st.session_state and total > 0
    if focus:
        # the grid follows the large view
        page = st.session_state["focus_idx"] // PAGE_SIZE
        if page != st.session_state.get("label_page", 0):
            st.session_state["label_page"] = page
            rows, total = query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)

    labelling = auth.can("label")
    if labelling:
        # before the toolbar and the checkboxes: a Shift-click changes what they show
        shift_click([r.image.id for r in rows], browser_events.shift_click())
        bulk_toolbar(pid, [r.image.id for r in rows], types, keyboard=not focus)
        st.caption("Keyboard: **1** normal · **2** anomaly (type above) · **U** undo · **Shift+U** redo"
                   + (" · **←/→** previous/next · **Esc** close" if focus
                      else " · :material/zoom_in: opens the large view · **Shift-click** a box: select the "
                           "images from the last ticked one to it"))
    else:
        st.caption("Read only: your role can look at images, labels and scores but not change them.")
    if focus:
        large_view(pid, flt, total, run)

    if not rows:
        st.info("No images match these filters.")
    else:
        rng = score_range(run) if run is not None else None
        thr = run.threshold if run is not None else None
        for start in range(0, len(rows), COLUMNS):
            cols = st.columns(COLUMNS)
            for j, (im, score) in enumerate(rows[start:start + COLUMNS]):
                with cols[j]:
                    card(im, score, page * PAGE_SIZE + start + j, rng, thr, labelling)
        pager(page, pages, total, "bottom")
    history(pid)


common.run_page(main)
