"""Page chrome shared by every screen: current project, user name, environment facts,
and one-sentence error messages."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import streamlit as st

from db import session_scope
from db import queries as q

ASSETS = Path(__file__).resolve().parents[1] / "assets"

PAGES = {
    "projects": "pages/projects.py",
    "label": "pages/label.py",
    "train": "pages/train.py",
    "results": "pages/results.py",
    "inspect": "pages/inspect.py",
    "users": "pages/users.py",
}


def ensure_navigation() -> None:
    """Run the page through ``app.py`` when Streamlit ran it directly.

    Streamlit treats a ``pages/`` folder as its old multipage mode until the entry
    point has called ``st.navigation`` once in the server process (and in every
    ``AppTest`` run), and then executes a page file on its own, without the sidebar.
    Running ``app.py`` here registers the navigation, which runs this same page again
    inside it; the outer run then stops. No rerun, so a click is never lost.
    """
    import runpy

    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        runpy.run_path(str(ASSETS.parent / "app.py"), run_name="__main__")
        st.stop()


# --- who and what ---------------------------------------------------------------------------


def default_user() -> str:
    return (os.environ.get("OSAD_USER") or os.environ.get("USER") or "inspector").strip() or "inspector"


def free_text_name() -> str:
    """"Your name" in the sidebar, used while login is off."""
    name = str(st.session_state.get("user_name") or "").strip()
    return name or default_user()


def user_name() -> str:
    """The name that goes into the label history and onto runs and jobs: the logged-in
    user, or "Your name" while login is off."""
    from . import auth

    return auth.actor().username


def current_project_id() -> int | None:
    pid = st.session_state.get("project_id")
    return int(pid) if pid is not None else None


def set_project(project_id: int | None) -> None:
    if st.session_state.get("project_id") != project_id:
        st.session_state["project_id"] = project_id
        # page-local state (selection, large view, filters' page) belongs to one project
        for key in ("selected", "focus_idx", "label_page", "inspect_image_id", "tsne_image_id"):
            st.session_state.pop(key, None)


def current_project() -> Any | None:
    pid = current_project_id()
    if pid is None:
        return None
    with session_scope() as s:
        return q.get_project(s, pid)


def require_project():
    """The current project, or a hint to create/choose one (returns None then)."""
    project = current_project()
    if project is None:
        st.info("Choose a project in the sidebar, or create one first.")
        st.page_link(PAGES["projects"], label="Go to Projects", icon=":material/folder:")
    return project


# --- environment (cached once per server process) ----------------------------------------


@st.cache_resource(show_spinner=False)
def compute_info() -> dict[str, Any]:
    """What ``device=auto`` finds, and which explicit devices exist here."""
    import torch

    from osad_core.train import describe_device, resolve_device

    dev = resolve_device("auto")
    options = ["auto", "cpu"]
    if torch.cuda.is_available():
        options.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        options.append("mps")
    return {"device": dev.type, "label": describe_device(dev), "options": options}


def default_method_backbone() -> tuple[str, str]:
    """(method, backbone) the Train page starts from: the default method's own backbone
    (Fusion: EfficientNet-Lite2), not what ``auto`` picks for the DRA family."""
    from osad_core.methods import make_detector
    from osad_core.names import DEFAULT_METHOD

    # building a detector only copies its configuration: no network, no weights
    return DEFAULT_METHOD, str(make_detector(DEFAULT_METHOD).config.get("backbone", "auto"))


@st.cache_resource(show_spinner=False)
def weights_info():
    """The backbone and weights a run of the default method would use now
    (``describe_available_weights``), with ``method`` naming that method."""
    from osad_core.backbones import describe_available_weights

    try:
        method, backbone = default_method_backbone()
        info = describe_available_weights(backbone)
    except Exception as exc:  # weights must never take the app down
        return type("Missing", (), {"name": "unknown", "weights": f"could not be resolved ({exc})",
                                    "weights_source": "random", "warning": str(exc), "pretrained": False,
                                    "method": None})()
    info.method = method
    return info


def database_location() -> str:
    from sqlalchemy.engine import make_url

    from db.engine import data_dir, database_url

    url = database_url()
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return f"{url.split('://')[0]}://… (data dir {data_dir()})"


# --- messages -------------------------------------------------------------------------------


def sentence(exc: BaseException | str) -> str:
    """A user-facing one-sentence message from an exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def run_page(main) -> None:
    """Draw a page; an unexpected error becomes one sentence on screen (the traceback
    goes to the server log), never a stack trace in front of an inspector."""
    import logging

    ensure_navigation()
    from . import auth

    if auth.login_required() and auth.current() is None:
        st.stop()  # app.py's gate already showed the login form; never draw a page past it
    try:
        main()
    except Exception as exc:  # Streamlit's rerun/stop are BaseExceptions and pass through
        logging.getLogger("osad.app").exception("page failed")
        st.error(f"Something went wrong on this page: {sentence(exc)} The details are in the server log.",
                 icon=":material/warning:")


def show_error(exc: BaseException | str) -> None:
    st.error(sentence(exc), icon=":material/warning:")


def inject_css() -> None:
    css = (ASSETS / "style.css").read_text()
    st.markdown(f"<style>{css}</style>", unsafe_allow_html=True)
