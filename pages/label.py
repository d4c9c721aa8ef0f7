"""Label: a paginated thumbnail grid with filters, bulk tagging, undo, shortcuts and a
large view of one image (with its heatmap when a run exists).

Every change is one ``queries.set_labels``/``set_split`` batch with the user's name: an
append-only history that ``undo_last`` walks back. Only the shown page's thumbnails
are loaded (made once, cached on disk), so the grid stays quick with thousands of images.
"""
from __future__ import annotations

import html
import math

import pandas as pd
import streamlit as st

from db import masks as mq
from db import session_scope
from db import queries as q
from osad_core import active
from osad_core.data import DataError
from ui import auth, common, figures, fmt, label_next, masks, thumbs, training

PAGE_SIZE = 48
COLUMNS = 6
NEW_TYPE = "+ new type…"
LABEL_NAMES = {"normal": "normal", "anomaly": "anomaly", "unlabeled": "unlabelled"}
SPLIT_NAMES = {"train": "training", "test": "held out"}
MODES = {"all": "All images", "next": "Label next"}
SORTS = {
    "name": "name",
    "score_desc": "anomaly score, high → low",
    "score_asc": "anomaly score, low → high",
    "uncertain": "most uncertain first (closest to the threshold)",
}


# --- state helpers ---------------------------------------------------------------------------


def _selected() -> set[int]:
    return st.session_state.setdefault("selected", set())


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


def _notify(text: str, icon: str = ":material/check_circle:") -> None:
    st.session_state.setdefault("label_toasts", []).append((text, icon))


def _fail(exc: Exception) -> None:
    st.session_state["label_error"] = common.sentence(exc)


def _clear_selection() -> None:
    _selected().clear()
    st.session_state.pop("ticks", None)
    for k in [k for k in st.session_state if isinstance(k, str) and k.startswith("sel_") and k[4:].isdigit()]:
        st.session_state[k] = False


def _select_ids(ids: list[int]) -> None:
    sel = _selected()
    sel.update(ids)
    for i in ids:
        st.session_state[f"sel_{i}"] = True


def _toggle(image_id: int) -> None:
    if st.session_state.get(f"sel_{image_id}"):
        _selected().add(image_id)
        ticks = st.session_state.setdefault("ticks", [])
        ticks[:] = (ticks + [image_id])[-2:]  # the last two ticked images bound a range
    else:
        _selected().discard(image_id)


def range_ends(page_ids: list[int]) -> tuple[int, int] | None:
    """Positions on the page of the last two ticked images, in page order, if both are shown."""
    ticks = [i for i in st.session_state.get("ticks", []) if i in page_ids]
    if len(ticks) < 2:
        return None
    a, b = sorted(page_ids.index(i) for i in ticks)
    return (a, b) if b - a > 1 else None


def _select_range(page_ids: list[int]) -> None:
    ends = range_ends(page_ids)
    if ends is not None:
        _select_ids(page_ids[ends[0]:ends[1] + 1])


def _anomaly_type() -> str:
    pick = st.session_state.get("type_pick")
    if pick == NEW_TYPE or pick is None:
        return str(st.session_state.get("type_new") or "").strip()
    return str(pick)


# --- actions (run as callbacks, before the page draws) ---------------------------------------


def _apply(ids: list[int] | None, action: str, after_focus: int | None = None) -> None:
    """Apply ``action`` (normal / anomaly / unlabeled / test / train) to ``ids``, or to
    the current selection when ``ids`` is None."""
    ids = sorted(_selected()) if ids is None else list(ids)
    try:
        user = auth.require("label").username
        if not ids:
            raise ValueError("Select images first (tick their boxes, or “Select page”).")
        with session_scope() as s:
            if action in ("test", "train"):
                q.set_split(s, ids, action, author=user)
                what = "held out for testing" if action == "test" else "moved to training"
            elif action == "anomaly":
                dt = _anomaly_type()
                if not dt:
                    raise ValueError("Type a defect type for the anomaly (e.g. “crack”).")
                q.set_labels(s, ids, "anomaly", dt, author=user)
                st.session_state["last_type"] = dt
                what = f"anomaly ({dt})"
            else:
                q.set_labels(s, ids, action, None, author=user)
                what = LABEL_NAMES[action]
    except ValueError as exc:
        _fail(exc)
        return
    _notify(f"{len(ids)} image{'s' if len(ids) != 1 else ''} → {what}")
    if after_focus is None:
        _clear_selection()
    else:
        st.session_state["advance_from"] = (after_focus, ids[0])


