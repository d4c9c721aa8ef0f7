"""Defect masks drawn in the app: an append-only history per image.

``images.mask_path`` (already there) keeps pointing at the current mask; this table
records every change so that a drawing can be undone back to an imported mask.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mask_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("previous_path", sa.Text(), nullable=True),
        sa.Column("author", sa.String(200), nullable=False),
        sa.Column("reverts_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_mask_events"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="fk_mask_events_project_id_projects",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_mask_events_image_id_images",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_mask_events_image_id_id", "mask_events", ["image_id", "id"])
    op.create_index("ix_mask_events_project_id", "mask_events", ["project_id"])


def downgrade() -> None:
    op.drop_table("mask_events")
