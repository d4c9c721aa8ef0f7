"""Projects: create (server folder, upload, ELPV demo), list with counts, delete."""
from __future__ import annotations

import html

import streamlit as st

from db import session_scope
from db import queries as q
from osad_core.data import DataError
from ui import auth, common, fmt, ingest, training


def _flash() -> None:
    msg = st.session_state.pop("projects_flash", None)
    if msg:
        st.success(msg, icon=":material/check_circle:")
    err = st.session_state.pop("projects_error", None)
    if err:
        common.show_error(err)


def _created(c: ingest.Created) -> None:
    common.set_project(c.project_id)
    notes = " · ".join(c.notes)
    if c.job_id is not None:
        training.maybe_start_worker()
        st.session_state["projects_flash"] = f"Created project “{c.name}”. {notes}; its card shows the progress."
    else:
        st.session_state["projects_flash"] = (
            f"Created project “{c.name}” with {c.images:,} images in {c.seconds:.1f} s. {notes}")
    st.rerun()


@st.fragment(run_every=2.0)
def import_status(project_id: int) -> None:
    """The project's background import: files done, rate and ETA; cancel, or resume one
    that stopped (files already stored are skipped unread)."""
    with session_scope() as s:
        job = q.last_import_job(s, project_id)
    if job is None or job.status == "done":
        st.rerun()  # it just finished: redraw the card with its counts
    p = job.progress_json or {}
    active = job.status in ("queued", "running")
    with st.container(horizontal=True, vertical_alignment="center", key=f"import_{project_id}"):
        if job.status == "queued":
            st.caption("Import queued: waiting for the worker…", width="content")
            training.maybe_start_worker()
        elif active:
            eta = p.get("eta_s")
            text = (p.get("message") or "importing…") + (f" · about {fmt.duration_short(eta)} left" if eta else "")
            st.progress(float(p.get("fraction") or 0.0), text=f"Import: {text}")
        else:
            st.warning(f"Import {job.status}: {job.error or p.get('message') or ''}", icon=":material/warning:")
        if active and auth.can("import_folder") and not job.cancel_requested:
            st.button("Cancel import", key=f"import_cancel_{project_id}", icon=":material/stop:",
                      on_click=_cancel_import, args=(job.id,),
                      help="Stop after the current batch; what is imported stays and can be resumed")
        elif not active and auth.can("import_folder"):
            st.button("Resume import", key=f"import_resume_{project_id}", icon=":material/play_arrow:",
                      on_click=_resume_import, args=(project_id,),
                      help="Import the rest; files already in the project are skipped without reading them")


def _cancel_import(job_id: int) -> None:
    auth.require("import_folder")
    with session_scope() as s:
        q.request_cancel(s, job_id)


def _resume_import(project_id: int) -> None:
    try:
        ingest.resume_import(project_id, auth.require("import_folder").username)
    except ValueError as exc:
        st.session_state["projects_error"] = str(exc)
        return
    training.maybe_start_worker()


def _create_elpv() -> None:
    with st.spinner("Creating the ELPV demo project (2,624 images)…"):
        try:
            who = auth.require("create_project").username
            created = ingest.create_elpv_demo(author=who)
        except (DataError, ValueError) as exc:
            common.show_error(exc)
            return
    _created(created)


def hero() -> None:
    st.markdown(
        '<div class="osad-hero"><h3 style="margin-top:0">Welcome to OSAD Studio</h3>'
        "Tag a few defective images, retrain with one click, and see where and why the detector flags new "
        "images — including defect types nobody tagged.<br><br>"
        "Start with the built-in demo: <b>2,624 electroluminescence images of solar cells</b> "
        "(ELPV), normal cells and two defect types already labelled the way the papers use them.</div>",
        unsafe_allow_html=True,
    )
    st.write("")
    if not auth.can("create_project"):
        st.caption("No project yet; an admin or a labeller creates one.")
        return
    if st.button("Open the ELPV solar cells demo", type="primary", icon=":material/solar_power:", key="elpv_demo"):
        _create_elpv()


def _folder_tab() -> None:
    st.caption("MVTec layout is recognised: `train/good` → normal, `test/good` → normal held out for "
               "testing, `test/<type>` → anomaly of that type. Any other folder: all images unlabelled. "
               "Only folders below the server's import folders (`OSAD_IMPORT_ROOTS`, by default the "
               "data folder) can be read.")
    with st.form("from_folder", border=False):
        path = st.text_input("Folder path", placeholder="/data/parts/bottle", key="folder_path")
        name = st.text_input("Project name", placeholder="default: the folder's name", key="folder_name")
        go = st.form_submit_button("Create project", type="primary")
    if go:
        try:
            who = auth.require("import_folder").username
            with st.spinner("Reading the folder…"):
                created = ingest.create_from_folder(path, name, author=who)
        except (DataError, ValueError) as exc:
            common.show_error(exc)
        else:
            _created(created)


def _upload_tab() -> None:
    st.caption("Image files or a .zip (an MVTec-layout zip keeps its labels). Files are stored under "
               "the data folder's `uploads/`.")
    with st.form("from_upload", border=False, clear_on_submit=False):
        name = st.text_input("Project name", key="upload_name")
        files = st.file_uploader("Images or a zip", accept_multiple_files=True, key="upload_files")
        go = st.form_submit_button("Create project", type="primary")
    if go:
        try:
            who = auth.require("upload").username
            with st.spinner("Checking and storing the images…"):
                created = ingest.create_from_uploads(
                    [(f.name, f.getvalue()) for f in files or []], name, author=who)
        except (DataError, ValueError) as exc:
            common.show_error(exc)
        else:
            _created(created)


