"""Initial schema: projects, images, label history, runs and artefacts, jobs, workers.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Migrations do not import db.models: they must keep describing this revision even
# after the models move on.
TS = sa.DateTime(timezone=True)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=f"pk_{table}")


def _fk(table: str, column: str, target: str, ondelete: str = "CASCADE") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=f"fk_{table}_{column}_{target}", ondelete=ondelete
    )


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("root_path", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        _pk("projects"),
        sa.UniqueConstraint("name", name="uq_projects_name"),
    )

    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("rel_path", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(40), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("mask_path", sa.Text(), nullable=True),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(200), nullable=True),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        _pk("images"),
        _fk("images", "project_id", "projects"),
        sa.UniqueConstraint("project_id", "path", name="uq_images_project_id_path"),
        sa.CheckConstraint("label IN ('normal', 'anomaly', 'unlabeled')", name="ck_images_label"),
        sa.CheckConstraint("split IN ('train', 'test')", name="ck_images_split"),
    )
    op.create_index("ix_images_project_id_label", "images", ["project_id", "label"])
    op.create_index("ix_images_project_id_split", "images", ["project_id", "split"])
    op.create_index("ix_images_project_id_rel_path", "images", ["project_id", "rel_path"])
    op.create_index("ix_images_content_hash", "images", ["content_hash"])

    op.create_table(
        "label_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("defect_type", sa.String(200), nullable=True),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("previous_label", sa.String(16), nullable=True),
        sa.Column("previous_defect_type", sa.String(200), nullable=True),
        sa.Column("previous_split", sa.String(8), nullable=True),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("reverts_batch_id", sa.String(36), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        _pk("label_events"),
        _fk("label_events", "project_id", "projects"),
        _fk("label_events", "image_id", "images"),
        sa.CheckConstraint(
            "label IN ('normal', 'anomaly', 'unlabeled')", name="ck_label_events_label"
        ),
    )
    op.create_index("ix_label_events_project_id_id", "label_events", ["project_id", "id"])
    op.create_index("ix_label_events_image_id", "label_events", ["image_id"])
    op.create_index("ix_label_events_batch_id", "label_events", ["batch_id"])
    op.create_index("ix_label_events_reverts_batch_id", "label_events", ["reverts_batch_id"])

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("preset", sa.String(64), nullable=True),
        sa.Column("config_json", sa.JSON(), nullable=False),
        sa.Column("protocol_json", sa.JSON(), nullable=False),
        sa.Column("backbone", sa.String(64), nullable=True),
        sa.Column("weights", sa.Text(), nullable=True),
        sa.Column("weights_source", sa.String(32), nullable=True),
        sa.Column("device", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("model_path", sa.Text(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("train_seconds", sa.Float(), nullable=True),
        sa.Column("infer_seconds", sa.Float(), nullable=True),
        sa.Column("n_train_normal", sa.Integer(), nullable=True),
        sa.Column("n_train_anomaly", sa.Integer(), nullable=True),
        sa.Column("n_test", sa.Integer(), nullable=True),
        sa.Column("seen_defect_types", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        _pk("runs"),
        _fk("runs", "project_id", "projects"),
    )
    op.create_index("ix_runs_project_id_id", "runs", ["project_id", "id"])
    op.create_index("ix_runs_status", "runs", ["status"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        _pk("metrics"),
        _fk("metrics", "run_id", "runs"),
        sa.UniqueConstraint("run_id", "name", name="uq_metrics_run_id_name"),
    )

    op.create_table(
        "curves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("x", sa.JSON(), nullable=False),
        sa.Column("y", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        _pk("curves"),
        _fk("curves", "run_id", "runs"),
        sa.UniqueConstraint("run_id", "kind", name="uq_curves_run_id_kind"),
    )

    op.create_table(
        "image_scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("label_at_run", sa.String(16), nullable=False),
        sa.Column("defect_type_at_run", sa.String(200), nullable=True),
        sa.Column("seen", sa.Boolean(), nullable=True),
        sa.Column("tsne_x", sa.Float(), nullable=True),
        sa.Column("tsne_y", sa.Float(), nullable=True),
        _pk("image_scores"),
        _fk("image_scores", "run_id", "runs"),
        _fk("image_scores", "image_id", "images"),
        sa.UniqueConstraint("run_id", "image_id", name="uq_image_scores_run_id_image_id"),
    )
    op.create_index("ix_image_scores_run_id_score", "image_scores", ["run_id", "score"])
    op.create_index("ix_image_scores_image_id", "image_scores", ["image_id"])

    op.create_table(
        "heatmaps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("vmin", sa.Float(), nullable=False),
        sa.Column("vmax", sa.Float(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        _pk("heatmaps"),
        _fk("heatmaps", "run_id", "runs"),
        _fk("heatmaps", "image_id", "images"),
        sa.UniqueConstraint("run_id", "image_id", name="uq_heatmaps_run_id_image_id"),
    )
    op.create_index("ix_heatmaps_image_id", "heatmaps", ["image_id"])

    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(128), nullable=False),
        _pk("embeddings"),
        _fk("embeddings", "run_id", "runs"),
        _fk("embeddings", "image_id", "images"),
        sa.UniqueConstraint("run_id", "image_id", name="uq_embeddings_run_id_image_id"),
    )
    op.create_index("ix_embeddings_image_id", "embeddings", ["image_id"])

    op.create_table(
        "train_logs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("elapsed_s", sa.Float(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        _pk("train_logs"),
        _fk("train_logs", "run_id", "runs"),
    )
    op.create_index("ix_train_logs_run_id_id", "train_logs", ["run_id", "id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("payload_json", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress_json", sa.JSON(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        _pk("jobs"),
        _fk("jobs", "run_id", "runs"),
    )
    op.create_index("ix_jobs_status_id", "jobs", ["status", "id"])
    op.create_index("ix_jobs_run_id", "jobs", ["run_id"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("current_job_id", sa.Integer(), nullable=True),
        sa.Column("stopped_at", TS, nullable=True),
        _pk("workers"),
        _fk("workers", "current_job_id", "jobs", ondelete="SET NULL"),
    )


def downgrade() -> None:
    for table in (
        "workers",
        "jobs",
        "train_logs",
        "embeddings",
        "heatmaps",
        "image_scores",
        "curves",
        "metrics",
        "runs",
        "label_events",
        "images",
        "projects",
    ):
        op.drop_table(table)
