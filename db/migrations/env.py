"""Alembic environment of OSAD Studio.

``db.engine.init_db`` passes an open connection (inside a transaction it owns) through
``config.attributes["connection"]``; by hand (``alembic -c db/alembic.ini ...``) the
URL comes from ``sqlalchemy.url`` or, when that is empty, from ``OSAD_DATABASE_URL`` /
``OSAD_DATA_DIR``. ``render_as_batch`` lets later migrations alter SQLite tables.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from db.engine import database_url, is_sqlite, make_engine
from db.models import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or database_url()


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=is_sqlite(url),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
