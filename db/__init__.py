"""Database layer of OSAD Studio: models, engine/session set-up, migrations, queries.

``from db import init_db, session_scope, queries`` is the usual entry point; all SQL
lives in :mod:`db.queries`.
"""

from . import heatmaps, masks, models, queries, users
from .engine import (
    data_dir,
    database_url,
    dispose_engines,
    get_engine,
    init_db,
    make_engine,
    session_scope,
)
from .heatmaps import decode_map, decode_vector, encode_map, encode_vector
from .models import (
    LABELS,
    SPLITS,
    Base,
    Curve,
    Embedding,
    Heatmap,
    Image,
    ImageScore,
    Job,
    LabelEvent,
    LoginFailure,
    MaskEvent,
    Metric,
    Project,
    Run,
    TrainLog,
    User,
    Worker,
    utcnow,
)
from .queries import *  # noqa: F403  (query helpers are part of the package API)
from .queries import ImageRow, RunSummary

__all__ = [
    "Base",
    "Curve",
    "Embedding",
    "Heatmap",
    "Image",
    "ImageRow",
    "ImageScore",
    "Job",
    "LABELS",
    "LabelEvent",
    "LoginFailure",
    "MaskEvent",
    "Metric",
    "Project",
    "Run",
    "RunSummary",
    "SPLITS",
    "TrainLog",
    "User",
    "Worker",
    "data_dir",
    "database_url",
    "decode_map",
    "decode_vector",
    "dispose_engines",
    "encode_map",
    "encode_vector",
    "get_engine",
    "heatmaps",
    "init_db",
    "make_engine",
    "masks",
    "models",
    "queries",
    "session_scope",
    "users",
    "utcnow",
    *queries.__all__,
]