def _elpv_tab(has_elpv: bool) -> None:
    if has_elpv:
        st.info(f"The demo project “{ingest.ELPV_DEMO_NAME}” already exists.")
    else:
        st.caption("2,624 solar-cell images from the `elpv-dataset` package; normal = defect probability "
                   "0 (75 % train / 25 % held out), anomalies mono / poly, 401 uncertain cells unlabelled.")
        if st.button("Create the ELPV demo project", key="elpv_tab"):
            _create_elpv()


def create_section(has_elpv: bool, expanded: bool) -> None:
    if not auth.can("create_project"):
        return
    tabs = {"From a folder on the server": _folder_tab, "Upload images or a zip": _upload_tab,
            "ELPV demo": lambda: _elpv_tab(has_elpv)}
    if not auth.can("import_folder"):  # reading the server's disks is for admins only
        tabs.pop("From a folder on the server")
    with st.expander("New project", icon=":material/add:", expanded=expanded):
        for tab, draw in zip(st.tabs(list(tabs)), tabs.values()):
            with tab:
                draw()


def _confirm_delete(p: dict) -> None:
    with st.container(border=True):
        st.warning(
            f"Delete “{p['name']}”? Its {p['images']:,} image records, all labels and their history, and every run "
            "with its results go with it. Image files on the server are not touched; uploaded files and model "
            "checkpoints in the data folder are removed.", icon=":material/delete:")
        c1, c2, _ = st.columns([1, 1, 4])
        if c1.button("Yes, delete", type="primary", key=f"del_yes_{p['id']}"):
            try:
                auth.require("delete_project")
                name = ingest.delete_project(p["id"])
            except ValueError as exc:
                common.show_error(exc)
                return
            st.session_state.pop("confirm_delete", None)
            if common.current_project_id() == p["id"]:
                common.set_project(None)
            st.session_state["projects_flash"] = f"Deleted project “{name}”."
            st.rerun()
        if c2.button("Cancel", key=f"del_no_{p['id']}"):
            st.session_state.pop("confirm_delete", None)
            st.rerun()


def project_card(p: dict, importing: bool = False) -> None:
    current = p["id"] == common.current_project_id()
    with st.container(border=True, key=f"project_{p['id']}"):
        head, actions = st.columns([5, 2], vertical_alignment="center")
        with head:
            badge = " &nbsp; :blue-badge[current]" if current else ""
            st.markdown(f"#### {p['name']}{badge}")
            st.caption(f"{p['source']} · {p['description'] or ''}"
                       + (f" · `{p['root_path']}`" if p["root_path"] and p["source"] != "elpv" else ""))
        # a row of buttons at their own widths: equal thirds cut "Delete" to "D…"
        with actions.container(horizontal=True, horizontal_alignment="right"):
            if st.button("Open", key=f"open_{p['id']}", type="primary" if current else "secondary",
                         help="Make this the current project and go to labelling"):
                common.set_project(p["id"])
                st.switch_page(common.PAGES["label"])
            if auth.can("train") and st.button("Train", key=f"train_{p['id']}"):
                common.set_project(p["id"])
                st.switch_page(common.PAGES["train"])
            if auth.can("delete_project") and st.button("Delete", key=f"delete_{p['id']}", icon=":material/delete:"):
                st.session_state["confirm_delete"] = p["id"]
        cols = st.columns(6)
        cols[0].metric("Images", f"{p['images']:,}")
        cols[1].metric("Normal", f"{p['normal']:,}",
                       help=f"{p['by_split']['train']['normal']:,} for training, "
                            f"{p['by_split']['test']['normal']:,} held out for testing")
        types = p["anomaly_by_type"]
        cols[2].metric("Anomaly", f"{p['anomaly']:,}",
                       help=", ".join(f"{t}: {n}" for t, n in sorted(types.items())) or "none yet")
        cols[3].metric("Unlabelled", f"{p['unlabeled']:,}")
        auroc = p["last_run_image_auroc"]
        last = (f"run {p['last_run_id']} · {p['last_run_method']} · {p['last_run_status']}"
                if p["last_run_id"] else "no run yet")
        cols[4].metric("Last run AUROC", fmt.num(auroc) if auroc is not None else "—", help=last)
        with cols[5]:
            st.caption("Anomalies by type")
            st.markdown(" ".join(f'<span class="osad-chip anomaly">{html.escape(t)} {n}</span>'
                                 for t, n in sorted(types.items()))
                        or "—", unsafe_allow_html=True)
        if importing:
            import_status(p["id"])
        if st.session_state.get("confirm_delete") == p["id"] and auth.can("delete_project"):
            _confirm_delete(p)


def main() -> None:
    st.title("Projects")
    _flash()
    with session_scope() as s:
        projects = q.list_projects(s)
        importing = {pid for pid, job in q.latest_jobs(s, "import", "project_id").items() if job.status != "done"}
    if not projects:
        hero()
    has_elpv = any(p["name"] == ingest.ELPV_DEMO_NAME for p in projects)
    create_section(has_elpv, expanded=not projects)
    if projects:
        st.subheader(f"{len(projects)} project{'s' if len(projects) != 1 else ''}")
        for p in projects:
            project_card(p, p["id"] in importing)


common.run_page(main)
