"""Inspect: one image with its heatmap on the run's fixed colour scale, its score and
verdict; step through images by score; score new uploads with a chosen run, or a whole
server folder in a background job; export.

Stored heatmaps are drawn as they are (no model needed). Scoring uploads loads the
run's saved model once per server process and runs it on the few uploaded images only.
"""
from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from db import data_dir, session_scope
from db import queries as q
from db import score_views as sv
from ui import auth, common, figures, fmt, ingest, thumbs, training

MAX_UPLOAD_SCORE = 32
ROLE_FILTER = {
    "test": "held out (test)",
    "train_normal": "training normal",
    "train_anomaly": "training anomaly",
    "calibration": "held-out normal (operating point)",
    "scored": "unlabelled",
}


@st.cache_resource(show_spinner=False, max_entries=4)
def _detector(model_path: str, mtime: float):
    from osad_core.methods.base import load_detector

    return load_detector(model_path, device="auto")


def _set_pos(pos: int) -> None:
    st.session_state["inspect_pos"] = pos
    st.session_state.pop("inspect_image_id", None)


def _verdict_html(score: float, threshold: float | None) -> str:
    if threshold is None:
        return f'<span class="osad-verdict">score {score:.4f}</span>'
    flagged = score >= threshold
    word = "ANOMALY" if flagged else "NORMAL"
    rel = "≥" if flagged else "<"
    cls = "anomaly" if flagged else "normal"
    return (f'<span class="osad-verdict {cls}">{word}</span> &nbsp; score <b>{score:.4f}</b> {rel} '
            f"threshold {threshold:.4f}")


def browse_tab(run) -> None:
    c1, c2, c3 = st.columns([2, 2, 1])
    roles = c1.multiselect("Images", list(ROLE_FILTER), format_func=ROLE_FILTER.get, key=f"ins_roles_{run.id}",
                           placeholder="all scored images")
    order = c2.radio("Order", ["score, high → low", "score, low → high"], horizontal=True, key="ins_order")
    ascending = order.endswith("low → high")
    # one row at a time by ``ORDER BY score LIMIT 1 OFFSET rank``: a run of 100,000 images
    # is never read whole to show one of them
    with session_scope() as s:
        n = sv.ranked_count(s, run.id, roles)
        want = st.session_state.get("inspect_image_id")
        rank = sv.rank_of(s, run.id, int(want), roles, ascending) if want is not None else None
    if n == 0:
        st.info("No images of that kind in this run." if roles else "This run stored no per-image scores.")
        return
    if rank is not None:
        st.session_state["inspect_pos"] = rank
    pos = min(max(int(st.session_state.get("inspect_pos", 0)), 0), n - 1)
    c3.metric("Images", f"{n:,}")
    with st.container(horizontal=True, vertical_alignment="center"):
        st.button("Previous", icon=":material/arrow_back:", key="ins_prev", shortcut="Left", on_click=_set_pos,
                  args=(max(0, pos - 1),),
                  disabled=pos == 0)
        st.button("Next", icon=":material/arrow_forward:", key="ins_next", shortcut="Right", on_click=_set_pos,
                  args=(min(n - 1, pos + 1),), disabled=pos >= n - 1)
        st.markdown(f"Rank **{pos + 1:,}** of {n:,} by score")
        # no key: the box follows the image shown; typing a rank jumps there
        goto = st.number_input("Go to rank", 1, n, pos + 1, label_visibility="collapsed", width=120)
        if goto != pos + 1:
            _set_pos(int(goto) - 1)
            st.rerun()
    with session_scope() as s:
        row = pd.Series(sv.ranked_rows(s, run.id, roles, ascending, offset=pos, limit=1)[0])
    row["role_name"] = figures.ROLE_NAMES.get(row["role"], row["role"])
    left, right = st.columns([3, 2])
    with right:
        st.markdown(f"**{html.escape(str(row['rel_path']))}**")
        st.markdown(_verdict_html(float(row["score"]), run.threshold), unsafe_allow_html=True)
        label = row["label"]
        lab = {"anomaly": f"anomaly · {row['defect_type']}", "normal": "normal", "unlabeled": "unlabelled"}[label]
        seen = ""
        if row["label_at_run"] == "anomaly":
            shown = row["seen"] is True
            seen = f" (a defect type {'shown' if shown else 'never shown'} in training)"
        st.markdown(f"Label now: **{lab}** · at training time: {row['label_at_run']}{seen}")
        st.caption(f"Role in run {run.id}: {row['role_name']} · `{row['path']}`")
        show = st.toggle("Heatmap", value=True, key="ins_heat")
        opacity = st.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key="ins_opacity")
        scale = st.radio("Colour scale", ["fixed for the run", "this image's own range"], horizontal=True,
                         key="ins_scale", help="The fixed scale compares images; the image's own range shows "
                                               "where inside one image the map is highest.")
        with session_scope() as s:
            heat = q.run_heatmap(s, run.id, int(row["image_id"]))
        vmin, vmax = fmt.display_range(run, (0.0, 1.0))
        if scale == "fixed for the run":
            note = (run.config_json or {}).get("display", {}).get("note", "set from the run's normal images")
            st.caption(f"Colour scale fixed for run {run.id}: {vmin:.3f} … {vmax:.3f} ({note}), "
                       "so good images do not light up.")
        elif heat is not None:
            vmin, vmax = float(heat.min()), max(float(heat.max()), float(heat.min()) + 1e-6)
            st.caption(f"Colour scale of this image alone: {vmin:.3f} … {vmax:.3f} — shows where, not how much.")
        if heat is None:
            st.caption("No heatmap stored for this image.")
    with left:
        try:
            arr = thumbs.view_image(str(row["path"]))
        except Exception as exc:
            common.show_error(exc)
            return
        fig = figures.overlay_figure(arr, heat if show else None, vmin, vmax, opacity)
        st.plotly_chart(fig, key="ins_overlay", config={"displayModeBar": False})


