"""Deployment settings: where the serving database, the warehouse and local files are.

Settings are read on demand from environment variables (or passed explicitly), never at
import time. With no database configured, an embedded PostgreSQL server is started under
``$NIGHTSCORE_HOME`` (default: the nearest ``.nightscore``, see ``home_dir``) and both the warehouse and the serving
schemas live in it. Use cases (``pipeline.conf.usecase``) say which warehouse they read;
``Settings.for_use_case`` resolves it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.conf import embedded
from pipeline.conf.urls import normalize_url, with_role
from pipeline.core.paths import REPO_ROOT

if TYPE_CHECKING:
    from pipeline.conf.usecase import UseCase

log = logging.getLogger(__name__)

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


def today_in(timezone: str) -> date:
    """Today's date in ``timezone`` (an IANA name such as UTC or Europe/Warsaw)."""
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(timezone)).date()
