"""Accounts: users, failed logins for the rate limit, and who created each run and job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "login_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(200), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_login_failures"),
    )
    op.create_index("ix_login_failures_username_created_at", "login_failures", ["username", "created_at"])
    op.create_index("ix_login_failures_client_created_at", "login_failures", ["client", "created_at"])
    # additive columns; batch mode lets SQLite take them like PostgreSQL
    for table in ("runs", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("created_by", sa.String(200), nullable=True))


def downgrade() -> None:
    for table in ("jobs", "runs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("created_by")
    op.drop_table("login_failures")
    op.drop_table("users")
