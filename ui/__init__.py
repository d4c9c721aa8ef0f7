"""Shared helpers of the OSAD Studio pages.

Modules without Streamlit (``ingest``, ``thumbs``, ``figures``, ``fmt``, ``training``)
hold the logic and are tested directly; ``common`` and ``sidebar`` hold the pieces of
page chrome every screen shares; ``label_grid``, ``label_view`` and ``label_actions`` the
Label page's grid, large view and button actions; ``browser_events`` the two browser
events Streamlit does not report (a Shift-click, a pointer resting on a chart point).
"""
