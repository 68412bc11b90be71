"""Connecting to the review database and migrating it (Alembic; never ``create_all``).

``sqlite:///review.db`` by default (one file, one writer at a time, WAL journal);
``postgresql://user@host/db`` for teams (psycopg 3). Both go through the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def normalize_url(url: str) -> str:
    """``postgresql://`` -> the psycopg 3 driver; a bare path -> SQLite."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN itself
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # SQLite's single-writer equivalent of SELECT ... FOR UPDATE: every transaction takes the
    # write lock when it starts, so a claim's read and its update cannot interleave with another's.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def connection_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached or the connection broke (a server
    restarting, a dropped connection): nothing was written, and the same request may succeed later."""
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    )


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


#: The PostgreSQL advisory lock that serialises migrations (any 64-bit key of earmark's own).
MIGRATION_LOCK = 0x6561726D61726B  # "earmark"


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the schema to ``revision`` with the package's Alembic migrations.

    Safe to run from several processes at once (the init containers of a Deployment's replicas):
    on PostgreSQL each waits for a transaction-scoped advisory lock, so one migrates and the
    others find the schema current; SQLite's write lock does the same."""
    from alembic import command

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's Alembic revision, None for an empty database; the package's head revision)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
