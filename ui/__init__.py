"""Shared helpers of the OSAD Studio pages.

Modules without Streamlit (``ingest``, ``thumbs``, ``figures``, ``fmt``, ``training``)
hold the logic and are tested directly; ``common`` and ``sidebar`` hold the pieces of
page chrome every screen shares.
"""
