"""The Label page's large view of one image: label it with keys and step on, see its
heatmap, and paint, erase and save its defect mask.
"""
from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from db import masks as mq
from db import session_scope
from db import queries as q
from osad_core.data import DataError
from ui import auth, common, figures, fmt, masks, thumbs
from ui.label_actions import anomaly_type, apply, fail, notify
from ui.label_grid import LABEL_NAMES, SPLIT_NAMES, chip, query

# --- defect masks ---------------------------------------------------------------------------


MASK_STEPS = {"undo": ("Mask change undone", ":material/undo:"), "redo": ("Mask change redone", ":material/redo:"),
              "clear": ("Mask cleared", ":material/delete:")}


def mask_step(image_id: int, how: str) -> None:
    """Undo, redo or clear an image's mask: each is one more entry in its mask history."""
    try:
        user = auth.require("label").username
    except ValueError as exc:
        fail(exc)
        return
    with session_scope() as s:
        if how == "undo":
            ev = mq.undo_mask(s, image_id, user)
        elif how == "redo":
            ev = mq.redo_mask(s, image_id, user)
        else:
            ev = mq.set_mask(s, image_id, None, user)
    if ev is None:
        notify(f"Nothing to {how} for this mask", ":material/info:")
    else:
        notify(*MASK_STEPS[how])


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
                notify(f"Mask saved ({100 * new.mean():.1f} % of the image)")
                st.rerun()
        st.button("Clear mask", key="mask_clear", on_click=mask_step, args=(im.id, "clear"),
                  icon=":material/delete:", disabled=im.mask_path is None)
        st.button("Undo mask", key="mask_undo", on_click=mask_step, args=(im.id, "undo"), icon=":material/undo:")
        st.button("Redo mask", key="mask_redo", on_click=mask_step, args=(im.id, "redo"), icon=":material/redo:")


# --- large view ------------------------------------------------------------------------------


def _move_focus(delta: int, total: int) -> None:
    idx = st.session_state.get("focus_idx", 0) + delta
    st.session_state["focus_idx"] = max(0, min(total - 1, idx))


def _close_focus() -> None:
    st.session_state.pop("focus_idx", None)


def large_view(project_id: int, flt: dict, total: int, run) -> None:
    idx = st.session_state["focus_idx"]
    rows, _ = query(project_id, flt, idx, 1)
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
                    st.button("Normal", key="kb_normal", icon=":material/check_circle:", shortcut="1", on_click=apply,
                              args=([im.id], "normal", idx))
                    st.button(f"Anomaly: {anomaly_type() or '…'}", key="kb_anomaly", icon=":material/report:",
                              shortcut="2",
                              on_click=apply, args=([im.id], "anomaly", idx))
                    st.button("Unlabelled", key="kb_unlabeled", on_click=apply, args=([im.id], "unlabeled", idx))
                    other = "train" if im.split == "test" else "test"
                    st.button("Use for training" if other == "train" else "Hold out for testing", key="kb_split",
                              on_click=apply, args=([im.id], other, idx))
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
                st.dataframe(history_frame(hist).drop(columns=["image"]), hide_index=True,
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


def history_frame(hist: list[dict]) -> pd.DataFrame:
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
