"""An index for the views of a run of 100,000 images: the scores of one role (the
held-out images that Results counts and bins, the calibration normals that set the
operating point and check for drift) are read from the index, not found by scanning
every score of the run.

Revision ID: 0005_score_views
Revises: 0004_scale
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_score_views"
down_revision: str | None = "0004_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_image_scores_run_id_role_score", "image_scores", ["run_id", "role", "score"])


def downgrade() -> None:
    op.drop_index("ix_image_scores_run_id_role_score", table_name="image_scores")
