"""OSAD Studio's detection library: data, protocols, detectors, training, evaluation.

No Streamlit and no database code here except in the CLI/worker glue (``store``,
``worker``), so the library serves notebooks, the CLI, the worker and tests alike.
"""
__version__ = "0.1.0"