def score_tab(run) -> None:
    if not run.model_path or not Path(run.model_path).is_file():
        st.info(f"Run {run.id} has no saved model to score new images with (runs started from the app save one).")
        return
    st.caption(f"Score up to {MAX_UPLOAD_SCORE} new images with run {run.id}'s model. They join the project only "
               "when you add one with its label, below the result.")
    keep = auth.can("label")
    with st.form("score_form", border=False):
        files = st.file_uploader("Images to score", accept_multiple_files=True, key="score_files")
        go = st.form_submit_button(f"Score with run {run.id}", type="primary")
    if go:
        try:
            auth.require("score")
            if not files:
                raise ingest.IngestError("Choose one or more images to score.")
            # uploads to score belong to no project: they live in a folder of their own
            # (unique names, so same-named files never overwrite each other) that is removed
            # as soon as they are scored; only the scores, maps and small views are kept
            with ingest.scoring_folder() as folder:
                paths, notes = ingest.save_upload([(f.name, f.getvalue()) for f in files], folder,
                                                  nothing="nothing was scored")
                if not paths:
                    why = f" ({ingest.skipped_note(notes)})" if notes else ""
                    raise ingest.IngestError(f"The upload holds no images{why}; nothing was scored.")
                if len(paths) > MAX_UPLOAD_SCORE:
                    raise ingest.IngestError(f"Score at most {MAX_UPLOAD_SCORE} images at a time here; use "
                                             "`python -m osad_core score` for more.")
                with st.spinner(f"Scoring {len(paths)} image(s) with run {run.id}…"):
                    det = _detector(run.model_path, Path(run.model_path).stat().st_mtime)
                    pred = det.predict(paths)
                    views = [thumbs.view_image(r.path) for r in pred.records]
                # the scoring folder goes when this block ends: a labeller may add what was
                # scored to the project, so each file is kept (checked, by content hash) first
                kept = [ingest.keep_scored(r.path, run.project_id) for r in pred.records] if keep else []
            if keep:
                ingest.sweep_inspected(run.project_id)
        except (ValueError, FileNotFoundError) as exc:
            common.show_error(exc)
            return
        st.session_state["scored"] = {
            "run_id": run.id,
            "rows": [{"file": Path(r.path).name, "score": float(sc)} for r, sc in zip(pred.records, pred.scores)],
            "kept": kept,
            "maps": [np.asarray(m, np.float32) for m in pred.maps],
            "views": views,
            "skipped": [why for _, why in pred.skipped] + notes,
        }
    res = st.session_state.get("scored")
    if not res or res["run_id"] != run.id:
        return
    rows = res["rows"]
    for why in res["skipped"]:
        st.warning(common.sentence(why))
    if not rows:
        return
    table = pd.DataFrame(rows)
    if run.threshold is not None:
        table["verdict"] = np.where(table["score"] >= run.threshold, "anomaly", "normal")
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"score": st.column_config.NumberColumn(format="%.4f")})
    st.download_button("Download these scores (CSV)", table.to_csv(index=False), f"run_{run.id}_new_scores.csv",
                       "text/csv", key="dl_new_scores", on_click="ignore")
    drift_check(run, table["score"].to_numpy())
    vmin, vmax = fmt.display_range(run, (0.0, 1.0))
    pick = st.selectbox("Show", range(len(rows)), format_func=lambda i: rows[i]["file"], key="scored_pick")
    c1, c2 = st.columns([3, 2])
    with c1:
        st.plotly_chart(figures.overlay_figure(res["views"][pick], res["maps"][pick], vmin, vmax, 0.45),
                        key="scored_overlay",
                        config={"displayModeBar": False})
    with c2:
        st.markdown(_verdict_html(rows[pick]["score"], run.threshold), unsafe_allow_html=True)
        if res.get("kept") and auth.can("label"):
            add_box(run.project_id, rows[pick]["file"], *res["kept"][pick])


