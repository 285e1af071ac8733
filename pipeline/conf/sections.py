"""The blocks of a use case's config, one frozen pydantic model each.

Each block of ``usecase.yaml`` (``entity``, ``warehouse``, ``sql``, ``windows``,
``states``, ``training``, ``model``, ``gates``, ``feature_checks``, ``schedule``,
``serving``, ``monitoring``, ``report``, ``alerts``, ``campaign``, ...) is validated into
a ``Section``: unknown keys are refused, every value is checked against what it may hold
(SQL identifiers, existing files relative to the use case's folder, IANA time zones, cron
expressions, durations, ranges) and each validator's message says what was expected.
``pipeline.conf.usecase`` assembles them into a ``UseCase``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

IDENTIFIER = r"^[a-z_][a-z0-9_]*$"
# Staging tables append ``_stage_YYYYMMDD_xxxxxxxx`` (24 characters) to the served table's
# name; PostgreSQL identifiers stop at 63.
MAX_TABLE_NAME = 35
# Airflow's email notifier (the smtp provider): the default of ``alerts.notifier``
DEFAULT_NOTIFIER = "airflow.providers.smtp.notifications.smtp.SmtpNotifier"


class Section(BaseModel):
    """A block of the config: frozen, no unknown keys, read by its alias or its name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def identifier(max_length: int = 63) -> Any:
    """A field holding a lower-case SQL identifier of at most ``max_length`` characters."""
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


def existing_file(value: str | Path, info: ValidationInfo) -> Path:
    """A file named in the config, relative to the use case's folder; it must exist.

    Raises:
        ValueError: no such file (pydantic reports it as the key's error).
    """
    folder = Path((info.context or {}).get("folder", "."))
    path = (folder / value).resolve()
    if not path.is_file():
        raise ValueError(
            f"an existing file (relative to {folder}), found {str(value)!r}: no such file"
        )
    return path


class Entity(Section):
    """What one prediction is about: the key column every SQL file returns."""

    key: str = identifier()
    type: Literal["bigint", "text"] = "bigint"


class Warehouse(Section):
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
    # feature query no faster (docs/scaling.md, "Session settings"); a warehouse whose
    # date indexes are BRIN may need random_page_cost (docs/scaling.md, first section).
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


class SqlFiles(Section):
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
        return None if value is None else existing_file(value, info)


class Aggregate(Section):
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


class Window(Section):
    """Rolling per-entity aggregates of one dated fact table (``pipeline.stages.windows``).

    The features query reads them as a table named after the block: one row per entity
    with a row in the longest window, a column per aggregate. nightscore keeps them from
    one night to the next (the night before's values, plus the day that enters each
    window, minus the day that leaves it) instead of rescanning the facts.
    """

    table: str = identifier()
    date: str = identifier()
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


class StateTable(Section):
    """A table a kept state is built from: its date column, and how many days before the
    snapshot date the state reads (none: every day, e.g. the newest row ever)."""

    date: str = identifier()
    days: int | None = Field(default=None, ge=1, le=36500)


class State(Section):
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
        return existing_file(value, info)

    @field_validator("tables")
    @classmethod
    def _table_names(cls, value: dict[str, StateTable]) -> dict[str, StateTable]:
        bad = [n for n in value if not re.match(IDENTIFIER, n)]
        if bad:
            raise ValueError(f"table names are SQL identifiers, found {', '.join(map(repr, bad))}")
        return value


class Label(Section):
    horizon_days: int = Field(default=30, ge=1, le=3650)


class Training(Section):
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


class ModelSpec(Section):
    """The estimator (preprocessing is chosen to suit it) and its parameters."""

    estimator: Literal["hist_gradient_boosting", "logistic_regression"] = "hist_gradient_boosting"
    params: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    seed: int = 20240601


class Gates(Section):
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


class FeatureRule(Section):
    """Limits for one feature; ``None`` means no limit.

    ``max_unseen_share``: a categorical feature whose rows hold a value its training data
    never saw (a new market, a value re-spelled) stops the night above this share; below
    it, above ``unseen_share_limit``, it warns and requests a retrain.
    """

    max_null_fraction: float | None = Field(default=None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    max_unseen_share: float | None = Field(default=0.2, ge=0, le=1)


class FeatureChecks(Section):
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


class Schedule(Section):
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


class Alerts(Section):
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


class Serving(Section):
    """The served table ``predictions.<table>`` and its views, generated by ``db init``."""

    table: str = identifier(MAX_TABLE_NAME)
    probability_column: str = Field(default="probability", pattern=IDENTIFIER, max_length=63)
    partitions: int = Field(default=2, ge=1, le=64)
    # The Airflow pool the scoring tasks take slots of: its size caps how many partitions
    # score at once across all workers (and so the serving-database connections they hold).
    pool: str = Field(default="default_pool", pattern=r"^[A-Za-z0-9_.-]+$", max_length=256)
    batch_rows: int = Field(default=50_000, ge=1000)
    retention_dates: int = Field(default=400, ge=1)


class Monitoring(Section):
    """When a served model counts as decayed: its realized ROC AUC more than
    ``decay_threshold`` below its holdout AUC, or its realized calibration error more than
    ``calibration_threshold`` above its holdout's. A decayed model's use case retrains, and
    its next challenger needs only not to be shown worse (``gates.decayed_promote_confidence``)."""

    decay_threshold: float = Field(default=0.05, ge=-1, le=1)
    calibration_threshold: float = Field(default=0.03, ge=0, le=1)
    score_drift_limit: float = Field(default=0.25, gt=0)


class Report(Section):
    """What the nightly and evaluation reports break down by.

    ``segments``: feature columns (categorical, e.g. a country) whose values each get a row
    of scores in the nightly report and of metrics in the evaluation report; none by default.
    """

    segments: list[Annotated[str, Field(pattern=IDENTIFIER, max_length=63)]] = Field(
        default_factory=list, max_length=5
    )


class Contacts(Section):
    """Where the campaign finds each entity's contact details (a warehouse table)."""

    table: str = identifier()
    key: str = identifier()
    first_name: str = identifier()
    email: str = identifier()
    opt_in: str = identifier()


class Experiment(Section):
    """The power calculation's assumptions (shown by ``nightscore usecase show``)."""

    base_rate: float = Field(default=0.12, gt=0, lt=1)
    effect: float = Field(default=0.03, gt=0, lt=1)
    campaigns_per_week: float = Field(default=1.0, gt=0)
    weeks: int = Field(default=8, ge=1)


class Policy(Section):
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


class Campaign(Section):
    """An email campaign fed by the scores; no block, no campaign DAG.

    Its tables are ``campaigns.<name>_audience``, ``_control_band``, ``_send_log`` and
    ``_opt_outs``. The permanent control group is a salted hash of the entity key: changing
    the salt or the fraction starts a new control group (uplift before and after is not
    comparable).
    """

    name: str = identifier(30)
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
        return existing_file(value, info)

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