def _undo(project_id: int) -> None:
    try:
        user = auth.require("label").username
    except ValueError as exc:
        _fail(exc)
        return
    with session_scope() as s:
        n = q.undo_last(s, project_id, author=user)
    if n:
        _notify(f"Undone: {n} image{'s' if n != 1 else ''} restored", ":material/undo:")
    else:
        _notify("Nothing of yours to undo", ":material/info:")


def _new_queue(run, n: int, strategy: str) -> bool:
    """Choose the images to label next; opens the first in the large view."""
    try:
        ids = label_next.make_queue(run, int(n), strategy)
    except ValueError as exc:
        _fail(exc)
        st.session_state.pop("next_queue", None)
        return False
    st.session_state["next_queue"] = {"run": run.id, "strategy": strategy, "n": int(n), "ids": ids}
    st.session_state["label_page"] = 0
    st.session_state["focus_idx"] = 0
    return True


def _retrain(run_id: int) -> None:
    try:
        new_run, job_id = training.retrain(run_id, auth.actor())
    except (DataError, ValueError) as exc:
        _fail(exc)
        return
    st.session_state.setdefault("watched_jobs", {})[job_id] = new_run
    _notify(f"Run {new_run} queued: run {run_id}'s configuration on today's labels", ":material/rocket_launch:")


def _redo(project_id: int) -> None:
    try:
        user = auth.require("label").username
    except ValueError as exc:
        _fail(exc)
        return
    with session_scope() as s:
        n = q.redo_last(s, project_id, author=user)
    if n:
        _notify(f"Redone: {n} image{'s' if n != 1 else ''} labelled again", ":material/redo:")
    else:
        _notify("Nothing of yours to redo: only your last undo can be redone", ":material/info:")


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


def _query(project_id: int, flt: dict, offset: int, limit: int):
    with session_scope() as s:
        return q.image_page(s, project_id, offset=offset, limit=limit, **flt)


# --- toolbar ---------------------------------------------------------------------------------


def type_picker(types: list[str]) -> None:
    """The defect type that “Anomaly” (and key 2) applies; new types are typed in."""
    options = types + [NEW_TYPE]
    last = st.session_state.get("last_type")
    if st.session_state.get("type_pick") not in options:
        st.session_state["type_pick"] = last if last in options else (types[0] if types else NEW_TYPE)
    st.selectbox("Defect type", options, key="type_pick", width=190, label_visibility="collapsed",
                 help="Defect type for “Anomaly”")
    if st.session_state.get("type_pick") == NEW_TYPE:
        st.text_input("New defect type", key="type_new", placeholder="new type, e.g. crack", width=190,
                      label_visibility="collapsed")


