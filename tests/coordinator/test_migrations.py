"""The Alembic migrations build exactly the schema the ORM models describe, on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from coordinator.db.migrate import upgrade
from coordinator.db.models import Base
from coordinator.db.session import make_engine


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        upgrade(engine)  # idempotent: a second worker starting finds nothing to do
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    finally:
        engine.dispose()


def test_migrations_refuse_an_unknown_revision(tmp_path: object) -> None:
    from alembic.util import CommandError

    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(CommandError):
        upgrade(engine, "no-such-revision")
    engine.dispose()
