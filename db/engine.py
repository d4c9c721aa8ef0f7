"""Engine, session and schema set-up of the OSAD Studio database.

SQLite (the default) runs in WAL mode with a 30 s busy timeout so that the Streamlit
app and one or more worker processes can read and write the same file at once. Any
other SQLAlchemy URL can be given through ``OSAD_DATABASE_URL``; PostgreSQL (a team's
shared database) goes through psycopg 3, so ``postgresql://`` URLs are read as
``postgresql+psycopg://``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"
DEFAULT_DATA_DIR = "~/.osad-studio"
BUSY_TIMEOUT_MS = 30_000
# Connection pool of a server database, per process (OSAD_DB_POOL_SIZE /
# OSAD_DB_MAX_OVERFLOW). A process holds a connection only inside one session_scope
# block: the app's page reruns (one thread per browser tab) and a worker's training
# thread plus its heartbeat rarely need more than 5 at once, 10 more absorb bursts,
# and 15 per process lets about six app and worker processes share PostgreSQL's
# default max_connections=100 with room for maintenance connections.
DEFAULT_POOL_SIZE = 5
DEFAULT_MAX_OVERFLOW = 10
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

_engines: dict[str, Engine] = {}
_initialised: set[str] = set()
_lock = threading.RLock()
_head_revision: str | None = None


def data_dir() -> Path:
    """Folder for the database, checkpoints and caches (``OSAD_DATA_DIR``); created
    owner-only (0700): it holds password hashes and the session key."""
    path = Path(os.environ.get("OSAD_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


def _create_private_file(path: Path) -> None:
    """Create an empty ``path`` owner-only (0600) unless it exists: SQLite would create the
    database with the umask's mode (often world-readable), and gives its -wal and -shm
    files the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass


def permission_warnings(url: str | None = None) -> list[str]:
    """One sentence per data folder or SQLite database file that other local users can
    read (group or world permissions), with the command that fixes it."""
    url = _resolve(url)
    paths = [data_dir()]
    if is_sqlite(url) and not _is_sqlite_memory(url) and make_url(url).database:
        paths.append(Path(make_url(url).database).expanduser())
    out = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077:
            fix = "700" if path.is_dir() else "600"
            out.append(f"{path} is readable by other users (mode {mode:o}; it holds password hashes): "
                       f"chmod {fix} {path}")
    return out


def database_url() -> str:
    """``OSAD_DATABASE_URL`` or the SQLite file ``<data_dir>/osad.db``."""
    url = os.environ.get("OSAD_DATABASE_URL")
    if url:
        return normalise_url(url)
    return f"sqlite:///{data_dir() / 'osad.db'}"


