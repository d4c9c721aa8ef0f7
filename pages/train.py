"""Train: one form, one button. The page queues a job; a worker process trains.

Job cards poll the job rows (a fragment, so only the cards refresh): the stage and its
step counter, loss, elapsed time and the stage's ETA, a loss sparkline, Cancel. Reloading the page or closing the
browser loses nothing — the job lives in the database and the worker is its own process.
"""
from __future__ import annotations

import html

import streamlit as st

from db import session_scope
from db import queries as q
from osad_core.data import DataError
from osad_core.names import DEFAULT_METHOD
from osad_core.progress import finite_metrics, progress_text
from ui import auth, common, figures, fmt, training

PRESET_ORDER = ("quick", "paper", "tiny")


def _presets(method: str) -> list[str]:
    from osad_core.methods.base import REGISTRY

    names = list(REGISTRY[method].presets)
    return sorted(names, key=lambda p: (PRESET_ORDER.index(p) if p in PRESET_ORDER else 99, p))


def _preset_note(method: str, preset: str) -> str:
    """What the preset means for this method (shown under its name)."""
    from osad_core.methods.base import REGISTRY

    return (getattr(REGISTRY[method], "preset_notes", {}) or {}).get(preset, "")


def availability_panel(av: training.Availability) -> None:
    c = st.columns(5)
    c[0].metric("Normal · training", f"{av.normal_train:,}")
    c[1].metric("Normal · held out", f"{av.normal_test:,}")
    c[2].metric("Anomalies tagged for training", f"{av.n_tagged:,}",
                help=", ".join(f"{t}: {n}" for t, n in av.tagged.items()) or "none")
    c[3].metric("Anomalies held out", f"{av.n_held_out:,}",
                help=", ".join(f"{t}: {n}" for t, n in av.held_out.items()) or "none")
    c[4].metric("Unlabelled (scored, not used)", f"{av.unlabeled:,}")
    types = sorted(set(av.tagged) | set(av.held_out))
    if types:
        st.markdown("Shots available by defect type: " + " ".join(
            f'<span class="osad-chip anomaly">{html.escape(t)}: {av.tagged.get(t, 0)} tagged + {av.held_out.get(t, 0)} held out'
            f"</span>" for t in types), unsafe_allow_html=True)


