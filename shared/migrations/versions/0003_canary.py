"""Canary rollouts: a policy may be ``canary`` beside the active one, with its traffic share,
start time and the decision its rollout ended with.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

Hand-written from ``shared/schema.py``; ``tests/shared/test_db.py`` checks it against the
models. SQLite alters the table in batch mode (it cannot change a constraint in place).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("candidate", "active", "retired", "rejected")
AFTER = (*BEFORE, "canary")


def _statuses(names: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(repr(v) for v in names) + ")"


def upgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.drop_constraint(op.f("ck_policies_status"), type_="check")
        batch.create_check_constraint(op.f("ck_policies_status"), _statuses(AFTER))
        batch.add_column(sa.Column("canary_share", sa.Float(), nullable=True))
        batch.add_column(sa.Column("canary_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("decision", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE policies SET status = 'rejected' WHERE status = 'canary'")
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("decision")
        batch.drop_column("canary_started_at")
        batch.drop_column("canary_share")
        batch.drop_constraint(op.f("ck_policies_status"), type_="check")
        batch.create_check_constraint(op.f("ck_policies_status"), _statuses(BEFORE))
