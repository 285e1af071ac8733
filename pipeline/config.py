"""Deployment settings: where the serving database, the warehouse and local files are.

Settings are read on demand from environment variables (or passed explicitly), never at
import time. With no database configured, an embedded PostgreSQL server is started under
``$NIGHTSCORE_HOME`` (default: the nearest ``.nightscore``, see ``home_dir``) and both the warehouse and the serving
schemas live in it. Use cases (``pipeline.usecase``) say which warehouse they read;
``Settings.for_use_case`` resolves it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.usecase import UseCase

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"

ENV_DATABASE_URL = "NIGHTSCORE_DATABASE_URL"
ENV_WAREHOUSE_URL = "NIGHTSCORE_WAREHOUSE_URL"
ENV_HOME = "NIGHTSCORE_HOME"
ENV_ARTIFACT_DIR = "NIGHTSCORE_ARTIFACT_DIR"
ENV_DB_ROLE = "NIGHTSCORE_DB_ROLE"
WRITER_ROLE = "nightscore_writer"


@dataclass(frozen=True)
class Settings:
    """Where things live. URLs are libpq URLs (``postgresql://...``)."""

    database_url: str
    warehouse_url: str
    home: Path
    warehouse_schema: str = "warehouse"
    artifact_dir: Path | None = None
    # The serving URL without the writer role, for `db init` (which creates the roles).
    admin_url: str | None = None
    # How the warehouse URL was chosen (named in errors; never the URL itself).
    warehouse_source: str = "given"

    @property
    def init_url(self) -> str:
        return self.admin_url or self.database_url

    @property
    def artifacts(self) -> Path:
        return self.artifact_dir or self.home / "artifacts"

    @property
    def snapshots(self) -> Path:
        return self.home / "snapshots"

    @property
    def scores(self) -> Path:
        return self.home / "scores"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    def for_use_case(self, uc: UseCase, connection_url: str | None = None) -> Settings:
        """These settings reading ``uc``'s warehouse: its schema, and its URL from, in order,
        ``connection_url`` (the use case's Airflow connection), the env var ``url_env``,
        ``NIGHTSCORE_WAREHOUSE_URL``, else the serving database."""
        wh = uc.warehouse
        if connection_url:
            url, source = connection_url, f"Airflow connection {wh.connection!r}"
        elif wh.url_env and os.environ.get(wh.url_env):
            url, source = os.environ[wh.url_env], f"${wh.url_env}"
        elif os.environ.get(ENV_WAREHOUSE_URL):
            url, source = os.environ[ENV_WAREHOUSE_URL], f"${ENV_WAREHOUSE_URL}"
        else:
            url = self.admin_url or self.database_url
            tried = [f"Airflow connection {wh.connection!r}"] if wh.connection else []
            tried += [f"${v}" for v in dict.fromkeys((wh.url_env, ENV_WAREHOUSE_URL)) if v]
            source = f"the serving database (none of {', '.join(tried)} is set)"
        return replace(
            self,
            warehouse_url=normalize_url(url),
            warehouse_schema=wh.schema_name,
            warehouse_source=source,
        )

    def with_urls(
        self, database_url: str | None = None, warehouse_url: str | None = None
    ) -> Settings:
        return replace(
            self,
            database_url=database_url or self.database_url,
            warehouse_url=warehouse_url or self.warehouse_url,
        )


HOME_NAME = ".nightscore"


def home_dir() -> Path:
    """Where snapshots, models, reports and the embedded server live.

    ``$NIGHTSCORE_HOME`` when set; else the nearest ``.nightscore`` folder in the working
    directory or above it (as git finds its repository), so that a command run from a
    subfolder reaches the project's home and its server; else, in a checkout of the project,
    the one at its root; else ``./.nightscore``.
    """
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_NAME).is_dir():
            return folder / HOME_NAME
    if (REPO_ROOT / "pyproject.toml").is_file() and os.access(REPO_ROOT, os.W_OK):
        return REPO_ROOT / HOME_NAME
    return here / HOME_NAME


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner may enter (created with its parents)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def private_home(home: Path) -> Path:
    """The home as its owner's only, except that an embedded server's data under it stays
    reachable: run by root, the embedded PostgreSQL runs as its own system user, which
    must traverse the home to ``pgdata`` (it adds that permission itself when it starts;
    taking it away, even for a moment, stops the server at its next checkpoint). Others
    may pass through, never list: every folder inside is private on its own.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    home.chmod(0o711 if (home / "pgdata").is_dir() else 0o700)
    return home


def private_file(path: Path) -> Path:
    """``path`` readable and writable by its owner only (exports, messages, models)."""
    path.chmod(0o600)
    return path


def private_by_default() -> None:
    """Files this process creates from now on are its owner's only (umask 077).

    Called by the entry points (CLI, Airflow tasks, the local Airflow), never at import.
    """
    os.umask(0o077)


def load_settings(
    database_url: str | None = None,
    warehouse_url: str | None = None,
    uc: UseCase | None = None,
) -> Settings:
    """Resolve settings: explicit arguments, then environment variables, then embedded.

    With a use case, the warehouse is that use case's (see ``Settings.for_use_case``;
    ``warehouse_url`` plays the part of its Airflow connection). Without one it is
    ``NIGHTSCORE_WAREHOUSE_URL``, defaulting to the serving database, so that a single
    URL, or none at all, is enough to run everything.
    """
    found = home_dir()
    if not found.exists():
        log.warning(
            "a new nightscore home at %s (no %s folder in %s or above it; %s chooses one)",
            found,
            HOME_NAME,
            Path.cwd(),
            ENV_HOME,
        )
    home = private_home(found)
    db = database_url or os.environ.get(ENV_DATABASE_URL)
    if not db:
        from pipeline import embedded

        db = embedded.ensure_server(home)
    wh = warehouse_url or os.environ.get(ENV_WAREHOUSE_URL) or db
    artifact_dir = os.environ.get(ENV_ARTIFACT_DIR)
    role = os.environ.get(ENV_DB_ROLE, WRITER_ROLE)
    settings = Settings(
        database_url=with_role(normalize_url(db), role) if role else normalize_url(db),
        admin_url=normalize_url(db),
        warehouse_url=normalize_url(wh),
        home=home,
        artifact_dir=private_dir(Path(artifact_dir).resolve()) if artifact_dir else None,
    )
    return settings if uc is None else settings.for_use_case(uc, warehouse_url)


def normalize_url(url: str) -> str:
    """Return a libpq URL (``postgresql://``) for any PostgreSQL URL spelling.

    Accepts ``postgres://``, ``postgresql://`` and SQLAlchemy's ``postgresql+driver://``.
    Non-PostgreSQL URLs (another warehouse engine) are returned unchanged.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("postgres", "postgresql"):
        return urlunsplit(("postgresql", *parts[1:]))
    if not scheme:
        raise ConfigError(
            f"database URL has no scheme (found {redact(url)!r}); expected e.g. "
            "postgresql://user:password@host:5432/dbname"
        )
    return url


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy spelling of a PostgreSQL URL (psycopg2 driver)."""
    parts = urlsplit(normalize_url(url))
    if parts.scheme == "postgresql":
        return urlunsplit(("postgresql+psycopg2", *parts[1:]))
    return url


def url_from_parts(
    host: str | None,
    port: int | None,
    login: str | None,
    password: str | None,
    database: str | None,
) -> str:
    """Build a libpq URL from connection fields; a host starting with ``/`` is a socket dir."""
    auth = ""
    if login:
        auth = quote(login, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        auth += "@"
    db = quote(database or "postgres", safe="")
    if host and host.startswith("/"):
        return f"postgresql://{auth}/{db}?host={quote(host, safe='/')}" + (
            f"&port={port}" if port else ""
        )
    netloc = f"{auth}{host or 'localhost'}" + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{db}"


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(normalize_url(url))
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(database, safe=""), parts.query, ""))


_SECRET_KEYS = ("password", "passfile", "sslpassword", "sslkey")


def secrets_of(url: str) -> list[str]:
    """Every secret a URL (or a libpq key=value string) carries, raw and percent-encoded."""
    from urllib.parse import parse_qsl, unquote

    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_KEYS and v]
    except ValueError:
        pass
    found += [
        m.group(2)
        for m in re.finditer(r"\b(password|passfile|sslpassword)\s*=\s*('[^']*'|[^\s&]+)", url)
    ]
    out = set()
    for secret in found:
        secret = secret.strip("'")
        if secret:
            out |= {secret, unquote(secret), quote(unquote(secret), safe="")}
    return sorted(out, key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` (an error message, say) with every secret of ``urls`` replaced by ``***``."""
    for url in urls:
        for secret in secrets_of(url):
            text = text.replace(secret, "***")
    return text


def redact(url: str) -> str:
    """A URL safe to show: passwords (in the user part, in ``?password=``, in a libpq
    ``password=`` pair) are replaced by ``***``."""
    try:
        urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    return scrub(url, url)


def url_parts(url: str) -> dict[str, str | int | None]:
    """Split a libpq URL into connection fields (socket directory as ``host``)."""
    from urllib.parse import parse_qs, unquote

    parts = urlsplit(normalize_url(url))
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0] or None
    port = parts.port or (int(query["port"][0]) if "port" in query else None)
    return {
        "host": host,
        "port": port,
        "login": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "database": unquote(parts.path.lstrip("/")) or None,
    }


def with_role(url: str, role: str) -> str:
    """The URL with ``SET ROLE role`` applied at connection start (libpq ``options``).

    The pipeline writes as the ``nightscore_writer`` role whatever login the URL names, so
    that everything it creates is owned by that role. A URL that already sets options is
    returned unchanged.
    """
    from urllib.parse import parse_qsl, urlencode

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "options" for k, _ in query):
        return url
    query.append(("options", f"-c role={role}"))
    return urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), "")
    )


def today_in(timezone: str) -> date:
    """Today's date in ``timezone`` (an IANA name such as UTC or Europe/Warsaw)."""
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(timezone)).date()