def folder_score_tab(run) -> None:
    """Score every image of a server folder (any number) in a background job: progress
    and ETA here, cancel between batches, the rows as a CSV."""
    if not run.model_path or not Path(run.model_path).is_file():
        st.info(f"Run {run.id} has no saved model to score with (runs started from the app save one).")
        return
    st.caption(f"Every image of a folder below the server's import folders, scored with run {run.id}'s model "
               "in batches by the worker; rows are written as each batch is done. Nothing joins the project.")
    with st.form("score_folder_form", border=False):
        path = st.text_input("Folder path", placeholder="/data/line3/2026-11-30", key="score_folder_path")
        go = st.form_submit_button(f"Score the folder with run {run.id}", type="primary")
    if go:
        try:
            ingest.queue_folder_scoring(run, path, auth.require("import_folder").username)
        except (ValueError, FileNotFoundError) as exc:
            common.show_error(exc)
        else:
            training.maybe_start_worker()
    folder_score_status(run.id, run.threshold)


def _cancel_job(job_id: int) -> None:
    auth.require("import_folder")
    with session_scope() as s:
        q.request_cancel(s, job_id)


@st.fragment(run_every=2.0)
def folder_score_status(run_id: int, threshold: float | None) -> None:
    from osad_core.bulk_score import scores_csv

    with session_scope() as s:
        job = q.latest_jobs(s, "score", "run_id").get(run_id)
    if job is None:
        return
    p = job.progress_json or {}
    folder = (job.payload_json or {}).get("folder", "")
    if job.status == "queued":
        st.caption(f"Scoring `{folder}`: queued, waiting for the worker…")
        training.maybe_start_worker()
    elif job.status == "running":
        eta = p.get("eta_s")
        st.progress(float(p.get("fraction") or 0.0),
                    text=f"Scoring `{folder}`: {p.get('message') or 'starting…'}"
                         + (f" · about {fmt.duration_short(eta)} left" if eta else ""))
        if not job.cancel_requested:
            st.button("Cancel scoring", key="score_folder_cancel", icon=":material/stop:", on_click=_cancel_job,
                      args=(job.id,), help="Stop after the current batch; the rows written so far stay")
    elif job.status == "done":
        st.success(f"`{folder}`: {p.get('message', 'scored')}.", icon=":material/check_circle:")
    else:
        st.warning(f"`{folder}`: {job.error or job.status}", icon=":material/warning:")
    out = scores_csv(data_dir(), job.id)
    if job.status in ("done", "cancelled") and out.is_file():
        verdicts = f", verdict at the run's operating point {threshold:.4f}" if threshold is not None else ""
        st.download_button(f"Download the scores (CSV: path, score{verdicts})", lambda: out.read_bytes(),
                           f"run_{run_id}_folder_scores.csv", "text/csv", key="dl_folder_scores",
                           icon=":material/download:", on_click="ignore")