def train_form(project_id: int, av: training.Availability) -> None:
    from osad_core.methods.base import available_methods

    methods = available_methods()
    compute = common.compute_info()
    with st.container(border=True, key="train_form"):
        c1, c2 = st.columns([3, 2])
        with c1:
            method = st.selectbox("Method", list(methods), format_func=lambda m: methods[m], key="t_method",
                                  index=list(methods).index(DEFAULT_METHOD) if DEFAULT_METHOD in methods else 0)
            presets = _presets(method)
            if st.session_state.get("t_preset") not in presets:
                st.session_state["t_preset"] = presets[0]
            # the option's label is the same for every method and its method-specific note a
            # caption: the radio's value is its label, so a click sent while the page still
            # showed the previous method's labels is not lost when the method changes
            preset = st.radio("Preset", presets, format_func=lambda p: fmt.PRESET_HINTS.get(p, p), key="t_preset",
                              captions=[_preset_note(method, p) for p in presets])
        with c2:
            seed = st.number_input("Seed", 0, 2**31 - 1, 42, step=1, key="t_seed",
                                   help="Same seed and labels on a CPU repeat a run exactly.")
            device = st.selectbox(
                "Device", compute["options"], key="t_device",
                format_func=lambda d: f"auto — found {compute['label']}" if d == "auto" else d)
            backbones = training.backbone_choices()
            backbone = st.selectbox("Backbone", list(backbones), format_func=backbones.get, key="t_backbone",
                                    help="Frozen ImageNet features the detector builds on; a larger one is "
                                         "slower (docs/BENCHMARKS.md).")
        c3, c4, c5 = st.columns(3)
        setting = c3.radio("Protocol", list(training.SETTING_HINTS), format_func=training.SETTING_HINTS.get,
                           key="t_setting", help="The papers' protocols. The hard setting trains on one defect "
                                                 "type and measures how well every other (unseen) type is caught.")
        known = None
        types = av.types
        if setting == "hard":
            if len(types) < 2:
                c4.warning("The hard setting needs labelled anomalies of at least two defect types.")
            else:
                known = c4.selectbox("Known defect type", types, key="t_known")
        pool = (av.tagged.get(known, 0) + av.held_out.get(known, 0)) if known else av.n_tagged + av.n_held_out
        default = min(av.default_shots(), pool) if not known else min(10, pool)
        shots = c5.number_input("Labelled anomalies (shots)", 0, max(pool, 0), default, step=1,
                                key=f"t_shots_{setting}_{known}_{pool}",
                                help="Anomalies you tagged for training are used first; the rest are drawn "
                                     "(with the seed) from held-out anomalies, which then leave the test set.")
        tagged = av.tagged.get(known, 0) if known else av.n_tagged
        from_tagged = min(shots, tagged)
        drawn = shots - from_tagged
        st.caption(f"{from_tagged} tagged for training + {drawn} drawn from held-out anomalies"
                   + (f" of type {known}" if known else ""))

        req = training.TrainRequest(project_id, method, preset, int(seed), device, setting, int(shots), known,
                                    backbone)
        problem = None
        try:
            summary, warnings = training.check(req)
        except DataError as exc:
            problem = common.sentence(exc)
        else:
            st.markdown(f"**Plan:** {summary}")
            for w in warnings:
                st.warning(w, icon=":material/warning:")
        if problem:
            st.error(problem, icon=":material/warning:")
        if st.button("Train", type="primary", key="train_button", icon=":material/rocket_launch:",
                     disabled=problem is not None):
            try:
                run_id, job_id = training.enqueue(req, auth.actor())
            except (DataError, ValueError) as exc:
                common.show_error(exc)
            else:
                st.toast(f"Run {run_id} queued — a worker picks it up.", icon=":material/rocket_launch:")
                st.session_state.setdefault("watched_jobs", {})[job_id] = run_id


def _cancel(job_id: int) -> None:
    try:
        status = training.cancel(job_id, auth.actor())
    except ValueError as exc:
        st.session_state["train_note"] = common.sentence(exc)
        return
    st.session_state["train_note"] = (f"Job {job_id}: cancelled." if status == "cancelled"
                                      else f"Job {job_id}: cancelling — the worker stops at its next step.")


def job_card(j: dict) -> None:
    p = j["progress"]
    with st.container(border=True, key=f"job_{j['job_id']}"):
        head, btn = st.columns([5, 1], vertical_alignment="center")
        proto = fmt.protocol_text(j["protocol"])
        by = f" · by {j['created_by']}" if j.get("created_by") else ""
        if j["status"] == "running":
            head.markdown(f":material/settings: **Run {j['run_id']}** · {j['method']} · {j['preset']} · {proto} · "
                          f"project {j['project']}{by}")
        else:
            head.markdown(f":material/hourglass_empty: **Run {j['run_id']}** · {j['method']} · {j['preset']} · "
                          f"{proto} · "
                          f"project {j['project']}{by} — waiting, position **{j['position']}** in the queue")
        if j["cancel_requested"]:
            btn.caption("cancelling…")
        elif auth.can("cancel"):
            btn.button("Cancel", key=f"cancel_{j['job_id']}", on_click=_cancel, args=(j["job_id"],),
                       icon=":material/stop_circle:")
        if j["status"] != "running":
            return
        frac = float(p.get("fraction") or 0.0)
        st.progress(min(1.0, max(0.0, frac)), text=f"{frac * 100:.0f} % · {progress_text(p)}")
        c = st.columns(5)
        if p.get("stage"):
            c[0].metric("Stage", f"{p.get('stage_index', 1)} / {p.get('stage_count', 1)}", help=p["stage"])
        if p.get("total"):
            c[1].metric("Step in stage", f"{int(p.get('step') or 0):,} / {int(p['total']):,}")
        loss = finite_metrics(p.get("metrics")).get("loss")
        if loss is not None:
            c[2].metric("Loss", fmt.num(loss, 4), help="training loss of the last step")
        c[3].metric("Elapsed", fmt.duration_short(p.get("elapsed_s")))
        if p.get("eta_s") is not None:
            c[4].metric("Stage ETA", fmt.duration_short(p.get("eta_s")),
                        help="time left in this stage, from its pace so far")
        if j["run_id"]:
            with session_scope() as s:
                log = q.train_log(s, j["run_id"])
            if len(log) >= 2:
                st.plotly_chart(figures.loss_sparkline(log), key=f"spark_{j['job_id']}",
                                config={"displayModeBar": False})