def normalise_url(url: str) -> str:
    """Pick psycopg 3 for PostgreSQL URLs that name no driver (SQLAlchemy's default
    would be psycopg2, which OSAD Studio does not install)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _resolve(url: str | None) -> str:
    return normalise_url(url) if url else database_url()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number; got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative; got {value}")
    return value


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _is_sqlite_memory(url: str) -> bool:
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and (
        u.database in (None, "", ":memory:") or "mode=memory" in str(u)
    )


def _sqlite_on_connect(dbapi_connection, connection_record) -> None:
    """Per-connection SQLite settings.

    busy_timeout first, so that switching to WAL waits for a concurrent opener instead
    of failing. ``synchronous=NORMAL`` is the usual companion of WAL: commits stay
    atomic and the file cannot corrupt; only the last commits before a power cut may be
    lost, which is acceptable for labels and run results.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        for attempt in range(5):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except Exception as exc:  # sqlite3.OperationalError: database is locked
                if attempt == 4:
                    log.warning("could not switch SQLite to WAL mode: %s", exc)
                time.sleep(0.05 * (attempt + 1))
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str | None = None) -> Engine:
    """A new (uncached) engine with OSAD Studio's settings; most code wants
    :func:`get_engine`. Separate engines on one file behave like separate processes."""
    url = _resolve(url)
    kwargs: dict = {}
    if is_sqlite(url):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
        if _is_sqlite_memory(url):
            # One shared connection, otherwise every connection sees its own empty DB.
            kwargs["poolclass"] = StaticPool
        else:
            database = make_url(url).database
            if database:
                path = Path(database).expanduser()
                path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
                _create_private_file(path)
    else:
        kwargs["pool_size"] = _env_int("OSAD_DB_POOL_SIZE", DEFAULT_POOL_SIZE)
        kwargs["max_overflow"] = _env_int("OSAD_DB_MAX_OVERFLOW", DEFAULT_MAX_OVERFLOW)
        # A server restart or an idle-connection timeout must not surface as an error.
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default :func:`database_url`)."""
    url = _resolve(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, or before forking a worker process)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _initialised.clear()


# --- migrations ---------------------------------------------------------------------


def alembic_config(url: str | None = None, connection: Connection | None = None):
    """Alembic configuration built in code (no ini file needed)."""
    from alembic.config import Config

    url = _resolve(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # configparser interpolation: a literal % (e.g. in a password) must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


_REVISION_LINE = re.compile(r"^(revision|down_revision)\b[^=]*=\s*(?:\"([^\"]*)\"|'([^']*)'|None)", re.M)


def head_revision() -> str:
    """The newest migration's revision, read from the files' ``revision`` / ``down_revision``
    lines: importing Alembic (half a second on a busy CPU) only when a database needs
    upgrading keeps it off a cold app's first page."""
    global _head_revision
    if _head_revision is None:
        revs, downs = set(), set()
        for f in (MIGRATIONS_DIR / "versions").glob("*.py"):
            found = {k: a or b or None for k, a, b in _REVISION_LINE.findall(f.read_text())}
            if found.get("revision"):
                revs.add(found["revision"])
                downs.add(found.get("down_revision"))
        heads = revs - downs
        if len(heads) == 1:
            _head_revision = heads.pop()
        else:  # something the simple reading does not cover (merges, tuples): ask Alembic
            from alembic.script import ScriptDirectory

            _head_revision = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return _head_revision


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (Alembic's ``alembic_version`` row); None before the
    first migration."""
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def _take_migration_lock(conn: Connection) -> None:
    """Serialise concurrent upgrades (the app and a worker starting together)."""
    name = conn.dialect.name
    if name == "sqlite":
        # pysqlite leaves DDL outside transactions; an explicit write transaction makes
        # the whole upgrade atomic and makes a second process wait (busy timeout),
        # after which it finds the schema at head and does nothing.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")


def init_db(url: str | None = None) -> Engine:
    """Create the data folder and bring the schema to the Alembic head.

    Idempotent and cheap: after the first success in a process it only returns the
    engine, and when the stored revision already is the head no migration code runs.
    Safe when several processes call it at once on one SQLite file.
    """
    url = _resolve(url)
    data_dir()
    engine = get_engine(url)
    with _lock:
        if url in _initialised:
            return engine
        head = head_revision()
        delay = 0.1
        for attempt in range(8):
            try:
                if current_revision(engine) != head:
                    _upgrade(engine, url)
                break
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == 7:
                    raise
                log.info("database locked during schema upgrade, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        _initialised.add(url)
        for warning in permission_warnings(url):  # once per process: at start-up
            log.warning(warning)
    return engine


def _upgrade(engine: Engine, url: str) -> None:
    from alembic import command

    with engine.connect() as conn:
        with conn.begin():
            _take_migration_lock(conn)
            command.upgrade(alembic_config(url, connection=conn), "head")


# --- sessions -----------------------------------------------------------------------


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    ``expire_on_commit=False`` keeps loaded objects readable after the block, which is
    what Streamlit pages want when they render rows outside the transaction.
    """
    session = Session(get_engine(url), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
