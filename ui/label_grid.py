"""The Label page's thumbnail grid: the selection (ticks, a page, a range, Shift-click),
one card per image and the pager.

The selection lives in ``st.session_state["selected"]`` (image ids) and in each card's
checkbox ``tick_<generation>_<id>`` (inside a container ``sel_<id>``, the browser's handle);
``ticks`` remembers the last ticked images, whose positions on the page bound a range.

A change made by the app (Clear, Select page, a range, a label applied) starts a new
generation of checkbox keys instead of setting the old boxes: on a busy server a click can
reach the app before the browser has redrawn the boxes, and the browser then sends the old
boxes' stale values back, which would bring a cleared tick back (or drop a new one).
Boxes of an old generation are ignored.
"""
from __future__ import annotations

import html

import streamlit as st

from db import session_scope
from db import queries as q
from ui import thumbs

PAGE_SIZE = 48
COLUMNS = 6
LABEL_NAMES = {"normal": "normal", "anomaly": "anomaly", "unlabeled": "unlabelled"}
SPLIT_NAMES = {"train": "training", "test": "held out"}


def query(project_id: int, flt: dict, offset: int, limit: int):
    with session_scope() as s:
        return q.image_page(s, project_id, offset=offset, limit=limit, **flt)


# --- selection ---------------------------------------------------------------------------------


def selected() -> set[int]:
    return st.session_state.setdefault("selected", set())


def _generation() -> int:
    return st.session_state.get("tick_gen", 0)


def box_key(image_id: int) -> str:
    """The key of an image's checkbox in the current generation."""
    return f"tick_{_generation()}_{image_id}"


def box_image(key: str) -> int:
    """The image id of a checkbox key (``tick_<generation>_<id>``)."""
    return int(key.rsplit("_", 1)[1])


def _new_box_generation() -> None:
    old = f"tick_{_generation()}_"
    st.session_state["tick_gen"] = _generation() + 1
    for k in [k for k in st.session_state if isinstance(k, str) and k.startswith(old)]:
        del st.session_state[k]


def clear_selection() -> None:
    selected().clear()
    st.session_state.pop("ticks", None)
    _new_box_generation()


def select_ids(ids: list[int]) -> None:
    selected().update(ids)
    _new_box_generation()


def _remember_tick(image_id: int) -> None:
    ticks = st.session_state.setdefault("ticks", [])
    ticks[:] = ([i for i in ticks if i != image_id] + [image_id])[-2:]  # the last two ticked images bound a range


def toggle(image_id: int, key: str) -> None:
    if key != box_key(image_id):
        return  # a stale box of an earlier generation (see the module's docstring)
    if st.session_state.get(key):
        selected().add(image_id)
        _remember_tick(image_id)
    else:
        selected().discard(image_id)


def range_ends(page_ids: list[int]) -> tuple[int, int] | None:
    """Positions on the page of the last two ticked images, in page order, if both are shown."""
    ticks = [i for i in st.session_state.get("ticks", []) if i in page_ids]
    if len(ticks) < 2:
        return None
    a, b = sorted(page_ids.index(i) for i in ticks)
    return (a, b) if b - a > 1 else None


def select_range(page_ids: list[int]) -> None:
    ends = range_ends(page_ids)
    if ends is not None:
        select_ids(page_ids[ends[0]:ends[1] + 1])


def shift_range(page_ids: list[int], ticks: list[int], target: int) -> list[int]:
    """The images a Shift-click on ``target`` selects: from the last ticked image on the page
    to ``target``, both included, in page order; only ``target`` without such a tick."""
    if target not in page_ids:
        return []
    anchors = [i for i in ticks if i in page_ids and i != target]
    if not anchors:
        return [target]
    a, b = sorted((page_ids.index(anchors[-1]), page_ids.index(target)))
    return page_ids[a:b + 1]


def shift_click(page_ids: list[int], target: int | None) -> int:
    """Select what a Shift-click on ``target`` reaches (see ``shift_range``); the clicked image
    becomes the next range's anchor. Call before the grid's checkboxes are drawn. Returns
    how many images were added."""
    if target is None:
        return 0
    ids = shift_range(page_ids, list(st.session_state.get("ticks", [])), target)
    before = len(selected())
    select_ids(ids)
    if ids:
        _remember_tick(target)
    return len(selected()) - before


# --- cards ---------------------------------------------------------------------------------------


def chip(label: str, defect_type: str | None) -> str:
    text = defect_type if label == "anomaly" and defect_type else LABEL_NAMES[label]
    return f'<span class="osad-chip {label}">{html.escape(text)}</span>'


def _open(idx: int) -> None:
    st.session_state["focus_idx"] = idx


def card(im, score, idx: int, rng: tuple[float, float] | None, threshold: float | None,
         labelling: bool = True) -> None:
    sel = im.id in selected()
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
            ck = box_key(im.id)
            if ck not in st.session_state:
                st.session_state[ck] = sel
            with c1.container(key=f"sel_{im.id}"):
                st.checkbox(name, key=ck, on_change=toggle, args=(im.id, ck))
        else:
            c1.caption(name)
        c2.button("", icon=":material/zoom_in:", key=f"zoom_{im.id}", on_click=_open, args=(idx,), help="Large view",
                  type="tertiary")


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


def _set_page(p: int) -> None:
    st.session_state["label_page"] = p