def _add(project_id: int, name: str, path: str, digest: str, label: str) -> None:
    try:
        user = auth.require("label").username
        dt = st.session_state.get("add_type") if label == "anomaly" else None
        msg = ingest.add_scored(project_id, path, digest, name, label, dt, user)
    except (ValueError, FileNotFoundError) as exc:
        st.session_state["add_msg"] = ("error", common.sentence(exc))
        return
    st.session_state["add_msg"] = ("success", msg)


def add_box(project_id: int, name: str, path: str, digest: str) -> None:
    """One click adds the scored image to the project with its label (once per content)."""
    with session_scope() as s:
        types = q.defect_types(s, project_id)
        same = q.image_by_hash(s, project_id, digest)
    st.markdown("**Add to the project**")
    kind, msg = st.session_state.pop("add_msg", (None, None))
    if kind == "error":
        st.error(msg, icon=":material/warning:")
    elif kind:
        st.success(msg, icon=":material/check_circle:")
    if same is not None:
        st.caption(f"Already in the project as `{same.rel_path}` ({same.label}).")
        return
    st.selectbox("Defect type (for an anomaly)", types, index=0 if types else None, accept_new_options=True,
                 placeholder="type a defect type", key="add_type")
    with st.container(horizontal=True):
        st.button("Add as normal", key="add_normal", icon=":material/check_circle:", on_click=_add,
                  args=(project_id, name, path, digest, "normal"))
        st.button("Add as anomaly", key="add_anomaly", icon=":material/report:", on_click=_add,
                  args=(project_id, name, path, digest, "anomaly"))


def drift_check(run, scores: np.ndarray) -> None:
    """These scores against the run's held-out normals: has the line drifted?"""
    from osad_core.drift import MIN_SCORES, compare

    with session_scope() as s:
        ref = sv.role_scores(s, run.id, "calibration")
    if not len(ref):
        return
    d = compare(ref, scores)
    if d is None:
        st.caption(f"Drift check: score at least {MIN_SCORES} images to compare them with the run's "
                   f"{len(ref)} held-out normals.")
        return
    (st.warning if d.drifted else st.caption)(d.sentence())
    both = pd.DataFrame({"score": np.r_[ref, scores], "rel_path": "",
                         "label_name": ["held-out normals (operating point)"] * len(ref) + ["these images"] * len(scores)})
    st.plotly_chart(figures.score_histogram(both, threshold=run.threshold, histnorm="probability",
                                            title="These images against the held-out normals"), key="drift_hist")