@st.fragment(run_every=1.5)
def jobs_panel(project_id: int) -> None:
    note = st.session_state.pop("train_note", None)
    if note:
        st.info(note)
    jobs = training.active_jobs()
    mine = [j for j in jobs if j["project_id"] == project_id]
    others = len(jobs) - len(mine)
    watched = st.session_state.setdefault("watched_jobs", {})
    for j in jobs:
        watched.setdefault(j["job_id"], j["run_id"])
    active_ids = {j["job_id"] for j in jobs}
    finished = [jid for jid in watched if jid not in active_ids]
    if finished:
        for jid in finished:
            watched.pop(jid, None)
        st.rerun(scope="app")  # a job ended: refresh the run list below
    st.subheader("Jobs")
    if not jobs:
        st.caption("No job running or waiting.")
        return
    if others:
        st.caption(f"{others} job{'s' if others != 1 else ''} of other projects in the queue (one worker runs "
                   "jobs in order).")
    for j in mine:
        job_card(j)


def _retrain(run_id: int) -> None:
    try:
        new_run, job_id = training.retrain(run_id, auth.actor())
    except (DataError, ValueError) as exc:
        st.session_state["train_error"] = common.sentence(exc)
        return
    st.session_state.setdefault("watched_jobs", {})[job_id] = new_run
    st.session_state["train_note"] = f"Run {new_run} queued: run {run_id}'s configuration on today's labels."


def _open_results(run_id: int) -> None:
    st.session_state["results_pick"] = run_id


def recent_runs(project_id: int) -> None:
    with session_scope() as s:
        runs = q.list_runs(s, project_id)[:8]
    st.subheader("Recent runs")
    if not runs:
        st.caption("No runs yet.")
        return
    for r in runs:
        run = r.run
        with st.container(border=True, key=f"recent_{run.id}"):
            c1, c2, c3 = st.columns([5, 1, 1], vertical_alignment="center")
            auroc = r.metrics.get("image_auroc")
            text = (f"{fmt.STATUS_ICONS.get(run.status, '')} **{fmt.run_title(run)}** · {run.status}"
                    + (f" · AUROC **{fmt.num(auroc)}**" if auroc is not None else "")
                    + f" · {fmt.protocol_text(run.protocol_json)}" + (f" · {run.device}" if run.device else "")
                    + f" · {fmt.ago(run.created_at)}" + (f" by {run.created_by}" if run.created_by else ""))
            c1.markdown(text)
            if run.error:
                c1.caption(f":material/warning: {run.error}")
            skipped = fmt.skipped_text(run)
            if skipped:
                c1.caption(f":material/warning: {skipped}")
            if run.status == "done":
                if c2.button("Results", key=f"res_{run.id}", on_click=_open_results, args=(run.id,)):
                    st.switch_page(common.PAGES["results"])
            if run.status in ("done", "failed", "cancelled") and auth.can("train"):
                c3.button("Retrain", key=f"retrain_{run.id}", on_click=_retrain, args=(run.id,),
                          icon=":material/replay:", help="Repeat this configuration on the current labels")


def main() -> None:
    project = common.require_project()
    if project is None:
        return
    st.title(f"Train · {project.name}")
    err = st.session_state.pop("train_error", None)
    if err:
        st.error(err, icon=":material/warning:")
    av = training.availability(project.id)
    availability_panel(av)
    if auth.can("train"):
        train_form(project.id, av)
    else:
        st.info("Read only: your role can follow jobs and runs but not start or cancel training.")
    jobs_panel(project.id)
    recent_runs(project.id)


common.run_page(main)
