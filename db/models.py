"""SQLAlchemy models of OSAD Studio.

Everything the app knows lives in these tables: projects and their images (files stay
on disk, the table holds paths and content hashes), the append-only label history,
training runs with their metrics, curves, per-image scores, compact heatmaps and
embeddings, training logs, and the job queue that the app and the workers share.

Enumerated values are plain strings checked in :mod:`db.queries` (the tuples below are
the allowed values); only the domain-closed ``label`` and ``split`` columns also carry
CHECK constraints. Keep the schema in step with ``db/migrations/versions``: the test
suite compares both.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# --- allowed values -----------------------------------------------------------------

LABELS = ("normal", "anomaly", "unlabeled")
SPLITS = ("train", "test")
PROJECT_SOURCES = ("folder", "upload", "elpv", "headct", "cli")
STATUSES = ("queued", "running", "done", "failed", "cancelled")
RUN_STATUSES = STATUSES
JOB_STATUSES = STATUSES
TERMINAL_STATUSES = ("done", "failed", "cancelled")
RUN_SOURCES = ("app", "cli", "benchmark")
WEIGHTS_SOURCES = ("explicit", "torchvision", "efficientnet_lite0_package", "efficientnet_lite1_package",
                   "efficientnet_lite2_package", "random")
JOB_KINDS = ("train", "score", "import")  # import: a large server folder, in batches
# calibration: training normals held out from fitting; they set the operating point
SCORE_ROLES = ("train_normal", "train_anomaly", "calibration", "test", "scored")
CURVE_KINDS = ("roc", "pr")
ROLES = ("admin", "labeller", "viewer")

# Deterministic constraint names: Alembic's batch mode on SQLite can only drop or
# alter constraints that have names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (the only kind of timestamp stored)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type: values are stored as naive UTC text (which also keeps
    string comparisons in ``WHERE heartbeat_at < :cutoff`` correct) and come back with
    ``tzinfo=UTC``. PostgreSQL uses ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _fk(target: str, nullable: bool = False, ondelete: str = "CASCADE") -> Any:
    return mapped_column(Integer, ForeignKey(target, ondelete=ondelete), nullable=nullable)


# --- projects and images ------------------------------------------------------------


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("name", name="uq_projects_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    root_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    images: Mapped[list[Image]] = relationship(
        back_populates="project", passive_deletes=True, cascade="all, delete-orphan"
    )
    runs: Mapped[list[Run]] = relationship(
        back_populates="project", passive_deletes=True, cascade="all, delete-orphan"
    )

    def __repr__(self) -> str:
        return f"Project(id={self.id}, name={self.name!r}, source={self.source!r})"


class Image(Base):
    """One image file of a project, with its *current* label state.

    The label columns are a cache of the latest :class:`LabelEvent` for the image;
    :mod:`db.queries` updates both in the same transaction.
    """

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "path", name="uq_images_project_id_path"),
        Index("ix_images_project_id_label", "project_id", "label"),
        Index("ix_images_project_id_split", "project_id", "split"),
        Index("ix_images_project_id_rel_path", "project_id", "rel_path"),
        Index("ix_images_content_hash", "content_hash"),
        # for projects of 100,000 images (migration 0004_scale): counts from the index
        # alone, and a label / split filter sorted by name read in index order
        Index("ix_images_project_id_label_defect_type_split", "project_id", "label", "defect_type", "split"),
        Index("ix_images_project_id_label_rel_path", "project_id", "label", "rel_path"),
        Index("ix_images_project_id_split_rel_path", "project_id", "split", "rel_path"),
        Index("ix_images_project_id_defect_type", "project_id", "defect_type"),
        CheckConstraint("label IN ('normal', 'anomaly', 'unlabeled')", name="label"),
        CheckConstraint("split IN ('train', 'test')", name="split"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = _fk("projects.id")
    path: Mapped[str] = mapped_column(Text, nullable=False)
    rel_path: Mapped[str] = mapped_column(Text, nullable=False)
    content_hash: Mapped[str | None] = mapped_column(String(40), nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mask_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    label: Mapped[str] = mapped_column(String(16), nullable=False, default="unlabeled")
    defect_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    split: Mapped[str] = mapped_column(String(8), nullable=False, default="train")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    project: Mapped[Project] = relationship(back_populates="images")

    def __repr__(self) -> str:
        return f"Image(id={self.id}, rel_path={self.rel_path!r}, label={self.label!r})"


class LabelEvent(Base):
    """Append-only label history; one user action is one ``batch_id``.

    ``previous_*`` hold the image state before the event (all NULL for the event that
    created the image). An undo is itself a batch whose events carry
    ``reverts_batch_id``, so history is never rewritten.
    """

    __tablename__ = "label_events"
    __table_args__ = (
        Index("ix_label_events_project_id_id", "project_id", "id"),
        Index("ix_label_events_image_id", "image_id"),
        Index("ix_label_events_batch_id", "batch_id"),
        Index("ix_label_events_reverts_batch_id", "reverts_batch_id"),
        CheckConstraint("label IN ('normal', 'anomaly', 'unlabeled')", name="label"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = _fk("projects.id")
    image_id: Mapped[int] = _fk("images.id")
    batch_id: Mapped[str] = mapped_column(String(36), nullable=False)
    label: Mapped[str] = mapped_column(String(16), nullable=False)
    defect_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    split: Mapped[str] = mapped_column(String(8), nullable=False)
    previous_label: Mapped[str | None] = mapped_column(String(16), nullable=True)
    previous_defect_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    previous_split: Mapped[str | None] = mapped_column(String(8), nullable=True)
    author: Mapped[str] = mapped_column(String(200), nullable=False, default="user")
    reverts_batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class MaskEvent(Base):
    """Append-only history of an image's defect mask; ``images.mask_path`` caches the latest.

    ``path`` is the PNG drawn in the app (under the data dir) or NULL for "no mask";
    ``previous_path`` is what the image had before (an imported ``ground_truth`` mask,
    an earlier drawing or NULL). An undo is itself an event carrying ``reverts_id``.
    """

    __tablename__ = "mask_events"
    __table_args__ = (
        Index("ix_mask_events_image_id_id", "image_id", "id"),
        Index("ix_mask_events_project_id", "project_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = _fk("projects.id")
    image_id: Mapped[int] = _fk("images.id")
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    previous_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    author: Mapped[str] = mapped_column(String(200), nullable=False, default="user")
    reverts_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


# --- runs and their artefacts -------------------------------------------------------


class Run(Base):
    """One training (or scoring) run of a detector on a project."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_project_id_id", "project_id", "id"),
        Index("ix_runs_status", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = _fk("projects.id")
    method: Mapped[str] = mapped_column(String(64), nullable=False)
    preset: Mapped[str | None] = mapped_column(String(64), nullable=True)
    config_json: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    protocol_json: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    backbone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    weights: Mapped[str | None] = mapped_column(Text, nullable=True)
    weights_source: Mapped[str | None] = mapped_column(String(32), nullable=True)
    device: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(16), nullable=False, default="app")
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    infer_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_train_normal: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_train_anomaly: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_test: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seen_defect_types: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # who queued or ran it: the logged-in user, the free-text name when login is off,
    # "cli:<OS user>" from the command line; NULL for runs made before accounts existed
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)

    project: Mapped[Project] = relationship(back_populates="runs")

    def __repr__(self) -> str:
        return f"Run(id={self.id}, method={self.method!r}, status={self.status!r})"


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_metrics_run_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    # NULL stands for an undefined value (e.g. AUROC with one class only).
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class Curve(Base):
    __tablename__ = "curves"
    __table_args__ = (UniqueConstraint("run_id", "kind", name="uq_curves_run_id_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    kind: Mapped[str] = mapped_column(String(8), nullable=False)
    x: Mapped[list[float]] = mapped_column(JSON, nullable=False)
    y: Mapped[list[float]] = mapped_column(JSON, nullable=False)
    thresholds: Mapped[list[float | None]] = mapped_column(JSON, nullable=False)


class ImageScore(Base):
    __tablename__ = "image_scores"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", name="uq_image_scores_run_id_image_id"),
        Index("ix_image_scores_run_id_score", "run_id", "score"),
        # one role's scores of a run in score order (migration 0005_score_views)
        Index("ix_image_scores_run_id_role_score", "run_id", "role", "score"),
        Index("ix_image_scores_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    image_id: Mapped[int] = _fk("images.id")
    score: Mapped[float] = mapped_column(Float, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    label_at_run: Mapped[str] = mapped_column(String(16), nullable=False)
    defect_type_at_run: Mapped[str | None] = mapped_column(String(200), nullable=True)
    seen: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    tsne_x: Mapped[float | None] = mapped_column(Float, nullable=True)
    tsne_y: Mapped[float | None] = mapped_column(Float, nullable=True)


class Heatmap(Base):
    """Anomaly map as an 8-bit grayscale PNG; 0 and 255 stand for ``vmin``/``vmax``."""

    __tablename__ = "heatmaps"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", name="uq_heatmaps_run_id_image_id"),
        Index("ix_heatmaps_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    image_id: Mapped[int] = _fk("images.id")
    png: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    vmin: Mapped[float] = mapped_column(Float, nullable=False)
    vmax: Mapped[float] = mapped_column(Float, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)


class Embedding(Base):
    """Feature vector of an image under a run, stored as little-endian float16."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("run_id", "image_id", name="uq_embeddings_run_id_image_id"),
        Index("ix_embeddings_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    image_id: Mapped[int] = _fk("images.id")
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(String(128), nullable=False, default="embedding")


class TrainLog(Base):
    __tablename__ = "train_logs"
    __table_args__ = (Index("ix_train_logs_run_id_id", "run_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = _fk("runs.id")
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    elapsed_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


# --- job queue and workers ----------------------------------------------------------


class Job(Base):
    """A unit of background work (training or scoring) claimed by one worker.

    ``attempts`` counts how many times a worker has claimed the job.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_kind_id", "kind", "id"),
        Index("ix_jobs_run_id", "run_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int | None] = _fk("runs.id", nullable=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    payload_json: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="queued")
    progress_json: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind!r}, status={self.status!r})"


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    hostname: Mapped[str] = mapped_column(String(255), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    current_job_id: Mapped[int | None] = _fk("jobs.id", nullable=True, ondelete="SET NULL")
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def __repr__(self) -> str:
        return f"Worker(id={self.id!r}, stopped={self.stopped_at is not None})"


# --- accounts -----------------------------------------------------------------------


class User(Base):
    """An account of the app. Only an Argon2 hash of the password is stored; accounts
    are disabled, never deleted, so the history keeps naming real users."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("username", name="uq_users_username"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    def __repr__(self) -> str:
        return f"User(username={self.username!r}, role={self.role!r}, disabled={self.disabled})"


class LoginFailure(Base):
    """One failed login, kept for the rate limit (shared by every app process)."""

    __tablename__ = "login_failures"
    __table_args__ = (
        Index("ix_login_failures_username_created_at", "username", "created_at"),
        Index("ix_login_failures_client_created_at", "client", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(200), nullable=False)
    client: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


ALL_TABLES = tuple(Base.metadata.tables)
