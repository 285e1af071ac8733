"""Use cases are files: ``usecases/<name>/usecase.yaml`` plus the SQL and contract it names.

Everything that differs between one prediction use case and the next (or between this
warehouse and someone else's) lives in a use case folder: the entity key, the warehouse
connection and schema, the feature, label and population SQL, the source contract, the
horizon and training window, the model, the gates, the feature checks, the schedule, the
served table and an optional campaign. The code holds none of it.

Use cases are discovered at run time in the folders of ``$NIGHTSCORE_USECASES`` (paths
separated by ``:``; default ``<repository>/usecases``) and validated into a typed,
frozen ``UseCase``. Every error names the file, the key, what was expected and what was
found. Every file a use case uses is named in its config (paths are relative to its
folder); nothing is derived from the use case's name.

String values may refer to environment variables: ``${VAR}`` or ``${VAR:-default}``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.core.errors import ConfigError
from pipeline.core.paths import REPO_ROOT

if TYPE_CHECKING:
    import numpy as np

ENV_USECASES = "NIGHTSCORE_USECASES"
ENV_USE_CASE = "NIGHTSCORE_USE_CASE"
CONFIG_NAMES = ("usecase.yaml", "usecase.yml", "usecase.toml")
IDENTIFIER = r"^[a-z_][a-z0-9_]*$"
# Staging tables append ``_stage_YYYYMMDD_xxxxxxxx`` (24 characters) to the served table's
# name; PostgreSQL identifiers stop at 63.
MAX_TABLE_NAME = 35
# Airflow's email notifier (the smtp provider): the default of ``alerts.notifier``
DEFAULT_NOTIFIER = "airflow.providers.smtp.notifications.smtp.SmtpNotifier"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _identifier(max_length: int = 63) -> Any:
    return Field(pattern=IDENTIFIER, max_length=max_length)


def _time_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"an IANA time zone such as UTC or Europe/Berlin, found {value!r}"
        ) from None
    return value


def _file(value: str | Path, info: ValidationInfo) -> Path:
    """A file named in the config, relative to the use case's folder; it must exist."""
    folder = Path((info.context or {}).get("folder", "."))
    path = (folder / value).resolve()
    if not path.is_file():
        raise ValueError(
            f"an existing file (relative to {folder}), found {str(value)!r}: no such file"
        )
    return path


class Entity(_Section):
    """What one prediction is about: the key column every SQL file returns."""

    key: str = _identifier()
    type: Literal["bigint", "text"] = "bigint"