def scores_csv(run) -> str:
    """Every scored image of the run as CSV, each row naming what produced it (made when
    the download is asked for, not on every visit of the page)."""
    with session_scope() as s:
        rows = q.run_scores(s, run.id)
    df = pd.DataFrame(rows)
    if not df.empty:
        cols = ["image_id", "rel_path", "path", "score", "role", "label_at_run", "defect_type_at_run", "seen",
                "label", "defect_type", "split", "tsne_x", "tsne_y"]
        df = df[[c for c in cols if c in df.columns]]
        if run.threshold is not None:
            df["verdict"] = np.where(df["score"] >= run.threshold, "anomaly", "normal")
        # every row says what produced it
        for key, value in (("run_id", run.id), ("method", run.method), ("preset", run.preset),
                           ("protocol", fmt.protocol_text(run.protocol_json)), ("backbone", run.backbone),
                           ("weights", run.weights), ("device", run.device), ("threshold", run.threshold)):
            df[key] = value
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def export_tab(run) -> None:
    auth.require("export")
    with session_scope() as s:
        n = sv.ranked_count(s, run.id)
    c1, c2 = st.columns(2)
    c1.download_button(f"Scores of run {run.id} (CSV, {n:,} images)", lambda: scores_csv(run),
                       f"osad_run_{run.id}_scores.csv", "text/csv", key="dl_scores", icon=":material/description:",
                       on_click="ignore")
    if run.model_path and Path(run.model_path).is_file():
        path = Path(run.model_path)
        c2.download_button(f"Model of run {run.id} ({path.stat().st_size / 1e6:.1f} MB)",
                           lambda: path.read_bytes(), f"osad_run_{run.id}_{run.method}{path.suffix}",
                           "application/octet-stream", key="dl_model", icon=":material/model_training:",
                           on_click="ignore")
        st.caption("Load it with `osad_core.methods.load_detector(path)` or score folders with "
                   "`python -m osad_core score --model <file> <images>`.")
        onnx_export(run, path)
    else:
        c2.caption("No saved model for this run.")
    st.caption("Each CSV row names the run, method, preset, protocol, backbone weights and device that produced it.")


def onnx_export(run, model_path: Path) -> None:
    """ONNX for a line PC: the graph and its manifest (preprocessing, operating point)."""
    out = data_dir() / "exports" / f"run_{run.id}_{run.method}.onnx"
    if st.button("Export for a line PC (ONNX)", icon=":material/deployed_code:", key="onnx_export",
                 help="Scores with onnxruntime alone, no PyTorch: `python -m osad_core score --model <file>.onnx "
                      "<images>`. The operating point travels in the manifest, outside the graph."):
        from osad_core.export import NotExportable, export_onnx
        from osad_core.methods.base import load_detector

        try:
            with st.spinner("Tracing the model to ONNX…"):
                export_onnx(load_detector(model_path, "cpu"), out)
        except (NotExportable, ValueError, OSError) as exc:
            common.show_error(exc)
            return
    if out.is_file() and Path(str(out) + ".json").is_file():
        c1, c2 = st.columns(2)
        c1.download_button(f"{out.name} ({out.stat().st_size / 1e6:.1f} MB)", lambda: out.read_bytes(), out.name,
                           "application/octet-stream", key="dl_onnx", icon=":material/download:", on_click="ignore")
        c2.download_button(f"{out.name}.json (manifest, keep it next to the model)",
                           Path(str(out) + ".json").read_text(), f"{out.name}.json", "application/json",
                           key="dl_onnx_manifest", icon=":material/description:", on_click="ignore")


def main() -> None:
    project = common.require_project()
    if project is None:
        return
    st.title(f"Inspect · {project.name}")
    with session_scope() as s:
        done = [r.run for r in q.list_runs(s, project.id) if r.run.status == "done"]
    if not done:
        st.info("No finished run yet: heatmaps and scores appear after the first training run.")
        st.page_link(common.PAGES["train"], label="Go to Train", icon=":material/model_training:")
        return
    ids = [r.id for r in done]
    by_id = {r.id: r for r in done}
    if st.session_state.get("inspect_run") not in ids:
        st.session_state["inspect_run"] = ids[0]
    run_id = st.selectbox("Run", ids, key="inspect_run", format_func=lambda i: fmt.run_title(by_id[i]))
    run = by_id[run_id]
    st.caption(fmt.provenance(run))
    warn = fmt.weights_warning(run)
    if warn:
        st.error(warn, icon=":material/error:")
    tabs = {"Images by score": browse_tab, "Score new images": score_tab, "Score a server folder": folder_score_tab,
            "Export": export_tab}
    if not auth.can("score"):
        tabs.pop("Score new images")
    if not auth.can("import_folder"):  # reading the server's disks is for admins only
        tabs.pop("Score a server folder")
    if not auth.can("export"):
        tabs.pop("Export")
    for tab, draw in zip(st.tabs(list(tabs)), tabs.values()):
        with tab:
            draw(run)


common.run_page(main)