def bulk_toolbar(project_id: int, page_ids: list[int], types: list[str], keyboard: bool) -> None:
    """Actions on the selection; they own the shortcuts when no large view is open."""
    sel = sorted(_selected())
    with st.container(horizontal=True, vertical_alignment="center", key="bulk_bar", gap="small"):
        st.markdown(f"**{len(sel)} selected**", width="content")
        st.button("Select page", key="select_page", on_click=_select_ids, args=(page_ids,))
        ends = range_ends(page_ids)
        # Streamlit's checkboxes do not report the Shift key: the range is the last two ticks
        st.button(f"Select range ({ends[1] - ends[0] + 1})" if ends else "Select range", key="select_range",
                  on_click=_select_range, args=(page_ids,), disabled=ends is None, icon=":material/select_all:",
                  help="Tick the first and the last image of a run of images, then select all between them")
        st.button("Clear", key="select_clear", on_click=_clear_selection, disabled=not sel)
        st.button("Normal", key="bulk_normal", on_click=_apply, args=(None, "normal"), disabled=not sel,
                  shortcut="1" if keyboard else None, icon=":material/check_circle:")
        type_picker(types)
        st.button(f"Anomaly: {_anomaly_type() or '…'}", key="bulk_anomaly", on_click=_apply, args=(None, "anomaly"),
                  disabled=not sel, shortcut="2" if keyboard else None, icon=":material/report:")
        st.button("Unlabelled", key="bulk_unlabeled", on_click=_apply, args=(None, "unlabeled"), disabled=not sel)
        st.button("Hold out for testing", key="bulk_test", on_click=_apply, args=(None, "test"), disabled=not sel)
        st.button("Use for training", key="bulk_train", on_click=_apply, args=(None, "train"), disabled=not sel)
        st.button("Undo", key="undo", on_click=_undo, args=(project_id,), shortcut="U", icon=":material/undo:",
                  help="Undo your last label change (U)")
        st.button("Redo", key="redo", on_click=_redo, args=(project_id,), shortcut="Shift+U", icon=":material/redo:",
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
            if not _new_queue(run, n, strategy):
                st.error(st.session_state.pop("label_error"), icon=":material/warning:")
                return None
            queue = st.session_state["next_queue"]
        st.button("New queue", key="next_new", on_click=_new_queue, args=(run, n, strategy),
                  icon=":material/refresh:", help="Choose again among the images that are still unlabelled")
        ids = queue["ids"]
        with session_scope() as s:
            done = sum(im.label != "unlabeled" for im in q.get_images(s, project_id, ids))
        if auth.can("train"):
            st.button("Retrain with these", key="next_retrain", on_click=_retrain, args=(run.id,),
                      type="primary" if done else "secondary", icon=":material/model_training:", disabled=not done,
                      help=f"Queue run {run.id}'s configuration again, on today's labels")
    st.progress(done / len(ids), text=f"{done} of {len(ids)} labelled · chosen from the images run {run.id} "
                                      f"scored that were unlabelled, {opts[strategy]}")
    return dict(image_ids=ids, score_run_id=run.id, sort=label_next.QUEUE_SORTS[strategy])


# --- defect masks ---------------------------------------------------------------------------


MASK_STEPS = {"undo": ("Mask change undone", ":material/undo:"), "redo": ("Mask change redone", ":material/redo:"),
              "clear": ("Mask cleared", ":material/delete:")}


def _mask_step(image_id: int, how: str) -> None:
    """Undo, redo or clear an image's mask: each is one more entry in its mask history."""
    try:
        user = auth.require("label").username
    except ValueError as exc:
        _fail(exc)
        return
    with session_scope() as s:
        if how == "undo":
            ev = mq.undo_mask(s, image_id, user)
        elif how == "redo":
            ev = mq.redo_mask(s, image_id, user)
        else:
            ev = mq.set_mask(s, image_id, None, user)
    if ev is None:
        _notify(f"Nothing to {how} for this mask", ":material/info:")
    else:
        _notify(*MASK_STEPS[how])


def mask_editor(project_id: int, im, arr) -> None:
    """Paint, erase and save the defect mask of an anomaly over the image."""
    from streamlit_drawable_canvas import st_canvas

    h, w = arr.shape[:2]
    full = (im.height, im.width) if im.width and im.height else (h, w)  # masks keep the file's resolution
    try:
        current = masks.load(im.mask_path, full)
    except DataError as exc:
        common.show_error(exc)
        current = masks.load(None, full)
    disp_w = 480 if w < 480 else min(w, 560)  # small images are enlarged to draw on
    disp_h = max(1, round(h * disp_w / w))
    with st.container(horizontal=True, vertical_alignment="bottom", key="mask_tools"):
        tool = st.radio("Brush", ["paint", "erase"], horizontal=True, key="mask_tool")
        shape = st.radio("Shape", ["freedraw", "rect"], horizontal=True, key="mask_shape",
                         format_func={"freedraw": "free", "rect": "box"}.get)
        size = st.slider("Brush size", 2, 80, 20, key="mask_brush", width=180)
    r, g, b = masks.PAINT if tool == "paint" else masks.ERASE
    color = f"rgba({r}, {g}, {b}, 0.75)"
    version = abs(hash(im.mask_path)) % 10**8  # a saved change starts a fresh canvas
    res = st_canvas(fill_color=color, stroke_color=color, stroke_width=size,
                    background_image=masks.overlay(arr, masks.resize(current, (h, w))).resize((disp_w, disp_h)),
                    height=disp_h, width=disp_w, drawing_mode=shape, return_image_data=True,
                    key=f"mask_canvas_{im.id}_{version}")
    st.caption(f"Red = the mask now ({100 * current.mean():.1f} % of the image). Paint adds, erase removes; "
               "**Save mask** keeps the result as a new version.")
    with st.container(horizontal=True):
        if st.button("Save mask", key="mask_save", type="primary", icon=":material/save:"):
            try:
                user = auth.require("label").username
                new = masks.apply_strokes(current, res.image_data)
                with session_scope() as s:
                    mq.set_mask(s, im.id, masks.save(project_id, im.id, new) if new.any() else None, user)
            except ValueError as exc:
                common.show_error(exc)
            else:
                _notify(f"Mask saved ({100 * new.mean():.1f} % of the image)")
                st.rerun()
        st.button("Clear mask", key="mask_clear", on_click=_mask_step, args=(im.id, "clear"),
                  icon=":material/delete:", disabled=im.mask_path is None)
        st.button("Undo mask", key="mask_undo", on_click=_mask_step, args=(im.id, "undo"), icon=":material/undo:")
        st.button("Redo mask", key="mask_redo", on_click=_mask_step, args=(im.id, "redo"), icon=":material/redo:")


# --- large view ------------------------------------------------------------------------------


def _move_focus(delta: int, total: int) -> None:
    idx = st.session_state.get("focus_idx", 0) + delta
    st.session_state["focus_idx"] = max(0, min(total - 1, idx))


def _close_focus() -> None:
    st.session_state.pop("focus_idx", None)


def chip(label: str, defect_type: str | None) -> str:
    text = defect_type if label == "anomaly" and defect_type else LABEL_NAMES[label]
    return f'<span class="osad-chip {label}">{html.escape(text)}</span>'


def large_view(project_id: int, flt: dict, total: int, run) -> None:
    idx = st.session_state["focus_idx"]
    rows, _ = _query(project_id, flt, idx, 1)
    if not rows:
        _close_focus()
        return
    im, score = rows[0]
    with st.container(border=True, key="large_view"):
        left, right = st.columns([3, 2])
        with right:
            st.markdown(f"**{html.escape(im.rel_path)}** &nbsp; {chip(im.label, im.defect_type)}"
                        f'<span class="osad-chip split">{SPLIT_NAMES[im.split]}</span>', unsafe_allow_html=True)
            st.caption(f"Image {idx + 1:,} of {total:,} in this view · {im.width}×{im.height} px")
            heat = None
            if run is not None and score is not None:
                verdict = ""
                if run.threshold is not None:
                    verdict = " — above the threshold" if score >= run.threshold else " — below the threshold"
                st.markdown(f"Score in run {run.id}: **{score:.4f}**{verdict}")
                with session_scope() as s:
                    heat = q.run_heatmap(s, run.id, im.id)
            with st.container(horizontal=True):
                st.button("Previous", key="kb_prev", icon=":material/arrow_back:", on_click=_move_focus,
                          args=(-1, total),
                          shortcut="Left", disabled=idx == 0)
                st.button("Next", key="kb_next", icon=":material/arrow_forward:", on_click=_move_focus, args=(1, total),
                          shortcut="Right", disabled=idx >= total - 1)
                st.button("Close", key="kb_close", on_click=_close_focus, shortcut="Esc")
            if auth.can("label"):
                with st.container(horizontal=True):
                    st.button("Normal", key="kb_normal", icon=":material/check_circle:", shortcut="1", on_click=_apply,
                              args=([im.id], "normal", idx))
                    st.button(f"Anomaly: {_anomaly_type() or '…'}", key="kb_anomaly", icon=":material/report:",
                              shortcut="2",
                              on_click=_apply, args=([im.id], "anomaly", idx))
                    st.button("Unlabelled", key="kb_unlabeled", on_click=_apply, args=([im.id], "unlabeled", idx))
                    other = "train" if im.split == "test" else "test"
                    st.button("Use for training" if other == "train" else "Hold out for testing", key="kb_split",
                              on_click=_apply, args=([im.id], other, idx))
            editing = False
            if im.label == "anomaly" and auth.can("label"):
                editing = st.toggle("Draw the defect mask", key="lv_mask",
                                    help="BGAD and CKAAD train on the masks of labelled anomalies where they exist; "
                                         "pixel metrics use the masks of held-out ones.")
            elif im.mask_path:
                st.caption("This image has a defect mask.")
            show_heat = False
            if heat is not None and not editing:
                show_heat = st.toggle(f"Heatmap of run {run.id}", key="lv_heat", value=True)
                opacity = st.slider("Heatmap opacity", 0.0, 1.0, 0.45, 0.05, key="lv_opacity")
            with session_scope() as s:
                hist = q.label_history(s, image_id=im.id, limit=10)
            if hist:
                st.caption("History of this image")
                st.dataframe(_history_frame(hist).drop(columns=["image"]), hide_index=True,
                             height=36 * (len(hist) + 1) + 4)
        with left:
            try:
                arr = thumbs.view_image(im.path)
            except Exception as exc:  # unreadable file: say so, keep labelling possible
                common.show_error(exc)
                return
            if editing:
                mask_editor(project_id, im, arr)
            elif show_heat:
                vmin, vmax = fmt.display_range(run, (float(heat.min()), float(heat.max()) + 1e-6))
                fig = figures.overlay_figure(arr, heat, vmin, vmax, opacity)
                st.plotly_chart(fig, key="lv_fig", config={"displayModeBar": False})
            else:
                st.image(arr, width=min(560, max(320, arr.shape[1])))


# --- grid ------------------------------------------------------------------------------------


def _open(idx: int) -> None:
    st.session_state["focus_idx"] = idx


def card(im, score, idx: int, rng: tuple[float, float] | None, threshold: float | None,
         labelling: bool = True) -> None:
    sel = im.id in _selected()
    key = f"card_{im.label}_{im.id}" + ("_sel" if sel else "")
    with st.container(key=key):
        path = thumbs.thumbnail(im.path, im.content_hash)
        if path is None:
            st.error("unreadable image", icon=":material/warning:")
        else:
            st.image(str(path), width="stretch")
        bar = ""
        if score is not None and rng is not None and rng[1] > rng[0]:
            pct = 100 * (score - rng[0]) / (rng[1] - rng[0])
            mark = ""
            if threshold is not None:
                tp = max(0.0, min(100.0, 100 * (threshold - rng[0]) / (rng[1] - rng[0])))
                mark = f'<i style="left:{tp:.0f}%"></i>'
            bar = f'<div class="osad-bar" title="score {score:.4f}"><span style="width:{pct:.0f}%"></span>{mark}</div>'
        split = '<span class="osad-chip split">held out</span>' if im.split == "test" else ""
        sc = f" · {score:.3f}" if score is not None else ""
        st.markdown(f'<div class="osad-card-meta">{chip(im.label, im.defect_type)}{split}{sc}{bar}</div>',
                    unsafe_allow_html=True)
        c1, c2 = st.columns([4, 1], vertical_alignment="center")
        name = im.rel_path.split("/")[-1]
        if labelling:
            ck = f"sel_{im.id}"
            if ck not in st.session_state:
                st.session_state[ck] = sel
            c1.checkbox(name, key=ck, on_change=_toggle, args=(im.id,))
        else:
            c1.caption(name)
        c2.button("", icon=":material/zoom_in:", key=f"zoom_{im.id}", on_click=_open, args=(idx,), help="Large view",
                  type="tertiary")


def _set_page(p: int) -> None:
    st.session_state["label_page"] = p


def pager(page: int, pages: int, total: int, where: str) -> None:
    with st.container(horizontal=True, vertical_alignment="center", key=f"pager_{where}"):
        st.button("Previous page", icon=":material/chevron_left:", key=f"pg_prev_{where}", on_click=_set_page,
                  args=(max(0, page - 1),),
                  disabled=page == 0)
        st.markdown(f"Page **{page + 1}** of {pages:,} · images {page * PAGE_SIZE + 1 if total else 0:,}–"
                    f"{min(total, (page + 1) * PAGE_SIZE):,} of {total:,}")
        st.button("Next page", icon=":material/chevron_right:", key=f"pg_next_{where}", on_click=_set_page,
                  args=(min(pages - 1, page + 1),),
                  disabled=page >= pages - 1)
        if where == "bottom" and pages > 2:
            # no key: the box follows the page shown; typing a number jumps there
            goto = st.number_input("Go to page", 1, pages, page + 1, label_visibility="collapsed", width=110)
            if goto != page + 1:
                _set_page(int(goto) - 1)
                st.rerun()


def _history_frame(hist: list[dict]) -> pd.DataFrame:
    def state(lb, dt, sp):
        if lb is None:
            return "—"
        s = f"{LABEL_NAMES[lb]}{f' ({dt})' if dt else ''}"
        return f"{s}, {SPLIT_NAMES.get(sp, sp)}" if sp else s

    return pd.DataFrame([{
        "when": h["created_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        "who": h["author"],
        "image": h["rel_path"],
        "from": state(h["previous_label"], h["previous_defect_type"], h["previous_split"]),
        "to": state(h["label"], h["defect_type"], h["split"]),
        "note": "undo" if h["reverts_batch_id"] else ("import" if h["previous_label"] is None else ""),
    } for h in hist])


def history(project_id: int) -> None:
    with st.expander("Label history (append-only; newest first)"):
        with session_scope() as s:
            hist = q.label_history(s, project_id=project_id, limit=300)
        changes = [h for h in hist if h["previous_label"] is not None]
        if not changes:
            st.caption("No label changes yet — the import's labels are the starting point.")
        else:
            st.dataframe(_history_frame(changes), hide_index=True, width="stretch")


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
        rows, total = _query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        if page >= pages:
            page = pages - 1
            st.session_state["label_page"] = page
            rows, total = _query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)
    except ValueError as exc:
        common.show_error(exc)
        return

    # after labelling in the large view, step on unless the image left the filtered view
    adv = st.session_state.pop("advance_from", None)
    if adv is not None and "focus_idx" in st.session_state:
        idx, image_id = adv
        still, _ = _query(pid, flt, idx, 1)
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
            rows, total = _query(pid, flt, page * PAGE_SIZE, PAGE_SIZE)

    labelling = auth.can("label")
    if labelling:
        bulk_toolbar(pid, [r.image.id for r in rows], types, keyboard=not focus)
        st.caption("Keyboard: **1** normal · **2** anomaly (type above) · **U** undo · **Shift+U** redo"
                   + (" · **←/→** previous/next · **Esc** close" if focus
                      else " · :material/zoom_in: opens the large view"))
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