class Warehouse(_Section):
    """Where the use case's facts live (read-only).

    The URL is, in order: the Airflow connection ``connection`` (in Airflow), the
    environment variable ``url_env``, ``NIGHTSCORE_WAREHOUSE_URL``, else the serving
    database.
    """

    connection: str | None = "nightscore_warehouse"
    url_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    schema_name: str = Field(
        default="public", alias="schema", pattern=r"^[A-Za-z_][A-Za-z0-9_$]*$", max_length=63
    )
    timezone: str = "UTC"
    # PostgreSQL settings of the sessions that read the warehouse (the source checks, the
    # features and the kept blocks). None by default: at 1M customers, JIT off and a
    # work_mem of 128MB each made the source checks and the kept windows slower, and the
    # feature query no faster (docs/scaling.md, "Session settings").
    session: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return _time_zone(value)

    @field_validator("session")
    @classmethod
    def _setting_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [n for n in value if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?", n)]
        if bad:
            raise ValueError(
                "PostgreSQL setting names such as work_mem or jit, found "
                + ", ".join(map(repr, bad))
            )
        return value

    @property
    def settings(self) -> dict[str, str]:
        """The session's settings, as PostgreSQL text."""
        return {k: _setting_text(v) for k, v in self.session.items()}


def _setting_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class SqlFiles(_Section):
    """The SQL a data scientist writes. Each runs in the warehouse with ``:as_of`` bound.

    ``population`` (optional) selects the entity keys active as of ``:as_of``; when given,
    ``features`` and ``labels`` may read it as a table named ``population``.
    """

    features: Path
    labels: Path
    population: Path | None = None
    source_counts: Path | None = None

    @field_validator("features", "labels", "population", "source_counts", mode="before")
    @classmethod
    def _exists(cls, value: str | Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _file(value, info)


class Aggregate(_Section):
    """One rolling aggregate of a fact table per entity, over the ``days`` before a date.

    Exactly one of ``sum`` (an integer column: sums stay exact when kept incrementally),
    ``count`` (``"*"``: rows) or ``last`` (the table's date column: the newest day with a
    row in the window, NULL if none).
    """

    sum: str | None = Field(default=None, pattern=IDENTIFIER)
    count: Literal["*"] | None = None
    last: str | None = Field(default=None, pattern=IDENTIFIER)
    days: int = Field(ge=1, le=3650)

    @model_validator(mode="after")
    def _one_kind(self) -> Aggregate:
        given = [k for k in ("sum", "count", "last") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of sum: <integer column>, count: '*' or last: <date column>, "
                f"found {', '.join(given) or 'none'}"
            )
        return self

    @property
    def kind(self) -> str:
        return "sum" if self.sum is not None else "count" if self.count is not None else "last"

    @model_serializer(mode="wrap")
    def _only_its_kind(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Written back as it is declared: its one kind and its days."""
        return {k: v for k, v in handler(self).items() if v is not None}


class Window(_Section):
    """Rolling per-entity aggregates of one dated fact table (``pipeline.stages.windows``).

    The features query reads them as a table named after the block: one row per entity
    with a row in the longest window, a column per aggregate. nightscore keeps them from
    one night to the next (the night before's values, plus the day that enters each
    window, minus the day that leaves it) instead of rescanning the facts.
    """

    table: str = _identifier()
    date: str = _identifier()
    aggregates: dict[str, Aggregate] = Field(min_length=1)

    @field_validator("aggregates")
    @classmethod
    def _names(cls, value: dict[str, Aggregate]) -> dict[str, Aggregate]:
        bad = [n for n in value if not re.match(IDENTIFIER, n) or n.startswith("nightscore_")]
        if bad:
            raise ValueError(
                f"aggregate names are lower-case SQL identifiers not starting with "
                f"nightscore_, found {', '.join(map(repr, bad))}"
            )
        return value

    @model_validator(mode="after")
    def _last_is_the_date(self) -> Window:
        for name, a in self.aggregates.items():
            if a.last is not None and a.last != self.date:
                raise ValueError(
                    f"aggregate {name!r}: last: takes the window's date column {self.date!r}, "
                    f"found {a.last!r}"
                )
        return self

    @property
    def days(self) -> int:
        """The longest window: the days of facts the aggregates cover."""
        return max(a.days for a in self.aggregates.values())


class StateTable(_Section):
    """A table a kept state is built from: its date column, and how many days before the
    snapshot date the state reads (none: every day, e.g. the newest row ever)."""

    date: str = _identifier()
    days: int | None = Field(default=None, ge=1, le=36500)


class State(_Section):
    """Per-entity state kept from one night to the next by SQL the use case writes
    (``pipeline.stages.windows``): ``facts`` computes it as of ``:as_of`` from the facts; ``step``
    computes it as of ``:as_of`` from the state as of the day before (read under the
    block's own name) and the facts that changed that day. The features query reads it as
    a table named after the block. A kept state is used only while the days of ``tables``
    it was built from are unchanged, and each night a slice of its entities is recomputed
    from the facts and compared (a step that disagrees is not used)."""

    facts: Path
    step: Path
    tables: dict[str, StateTable] = Field(min_length=1)

    @field_validator("facts", "step", mode="before")
    @classmethod
    def _exists(cls, value: str | Path, info: ValidationInfo) -> Path:
        return _file(value, info)

    @field_validator("tables")
    @classmethod
    def _table_names(cls, value: dict[str, StateTable]) -> dict[str, StateTable]:
        bad = [n for n in value if not re.match(IDENTIFIER, n)]
        if bad:
            raise ValueError(f"table names are SQL identifiers, found {', '.join(map(repr, bad))}")
        return value


class Label(_Section):
    horizon_days: int = Field(default=30, ge=1, le=3650)


class Training(_Section):
    """Labelled snapshots on a calendar grid of ``step_days``, back from the newest matured one.

    A run at D holds out the snapshot D - horizon (and, with ``holdout_snapshots`` > 1, the
    grid dates before it: pooled evidence for the gates) and trains on ``snapshots`` grid
    dates whose labels close by the oldest holdout date: it needs up to ``2 x horizon +
    (holdout_snapshots - 1 + snapshots) x step_days - 1`` days of history before D. Each training snapshot is built once and
    reused by later nights. ``max_rows`` caps the rows a model is fitted on: every
    positive is kept and negatives are sampled (seeded) and weighted to stand for the rest.
    """

    snapshots: int = Field(default=4, ge=1, le=60)
    step_days: int = Field(default=7, ge=1, le=365)
    holdout_snapshots: int = Field(default=1, ge=1, le=12)
    retrain_every_days: int = Field(default=1, ge=1)
    max_rows: int | None = Field(default=None, ge=1000)


class ModelSpec(_Section):
    """The estimator (preprocessing is chosen to suit it) and its parameters."""

    estimator: Literal["hist_gradient_boosting", "logistic_regression"] = "hist_gradient_boosting"
    params: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    seed: int = 20240601


class Gates(_Section):
    """A challenger is promoted only if every check passes (``pipeline.stages.evaluate.gate_checks``).

    The defaults are chosen from ``benchmarks/gates.py``, which measures how often these
    gates promote a better, an equal, a worse and a broken challenger at each holdout size.
    """

    auc_floor: float = Field(default=0.6, ge=0, le=1)
    lift_floor: float = Field(default=1.5, ge=0)
    promote_confidence: float = Field(default=0.7, gt=0, lt=1)
    decayed_promote_confidence: float = Field(default=0.05, gt=0, lt=1)
    noninferiority_margin: float = Field(default=0.02, ge=0, le=1)
    score_psi_limit: float | None = Field(default=0.25, gt=0)
    min_holdout_positives: int = Field(default=20, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _resampling_is_gone(cls, data: Any) -> Any:
        # Configs written for the bootstrap gates name its resample count; the gates'
        # intervals are now closed-form, so the key is read and ignored.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "bootstrap_resamples"}
        return data


class FeatureRule(_Section):
    """Limits for one feature; ``None`` means no limit.

    ``max_unseen_share``: a categorical feature whose rows hold a value its training data
    never saw (a new market, a value re-spelled) stops the night above this share; below
    it, above ``unseen_share_limit``, it warns and requests a retrain.
    """

    max_null_fraction: float | None = Field(default=None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    max_unseen_share: float | None = Field(default=0.2, ge=0, le=1)


class FeatureChecks(_Section):
    """The feature-check policy: a default rule, per-feature overrides, population and drift.

    With nothing configured every feature may be null and take any sign (a new warehouse's
    natural features pass); a feature without a null limit may still not grow its null
    fraction by more than ``max_null_increase`` over the serving model's training data.
    """

    default: FeatureRule = FeatureRule()
    features: dict[str, FeatureRule] = Field(default_factory=dict)
    max_null_increase: float = Field(default=0.10, ge=0, le=1)
    population_min_ratio: float = Field(default=0.75, ge=0)
    population_max_ratio: float = Field(default=1.33, ge=1)
    psi_limit: float = Field(default=0.25, gt=0)
    # warn (and request a retrain) when more rows than this hold a category training never
    # saw; above a feature's max_unseen_share (default 20%) the night stops
    unseen_share_limit: float = Field(default=0.005, ge=0, le=1)

    def rule(self, feature: str) -> FeatureRule:
        """The default rule with the feature's own keys (explicit nulls included) on top."""
        own = self.features.get(feature)
        if own is None:
            return self.default
        return self.default.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


class Schedule(_Section):
    nightly: str = "0 0 * * *"
    monitoring: str = "0 6 * * *"
    timezone: str = "UTC"
    # how long a night waits for its data to land (the contract's `fresh` tables through
    # the day before) before it is skipped; checked every `data_poke_minutes`
    data_wait_hours: float = Field(default=12, gt=0, le=24 * 7)
    data_poke_minutes: float = Field(default=10, gt=0, le=24 * 60)
    # a night not published this long after it was queued alerts (``alerts``): "6h",
    # "90m", "1h30m", "45s"; null for no deadline
    deadline: str | None = None

    @field_validator("nightly", "monitoring")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5 and not value.startswith("@"):
            raise ValueError(
                f"a cron expression with 5 fields such as '0 0 * * *', found {value!r}"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return _time_zone(value)

    @field_validator("deadline")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def deadline_after(self) -> timedelta | None:
        """``deadline`` as a duration (None: no deadline)."""
        return parse_duration(self.deadline) if self.deadline is not None else None


_DURATION = re.compile(r"^\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$")


def parse_duration(text: str) -> timedelta:
    """``"6h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` as a positive duration."""
    match = _DURATION.match(str(text))
    if not match or not any(match.groups()):
        raise ValueError(f"a duration such as '6h', '90m', '1h30m' or '45s', found {text!r}")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    duration = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    if duration <= timedelta(0):
        raise ValueError(f"a duration longer than zero such as '6h', found {text!r}")
    return duration


class Alerts(_Section):
    """Who is told when a night fails or misses ``schedule.deadline``.

    By default an email through Airflow's SMTP notifier and the ``nightscore_smtp``
    connection, to ``to``. Any Airflow notifier by its import path (``notifier``) with its
    own arguments (``options``), where the strings ``{subject}``, ``{text}`` and ``{html}``
    are replaced by the alert's.
    """

    to: list[str] = Field(default_factory=list)
    notifier: str = Field(default=DEFAULT_NOTIFIER, pattern=r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    on_failure: bool = True


class Serving(_Section):
    """The served table ``predictions.<table>`` and its views, generated by ``db init``."""

    table: str = _identifier(MAX_TABLE_NAME)
    probability_column: str = Field(default="probability", pattern=IDENTIFIER, max_length=63)
    partitions: int = Field(default=2, ge=1, le=64)
    # The Airflow pool the scoring tasks take slots of: its size caps how many partitions
    # score at once across all workers (and so the serving-database connections they hold).
    pool: str = Field(default="default_pool", pattern=r"^[A-Za-z0-9_.-]+$", max_length=256)
    batch_rows: int = Field(default=50_000, ge=1000)
    retention_dates: int = Field(default=400, ge=1)


class Monitoring(_Section):
    """When a served model counts as decayed: its realized ROC AUC more than
    ``decay_threshold`` below its holdout AUC, or its realized calibration error more than
    ``calibration_threshold`` above its holdout's. A decayed model's use case retrains, and
    its next challenger needs only not to be shown worse (``gates.decayed_promote_confidence``)."""

    decay_threshold: float = Field(default=0.05, ge=-1, le=1)
    calibration_threshold: float = Field(default=0.03, ge=0, le=1)
    score_drift_limit: float = Field(default=0.25, gt=0)


class Report(_Section):
    """What the nightly and evaluation reports break down by.

    ``segments``: feature columns (categorical, e.g. a country) whose values each get a row
    of scores in the nightly report and of metrics in the evaluation report; none by default.
    """

    segments: list[Annotated[str, Field(pattern=IDENTIFIER, max_length=63)]] = Field(
        default_factory=list, max_length=5
    )


class Contacts(_Section):
    """Where the campaign finds each entity's contact details (a warehouse table)."""

    table: str = _identifier()
    key: str = _identifier()
    first_name: str = _identifier()
    email: str = _identifier()
    opt_in: str = _identifier()


class Experiment(_Section):
    """The power calculation's assumptions (shown by ``nightscore usecase show``)."""

    base_rate: float = Field(default=0.12, gt=0, lt=1)
    effect: float = Field(default=0.03, gt=0, lt=1)
    campaigns_per_week: float = Field(default=1.0, gt=0)
    weeks: int = Field(default=8, ge=1)


class Policy(_Section):
    """How the audience is ranked: by risk, or by the uplift policy in force.

    With ``rank_by: uplift`` the monitoring DAG trains an uplift model from the matured
    outcomes of the contacted and the control band each time a campaign matures, checks
    it out of time against the policy in force (Qini with a paired bootstrap) and
    promotes it as ``promotion_mode`` says; until one is promoted the audience is ranked
    by risk.
    """

    rank_by: Literal["risk", "uplift"] = "risk"
    # log_odds_effect: the email as a shift of the outcome's log-odds on top of the served
    # risk (one penalized logistic regression, few outcomes needed); two_model: a gradient
    # boosted model per arm (T-learner), for experiments with many outcomes.
    learner: Literal["log_odds_effect", "two_model"] = "log_odds_effect"
    penalty: float = Field(default=3.0, gt=0)
    promotion_mode: Literal["auto", "approval", "never"] = "auto"
    min_training_weeks: int = Field(default=3, ge=1)
    holdout_weeks: int = Field(default=1, ge=1)
    min_holdout_control_positives: int = Field(default=20, ge=1)
    qini_margin: float = Field(default=0.0, ge=0)
    bootstrap_resamples: int = Field(default=500, ge=100)


class Campaign(_Section):
    """An email campaign fed by the scores; no block, no campaign DAG.

    Its tables are ``campaigns.<name>_audience``, ``_control_band``, ``_send_log`` and
    ``_opt_outs``. The permanent control group is a salted hash of the entity key: changing
    the salt or the fraction starts a new control group (uplift before and after is not
    comparable).
    """

    name: str = _identifier(30)
    contacts: Contacts
    template: Path
    capacity: int = Field(default=1000, ge=1)
    audience_deciles: int = Field(default=1, ge=1, le=10)
    suppression_days: int = Field(default=14, ge=0)
    send_rate_per_second: float = Field(default=20.0, gt=0)
    control_salt: str = Field(min_length=8)
    control_fraction: float = Field(default=0.05, gt=0, lt=1)
    reasons: dict[str, str] = Field(default_factory=dict)
    experiment: Experiment = Field(default_factory=Experiment)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("template", mode="before")
    @classmethod
    def _exists(cls, value: str | Path, info: ValidationInfo) -> Path:
        return _file(value, info)

    @property
    def audience_table(self) -> str:
        return f"{self.name}_audience"

    @property
    def control_table(self) -> str:
        return f"{self.name}_control_band"

    @property
    def send_log_table(self) -> str:
        return f"{self.name}_send_log"

    @property
    def opt_outs_table(self) -> str:
        return f"{self.name}_opt_outs"


class UseCase(_Section):
    """One prediction use case, validated from its folder. Frozen; build with :func:`load`."""

    name: str = _identifier(40)
    description: str = ""
    entity: Entity
    warehouse: Warehouse = Warehouse()
    sql: SqlFiles
    windows: dict[str, Window] = Field(default_factory=dict)
    states: dict[str, State] = Field(default_factory=dict)
    contract: Path
    label: Label = Label()
    training: Training = Training()
    model: ModelSpec = ModelSpec()
    gates: Gates = Gates()
    feature_checks: FeatureChecks = FeatureChecks()
    schedule: Schedule = Schedule()
    serving: Serving
    monitoring: Monitoring = Monitoring()
    report: Report = Report()
    alerts: Alerts = Alerts()
    campaign: Campaign | None = None
    # set by the loader, not by the file
    folder: Path = Field(default=Path("."), exclude=True)
    source: Path = Field(default=Path("usecase.yaml"), exclude=True)

    @field_validator("contract", mode="before")
    @classmethod
    def _exists(cls, value: str | Path, info: ValidationInfo) -> Path:
        return _file(value, info)

    @field_validator("windows", "states")
    @classmethod
    def _window_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [
            n
            for n in value
            if not re.match(IDENTIFIER, n) or n == "population" or n.startswith("nightscore_")
        ]
        if bad:
            raise ValueError(
                "block names are lower-case SQL identifiers other than population, not "
                "starting with nightscore_, found " + ", ".join(map(repr, bad))
            )
        return value

    @model_validator(mode="after")
    def _blocks_apart(self) -> UseCase:
        both = sorted(set(self.windows) & set(self.states))
        if both:
            raise ValueError(
                f"{', '.join(both)}: named both under windows and under states; "
                "a block's name is the table the features query reads, so it names one"
            )
        return self

    @model_validator(mode="after")
    def _names_do_not_collide(self) -> UseCase:
        if self.serving.probability_column in (self.entity.key, "score_date", "model_version"):
            raise ValueError(
                f"serving.probability_column {self.serving.probability_column!r} collides with "
                "another column of the served table; choose another name"
            )
        return self

    # the three names almost every stage needs
    @property
    def entity_key(self) -> str:
        return self.entity.key

    @property
    def score_table(self) -> str:
        return self.serving.table

    @property
    def probability_column(self) -> str:
        return self.serving.probability_column

    @property
    def capacity(self) -> int | None:
        """How many entities are acted on per night (the campaign's capacity), if any."""
        return self.campaign.capacity if self.campaign is not None else None

    def history_days(self) -> int:
        """Days of facts before a run date that the training window needs, at most: training
        dates sit on a grid of ``step_days``, so the newest is up to ``step_days - 1`` days
        older than ``2 x horizon`` (and each extra holdout date one step more) before the run."""
        t = self.training
        return (
            2 * self.label.horizon_days + (t.holdout_snapshots - 1 + t.snapshots) * t.step_days - 1
        )

    def history_text(self) -> str:
        """How :meth:`history_days` is made, in the keys that set it."""
        t = self.training
        extra = (
            f"(training.holdout_snapshots {t.holdout_snapshots} - 1 + training.snapshots {t.snapshots})"
            if t.holdout_snapshots > 1
            else f"training.snapshots {t.snapshots}"
        )
        return (
            f"{self.history_days()} days: 2 x label.horizon_days {self.label.horizon_days} + "
            f"{extra} x training.step_days {t.step_days} - 1"
        )

    def files(self) -> list[Path]:
        """Every file the use case uses (for the code version and ``usecase show``)."""
        out = [self.source, self.contract, self.sql.features, self.sql.labels]
        out += [p for p in (self.sql.population, self.sql.source_counts) if p is not None]
        if self.campaign is not None:
            out.append(self.campaign.template)
        return out

    def evolve(self, changes: Mapping[str, Any]) -> UseCase:
        """A copy with ``changes`` deep-merged into the config, validated again (tests, tools)."""
        data = _deep_merge(self.model_dump(by_alias=True, mode="python"), changes)
        data = _relative_files(data, self.folder)
        return _validate(data, self.folder, self.source)


# -- loading ---------------------------------------------------------------------------


def search_path() -> list[Path]:
    """The folders searched for use cases: ``$NIGHTSCORE_USECASES`` or ``<repo>/usecases``."""
    configured = os.environ.get(ENV_USECASES)
    if configured:
        return [Path(p).expanduser().resolve() for p in configured.split(os.pathsep) if p]
    return [REPO_ROOT / "usecases"]


@dataclass(frozen=True)
class Found:
    """A use case folder found on the search path: its config, or its error if invalid."""

    name: str
    source: Path
    use_case: UseCase | None = None
    error: str | None = None


def discover() -> list[Found]:
    """Every use case folder on the search path, valid or not, sorted by name.

    Two use cases may not share a name or a served table (the second is invalid).
    """
    found: list[Found] = []
    for root in search_path():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            source = next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)
            if source is None:
                continue
            try:
                uc = load_file(source)
            except ConfigError as err:
                found.append(Found(_declared_name(source) or folder.name, source, error=str(err)))
                continue
            clash = next(
                (
                    (key, f)
                    for f in found
                    if f.use_case is not None
                    for key, mine, theirs in (
                        ("name", uc.name, f.use_case.name),
                        ("serving.table", uc.score_table, f.use_case.score_table),
                    )
                    if mine == theirs
                ),
                None,
            )
            if clash is not None:
                key, other = clash
                error = (
                    f"{source}: key {key}: expected a value no other use case has, found "
                    f"{getattr(uc, 'name' if key == 'name' else 'score_table')!r}, also in "
                    f"{other.source}"
                )
                found.append(Found(uc.name, source, error=error))
                continue
            found.append(Found(uc.name, source, uc))
    return sorted(found, key=lambda f: (f.name, str(f.source)))


def _declared_name(source: Path) -> str | None:
    """The ``name`` an invalid config declares, if it can be read (for its error's sake)."""
    try:
        if source.suffix == ".toml":
            data = tomllib.loads(source.read_text())
        else:
            import yaml

            data = yaml.safe_load(source.read_text())
    except Exception:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None


def load_all() -> list[UseCase]:
    """Every valid use case (invalid ones are reported by :func:`discover`)."""
    return [f.use_case for f in discover() if f.use_case is not None]


def names() -> list[str]:
    return [f.name for f in discover() if f.use_case is not None]


def load(name: str) -> UseCase:
    """The use case called ``name``.

    Raises:
        ConfigError: no such use case (the message lists the known ones and where they
            were looked for), or its config is invalid.
    """
    found = discover()
    for f in found:
        if f.name == name:
            if f.use_case is None:
                raise ConfigError(str(f.error))
            return f.use_case
    known = ", ".join(f.name for f in found) or "none"
    raise ConfigError(
        f"unknown use case {name!r}: expected one of [{known}] found in "
        f"{', '.join(str(p) for p in search_path())}; create it with `nightscore usecase init "
        f"{name}` (or set {ENV_USECASES} to the folder holding it)"
    )


def default_name(given: str | None = None) -> str:
    """The use case a command is about: ``--use-case``, ``$NIGHTSCORE_USE_CASE``, or the only one."""
    if given:
        return given
    if os.environ.get(ENV_USE_CASE):
        return os.environ[ENV_USE_CASE]
    valid = names()
    if len(valid) == 1:
        return valid[0]
    raise ConfigError(
        f"which use case? expected --use-case NAME (or {ENV_USE_CASE}), found "
        f"{len(valid)} use cases: {', '.join(valid) or 'none'}"
    )


def load_file(source: Path) -> UseCase:
    """Parse and validate one config file (YAML or TOML)."""
    source = source.resolve()
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the use case config: {exc}") from None
    try:
        if source.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # YAML and TOML syntax errors carry line numbers
        raise ConfigError(
            f"{source}: expected valid {source.suffix.lstrip('.').upper()}, found a syntax "
            f"error: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, found {type(data).__name__}")
    return _validate(_interpolate(data, source, ()), source.parent, source)


def _validate(data: dict[str, Any], folder: Path, source: Path) -> UseCase:
    try:
        uc = UseCase.model_validate(data, context={"folder": folder})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    uc = uc.model_copy(update={"folder": folder, "source": source})
    from pipeline.conf import contract

    contract.load_contract(uc.contract)  # the contract's own errors, at load time too
    return uc


def _describe(exc: ValidationError, source: Path) -> str:
    lines = []
    for e in exc.errors(include_url=False):
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind, message = e["type"], e["msg"]
        found = e.get("input")
        if kind == "missing":
            expected, shown = "a value (the key is required)", "nothing"
        elif kind == "extra_forbidden":
            expected = "one of " + ", ".join(_allowed_keys(e["loc"][:-1]))
            shown = f"unknown key {str(e['loc'][-1])!r}"
        else:
            expected = re.sub(r"^(Input should be|Value error, )\s*", "", message)
            shown = repr(found)
            if expected.startswith("an existing file") or " found " in expected:
                lines.append(f"{source}: key {key}: expected {expected}")
                continue
        lines.append(f"{source}: key {key}: expected {expected}, found {shown}")
    return "invalid use case config:\n" + "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``loc`` (for 'unknown key' errors)."""
    import typing

    model: Any = UseCase
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return []
        ann = field.annotation
        if typing.get_origin(ann) is dict:  # e.g. features: {name: rule}: skip the name
            ann = typing.get_args(ann)[1]
            if parts:
                parts.pop(0)
        candidates = (ann, *typing.get_args(ann))
        ann = next(
            (a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if ann is None:
            return []
        model = ann
    return sorted(
        (f.alias or n) for n, f in model.model_fields.items() if n not in ("folder", "source")
    )


def _interpolate(value: Any, source: Path, key: tuple[str, ...]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string value."""
    if isinstance(value, dict):
        return {k: _interpolate(v, source, (*key, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, (*key, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{source}: key {'.'.join(key)}: expected environment variable {name} to be set "
            f"(or a default: ${{{name}:-value}}), found it unset"
        )

    return _ENV_REF.sub(sub, value)


def _deep_merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _relative_files(data: Any, folder: Path) -> Any:
    """Absolute paths back to paths the validator resolves again against ``folder``."""
    if isinstance(data, dict):
        return {k: _relative_files(v, folder) for k, v in data.items()}
    if isinstance(data, Path):
        return str(data)
    return data


def iter_files(uc: UseCase) -> Iterator[tuple[str, Path]]:
    """(role, path) of each file the use case names, for listings."""
    yield "config", uc.source
    yield "contract", uc.contract
    for role in ("population", "features", "labels", "source_counts"):
        path = getattr(uc.sql, role)
        if path is not None:
            yield f"sql.{role}", path
    if uc.campaign is not None:
        yield "campaign.template", uc.campaign.template


def control_members(entity_keys: np.ndarray, uc: UseCase) -> np.ndarray:
    """The control-group flag of each key under ``uc``'s campaign (none without one)."""
    import numpy as np

    from pipeline.core import (
        keys,  # numpy and Arrow: not at import, the DAG files parse this module
    )

    if uc.campaign is None:
        return np.zeros(len(entity_keys), dtype=bool)
    return keys.control_group(entity_keys, uc.campaign.control_salt, uc.campaign.control_fraction)
