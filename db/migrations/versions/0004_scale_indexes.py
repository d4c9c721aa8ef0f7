"""Indexes for projects of 100,000 images: the Label page's filters and sorts, the
grouped counts of the Projects page, and import jobs by kind.

Revision ID: 0004_scale
Revises: 0003
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_scale"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    # label counts by label / defect type / split read from the index alone
    "ix_images_project_id_label_defect_type_split": ("images", ["project_id", "label", "defect_type", "split"]),
    # a label filter sorted by name: a page is read in index order, nothing sorted
    "ix_images_project_id_label_rel_path": ("images", ["project_id", "label", "rel_path"]),
    "ix_images_project_id_split_rel_path": ("images", ["project_id", "split", "rel_path"]),
    "ix_images_project_id_defect_type": ("images", ["project_id", "defect_type"]),
    "ix_jobs_kind_id": ("jobs", ["kind", "id"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
