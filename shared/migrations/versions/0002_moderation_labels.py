"""Moderation decisions and end-user ids on messages; labels on messages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Hand-written from ``shared/schema.py``; ``tests/shared/test_db.py`` checks it against the
models. SQLite adds the columns in batch mode (it cannot alter a table in place).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = (
    "harmful", "untrue", "unhelpful", "spam", "pii", "hate_speech", "sexual_content",
    "violence", "refusal_was_wrong",
)  # fmt: skip


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("moderation", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("end_user", sa.String(), nullable=True))
        batch.create_index(batch.f("ix_messages_end_user"), ["end_user"])

    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "label IN (" + ", ".join(repr(v) for v in LABELS) + ")", name=op.f("ck_labels_label")
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_labels_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_labels_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint(
            "message_id", "user_id", "label", name=op.f("uq_labels_message_id_user_id_label")
        ),
    )
    op.create_index(op.f("ix_labels_message_id"), "labels", ["message_id"])
    op.create_index(op.f("ix_labels_user_id"), "labels", ["user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_labels_user_id"), table_name="labels")
    op.drop_index(op.f("ix_labels_message_id"), table_name="labels")
    op.drop_table("labels")
    with op.batch_alter_table("messages") as batch:
        batch.drop_index(batch.f("ix_messages_end_user"))
        batch.drop_column("end_user")
        batch.drop_column("moderation")
