"""OSAD Studio — the Streamlit entry point.

    make run            # sets up .venv and starts the app
    streamlit run app.py

The login gate (``ui/auth.py``), navigation between the screens in ``pages/`` and the
global sidebar (who is logged in or your name, project, compute, worker state, backbone
weights, database). Pages are thin: they
read through ``db.queries``, call ``osad_core`` and draw with Plotly/Streamlit.
Training never runs here: the Train page queues a job and a worker process runs it.
"""
from __future__ import annotations

import logging

import streamlit as st

from db import init_db
from ui import auth, common, sidebar

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

st.set_page_config(page_title="OSAD Studio", page_icon=str(common.ASSETS / "icon.svg"), layout="wide")
init_db()  # creates / migrates the database on first start; a no-op afterwards
st.logo(str(common.ASSETS / "logo.svg"), size="large")
common.inject_css()
account = auth.gate()  # logged-out visitors get the login form and nothing else

pages = [
    st.Page(common.PAGES["projects"], title="Projects", icon=":material/folder:", url_path="projects", default=True),
    st.Page(common.PAGES["label"], title="Label", icon=":material/label:", url_path="label"),
    st.Page(common.PAGES["train"], title="Train", icon=":material/model_training:", url_path="train"),
    st.Page(common.PAGES["results"], title="Results", icon=":material/monitoring:", url_path="results"),
    st.Page(common.PAGES["inspect"], title="Inspect", icon=":material/biotech:", url_path="inspect"),
]
if account is not None and account.can("manage_users"):
    pages.append(st.Page(common.PAGES["users"], title="Users", icon=":material/group:", url_path="users"))
page = st.navigation(pages)

with st.sidebar:
    top = st.container()
    facts = st.container()
with top:
    auth.sidebar_box(account)
    sidebar.render_top()

page.run()

# Filled after the page so the first paint never waits for torch to load (compute and
# weights are resolved once per server process and cached).
with facts:
    sidebar.render_facts()
