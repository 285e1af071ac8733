"""Deployment settings and per-use-case configuration.

Settings are read on demand from environment variables (or passed explicitly), never at
import time. With no database configured, an embedded PostgreSQL server is started under
``$NIGHTSCORE_HOME`` (default ``./.nightscore``) and both the warehouse and the serving
schemas live in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"

ENV_DATABASE_URL = "NIGHTSCORE_DATABASE_URL"
ENV_WAREHOUSE_URL = "NIGHTSCORE_WAREHOUSE_URL"
ENV_WAREHOUSE_SCHEMA = "NIGHTSCORE_WAREHOUSE_SCHEMA"
ENV_HOME = "NIGHTSCORE_HOME"
ENV_ARTIFACT_DIR = "NIGHTSCORE_ARTIFACT_DIR"
ENV_DB_ROLE = "NIGHTSCORE_DB_ROLE"
WRITER_ROLE = "nightscore_writer"


@dataclass(frozen=True)
class UseCase:
    """Everything that makes one prediction use case: SQL, horizon, tables, model knobs.

    A second model on the same warehouse is another ``UseCase`` plus its SQL files.
    """

    name: str = "churn"
    entity_key: str = "customer_id"
    features_sql: str = "churn_features.sql"
    labels_sql: str = "churn_labels.sql"
    source_counts_sql: str = "churn_source_counts.sql"
    label_horizon_days: int = 30
    # Training snapshots are taken every ``snapshot_step_days`` going back from the newest
    # date whose label window closes before the out-of-time holdout starts.
    train_snapshots: int = 6
    snapshot_step_days: int = 14
    score_table: str = "churn_scores"
    probability_column: str = "churn_probability"
    score_partitions: int = 2
    batch_rows: int = 50_000
    seed: int = 20240601
    # Gate policy: a challenger is promoted only if every check passes.
    auc_floor: float = 0.65  # absolute floor on the holdout ROC AUC
    lift_floor: float = 2.0  # absolute floor on the holdout top-decile lift
    noninferiority_margin: float = 0.01  # lower bound of (challenger - champion) AUC >= -margin
    score_psi_limit: float = 0.25  # PSI of challenger vs champion scores on the holdout
    bootstrap_resamples: int = 1000
    campaign_capacity: int = 1000  # customers a campaign can contact per night (precision at K)
    # Retraining cadence: every N days since the champion was trained (1 = every night),
    # or earlier when a monitor files a retrain request.
    retrain_every_days: int = 1
    # Served history: keep the partitions of the newest N published score dates.
    retention_dates: int = 400
    # Data quality thresholds (see pipeline/checks.py and sql/contracts/).
    population_min_ratio: float = 0.75  # tonight's population vs the previous run's
    population_max_ratio: float = 1.33
    feature_psi_limit: float = 0.25  # warn: feature drift vs the champion's training data
    score_drift_limit: float = 0.25  # warn: score PSI vs the previous published night
    # Realized AUC this far below the model's holdout AUC requests a retrain.
    decay_threshold: float = 0.05
    # Retention campaign. The control group is a salted hash of the entity key: the same
    # customers whatever the run, model or backfill. Changing the salt or the fraction
    # starts a new control group (and makes uplift before and after incomparable).
    control_salt: str = "nightscore-churn-control-v1"
    control_fraction: float = 0.05
    audience_deciles: int = 1  # the top risk band: risk_decile <= this
    suppression_days: int = 14  # no one is contacted twice within this many days
    send_rate_per_second: float = 20.0  # SMTP messages per second at most
    model_params: dict[str, float | int] = field(
        default_factory=lambda: {
            "max_iter": 250,
            "learning_rate": 0.06,
            "max_leaf_nodes": 31,
            "min_samples_leaf": 80,
            "l2_regularization": 1.0,
        }
    )


USE_CASES: dict[str, UseCase] = {"churn": UseCase()}
# The Airflow asset each use case's publish updates (consumers schedule on it).
SCORES_ASSET = {name: uc.score_table for name, uc in USE_CASES.items()}


def use_case(name: str) -> UseCase:
    """Return the configured use case called ``name``.

    Raises:
        ConfigError: no such use case.
    """
    try:
        return USE_CASES[name]
    except KeyError:
        raise ConfigError(
            f"unknown use case {name!r}: expected one of {sorted(USE_CASES)}; "
            "add it to pipeline.config.USE_CASES with its SQL files"
        ) from None


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

    def with_urls(
        self, database_url: str | None = None, warehouse_url: str | None = None
    ) -> Settings:
        return replace(
            self,
            database_url=database_url or self.database_url,
            warehouse_url=warehouse_url or self.warehouse_url,
        )


def home_dir() -> Path:
    return Path(os.environ.get(ENV_HOME) or (Path.cwd() / ".nightscore")).resolve()


def load_settings(database_url: str | None = None, warehouse_url: str | None = None) -> Settings:
    """Resolve settings: explicit arguments, then environment variables, then embedded.

    The warehouse defaults to the serving database (schema ``warehouse``) so that a
    single URL, or none at all, is enough to run everything.
    """
    home = home_dir()
    db = database_url or os.environ.get(ENV_DATABASE_URL)
    if not db:
        from pipeline import embedded

        db = embedded.ensure_server(home)
    wh = warehouse_url or os.environ.get(ENV_WAREHOUSE_URL) or db
    artifact_dir = os.environ.get(ENV_ARTIFACT_DIR)
    role = os.environ.get(ENV_DB_ROLE, WRITER_ROLE)
    return Settings(
        database_url=with_role(normalize_url(db), role) if role else normalize_url(db),
        admin_url=normalize_url(db),
        warehouse_url=normalize_url(wh),
        home=home,
        warehouse_schema=os.environ.get(ENV_WAREHOUSE_SCHEMA, "warehouse"),
        artifact_dir=Path(artifact_dir).resolve() if artifact_dir else None,
    )


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


def redact(url: str) -> str:
    """A URL safe to show: the password is replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


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
