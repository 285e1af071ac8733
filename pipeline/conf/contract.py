"""Source contracts: the warehouse tables a use case reads, declared in YAML.

A contract (``usecases/<name>/contract.yaml``) names each table, its columns and their
types (families such as ``integer`` or ``timestamp``, or exact PostgreSQL names), the
column that dates a row, and the checks to run on it: freshness, daily volume (with a
calendar of days expected to be low or high), value rules, unique keys, null fractions and
the keys a column references in another table. This module is the format (typed,
validated, with errors naming file, key, expected and found); ``pipeline.stages.sources`` checks a
warehouse against it. It imports nothing heavy, so DAG parsing may validate contracts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

# Type families a contract may name; any other type string is an exact
# information_schema.columns.data_type name.
FAMILIES: Mapping[str, frozenset[str]] = {
    "integer": frozenset({"smallint", "integer", "bigint"}),
    "number": frozenset({"smallint", "integer", "bigint", "numeric", "real", "double precision"}),
    "text": frozenset({"text", "character varying", "character"}),
    "date": frozenset({"date"}),
    "timestamp": frozenset({"timestamp without time zone", "timestamp with time zone"}),
    "timestamptz": frozenset({"timestamp with time zone"}),
    "boolean": frozenset({"boolean"}),
}

# PostgreSQL's short spellings, which information_schema never reports: without this a
# contract saying ``varchar`` could never pass.
_ALIASES = {
    "int": "integer",
    "int2": "smallint",
    "int4": "integer",
    "int8": "bigint",
    "float4": "real",
    "float8": "double precision",
    "decimal": "numeric",
    "varchar": "character varying",
    "char": "character",
    "bpchar": "character",
    "bool": "boolean",
}

# The day of a row: data_type of the date column -> how its day is computed.
_DAY_KINDS = {
    "date": "date",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
}
_DATE_TYPES = {"date", "timestamp", "timestamptz", *_DAY_KINDS}


def type_name(declared: str) -> str:
    """The canonical spelling of a contract's type: a family, or an exact data_type."""
    name = " ".join(declared.lower().split())
    return _ALIASES.get(name, name)


def type_matches(declared: str, data_type: str) -> bool:
    """Whether a column of ``data_type`` (as information_schema reports it) satisfies the
    contract's type ``declared`` (a family such as ``integer``, or an exact name)."""
    name = type_name(declared)
    family = FAMILIES.get(name)
    if family is not None:
        return data_type in family
    return data_type.lower() == name


# -- the contract ------------------------------------------------------------------------


def _problem(expected: str, found: str, key: str | int | None = None) -> PydanticCustomError:
    """A validation error that ``load_contract`` renders as key, expected and found."""
    context: dict[str, Any] = {"expected": expected, "found": found}
    if key is not None:
        context["key"] = key
    return PydanticCustomError("contract", "expected {expected}, found {found}", context)


def _as_key(value: Any) -> Any:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and value and all(isinstance(c, str) for c in value):
        return tuple(value)
    raise _problem(
        "a column name or a non-empty list of column names (e.g. order_id or [order_id, line_no])",
        _show(value),
    )


UniqueKey = Annotated[tuple[str, ...], BeforeValidator(_as_key)]

ALL_HISTORY = 36_500  # ``lookback_days: all``: every day a table holds (a century)


def _as_days(value: Any) -> Any:
    if value == "all":
        return ALL_HISTORY
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise _problem("a number of days (1 or more) or all", _show(value))


Lookback = Annotated[int, BeforeValidator(_as_days)]
_FROZEN = ConfigDict(extra="forbid", frozen=True)
_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*")


class ColumnSpec(BaseModel):
    """A declared column: its type and, optionally, its own null limit and the key it
    references.

    ``type`` is a family (``integer``, ``number``, ``text``, ``date``, ``timestamp``,
    ``timestamptz``, ``boolean``) or an exact PostgreSQL data_type (``numeric``,
    ``jsonb``, ...). The short form ``column: type`` is accepted.

    ``references: <table>.<column>`` names a table of the contract whose column holds
    every value of this one (a fact's entity key, say). The rows of the contract's new
    days (``new_days``) whose value the referenced column lacks are orphans; more than
    ``max_orphan_fraction`` of those rows (default 0: any orphan) fail. NULL references
    nothing (null limits govern it).
    """

    model_config = _FROZEN

    type: str = Field(min_length=1)
    max_null_fraction: float | None = Field(default=None, ge=0, le=1)
    references: str | None = None
    max_orphan_fraction: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict | ColumnSpec):
            return value
        raise _problem("a type name or a mapping {type, max_null_fraction}", _show(value))

    @field_validator("references")
    @classmethod
    def _table_dot_column(cls, value: str | None) -> str | None:
        if value is not None and not _REFERENCE.fullmatch(value):
            raise _problem("<table>.<column>, e.g. members.member_id", _show(value))
        return value

    @model_validator(mode="after")
    def _limit_needs_a_reference(self) -> ColumnSpec:
        if self.max_orphan_fraction and self.references is None:
            raise _problem(
                "references: <table>.<column> beside max_orphan_fraction",
                "no references",
                "max_orphan_fraction",
            )
        return self

    @property
    def referenced(self) -> tuple[str, str] | None:
        """The (table, column) this column references, if any."""
        if self.references is None:
            return None
        table, _, column = self.references.partition(".")
        return table, column

    def accepts(self, data_type: str) -> bool:
        """Whether a column of ``data_type`` satisfies this declaration."""
        return type_matches(self.type, data_type)


def calendar_day(text: str) -> date | tuple[int, int]:
    """A calendar entry's day: a date (``YYYY-MM-DD``), or (month, day) every year
    (``MM-DD``).

    Raises:
        ValueError: ``text`` is neither.
    """
    if re.fullmatch(r"\d{2}-\d{2}", text):
        every_year = date.fromisoformat(f"2000-{text}")  # a leap year: 02-29 is a day
        return every_year.month, every_year.day
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return date.fromisoformat(text)
    raise ValueError(text)


class VolumeDays(BaseModel):
    """Days of a table's volume calendar: expected to be low or high, with their own bounds.

    ``days`` are ``MM-DD`` (every year: ``12-25``) or ``YYYY-MM-DD`` (one date: a moving
    holiday such as Good Friday, a sale). A bound left out is the table's own.
    """

    model_config = _FROZEN

    days: tuple[str, ...]
    min_ratio: float | None = Field(default=None, ge=0)
    max_ratio: float | None = Field(default=None, gt=0)

    @field_validator("days", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("days")
    @classmethod
    def _days(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise _problem("at least one day", "[]")
        for i, text in enumerate(value):
            try:
                calendar_day(text)
            except ValueError:
                raise _problem(
                    "a day as MM-DD (every year) or YYYY-MM-DD (that date)", _show(text), i
                ) from None
        return value

    @model_validator(mode="after")
    def _bounded(self) -> VolumeDays:
        if self.min_ratio is None and self.max_ratio is None:
            raise _problem("min_ratio or max_ratio (the bounds of these days)", "neither")
        if (
            self.min_ratio is not None
            and self.max_ratio is not None
            and self.max_ratio < self.min_ratio
        ):
            raise _problem(
                f"a number >= min_ratio ({self.min_ratio})", _show(self.max_ratio), "max_ratio"
            )
        return self


_Bounds = tuple[float | None, float | None]
_CalendarIndex = tuple[dict[date, _Bounds], dict[tuple[int, int], _Bounds]]

# The calendar of a table that declares none: the Christmas and New Year days, when shops,
# offices and B2B products run low (24, 25 Dec, 1 Jan) or sales run high (26 Dec). Off with
# ``calendar: []``; a calendar of one's own replaces it.
DEFAULT_CALENDAR = (
    VolumeDays(days=("12-24", "12-25", "12-26", "12-31", "01-01"), min_ratio=0.0, max_ratio=3.0),
)


class VolumeSpec(BaseModel):
    """How many rows a day should hold. ``daily_volume`` judges the last complete day and
    ``days_complete`` every other day of the window (``pipeline.stages.source_days.judge_day``).

    A day's expected rows are the median of its peers: the same weekday in the
    ``trailing_days`` before it (``weekly``; else every one of those days), and, for a day
    of the window, the window's other days of its weekday; days of the calendar are no
    peers. A day passes within ``[min_ratio, max_ratio]`` x expected, or within
    ``noise_sd`` standard deviations of counting noise of it (so a table of a few rows a
    day is not stopped by chance; 0 turns this off). ``calendar`` lists the days expected
    to be low or high, with their own bounds: ``DEFAULT_CALENDAR`` unless given. The
    defaults are chosen from ``benchmarks/volume.py`` (README, "Daily volume")."""

    model_config = _FROZEN

    min_ratio: float = Field(default=0.4, ge=0)
    max_ratio: float = Field(default=1.7, gt=0)
    trailing_days: int = Field(default=28, ge=1)
    weekly: bool = True
    noise_sd: float = Field(default=4.0, ge=0)
    calendar: tuple[VolumeDays, ...] = DEFAULT_CALENDAR
    # the calendar's days, looked up once per day judged: indexed with the calendar they
    # index (``model_copy`` may replace it)
    _days: tuple[tuple[VolumeDays, ...], _CalendarIndex] = PrivateAttr()

    @model_validator(mode="after")
    def _ordered(self) -> VolumeSpec:
        if self.max_ratio < self.min_ratio:
            raise _problem(
                f"a number >= min_ratio ({self.min_ratio})", _show(self.max_ratio), "max_ratio"
            )
        if self.weekly and self.trailing_days < 7:
            raise _problem(
                "at least 7 days when weekly (the default) compares a day with its weekday",
                _show(self.trailing_days),
                "trailing_days",
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._days = (self.calendar, _calendar_index(self.calendar))

    def bounds(self, day: date) -> tuple[float, float] | None:
        """The ratio bounds of ``day`` when the calendar lists it (the last entry that
        does, a dated one before any yearly one), else None."""
        if self._days[0] is not self.calendar:
            self._days = (self.calendar, _calendar_index(self.calendar))
        dated, yearly = self._days[1]
        found = dated.get(day) or yearly.get((day.month, day.day))
        if found is None:
            return None
        low, high = found
        return (
            self.min_ratio if low is None else low,
            self.max_ratio if high is None else high,
        )


def _calendar_index(calendar: tuple[VolumeDays, ...]) -> _CalendarIndex:
    dated: dict[date, _Bounds] = {}
    yearly: dict[tuple[int, int], _Bounds] = {}
    for entry in calendar:
        for text in entry.days:
            day = calendar_day(text)
            if isinstance(day, date):
                dated[day] = (entry.min_ratio, entry.max_ratio)
            else:
                yearly[day] = (entry.min_ratio, entry.max_ratio)
    return dated, yearly


class TableSpec(BaseModel):
    """One source table: its columns, the column that dates a row, and its checks.

    A table without ``date_column`` is a dimension: its rules and null fractions look at
    the whole table, and it has no freshness, future-row or volume check. ``unique`` are
    its fact keys (a duplicated fact fails); ``not_null`` columns may hold no NULL at all
    (the use case's entity key never may, wherever it appears).
    """

    model_config = _FROZEN

    columns: dict[str, ColumnSpec]
    date_column: str | None = None
    fresh: bool = False
    volume: VolumeSpec | None = None
    unique: tuple[UniqueKey, ...] = ()
    not_null: tuple[str, ...] = ()
    rules: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    # How far back the use case's SQL reads this table (days before the run date, or
    # ``all``); the contract's ``lookback_days`` when unset.
    lookback_days: Lookback | None = None

    @field_validator("columns")
    @classmethod
    def _some_columns(cls, value: dict[str, ColumnSpec]) -> dict[str, ColumnSpec]:
        if not value:
            raise _problem("at least one column", "{}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TableSpec:
        declared = ", ".join(self.columns)
        if self.date_column is not None:
            if self.date_column not in self.columns:
                raise _problem(
                    f"one of the columns listed under columns ({declared})",
                    _show(self.date_column),
                    "date_column",
                )
            dtype = self.columns[self.date_column].type
            if type_name(dtype) not in _DATE_TYPES:
                raise _problem(
                    "a column of type date, timestamp or timestamptz",
                    f"{self.date_column} of type {dtype}",
                    "date_column",
                )
        else:
            if self.fresh:
                raise _problem("a date_column for the freshness check", "fresh: true", "fresh")
            if self.volume is not None:
                raise _problem("a date_column for the volume check", "volume", "volume")
        for i, key in enumerate(self.unique):
            missing = [c for c in key if c not in self.columns]
            if missing:
                raise _problem(
                    f"columns listed under columns ({declared})",
                    ", ".join(missing),
                    f"unique[{i}]",
                )
        unknown = [c for c in self.not_null if c not in self.columns]
        if unknown:
            raise _problem(
                f"columns listed under columns ({declared})", ", ".join(unknown), "not_null"
            )
        return self


class Relation(BaseModel):
    """A rule across two tables joined on equal columns (``using``, as in SQL), e.g. no
    cancellation before the customer signed up: ``rule`` is SQL over both, naming columns
    as ``table.column``; every joined row must satisfy it (the whole tables are checked)."""

    model_config = _FROZEN

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    table: str
    join: str
    using: tuple[str, ...] = Field(min_length=1)
    rule: str = Field(min_length=1)

    @field_validator("using", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class Contract(BaseModel):
    """The source contract of one use case: the warehouse tables its SQL reads."""

    model_config = _FROZEN

    tables: dict[str, TableSpec]
    window_days: int = Field(default=30, ge=1)
    max_null_fraction: float = Field(default=0.01, ge=0, le=1)
    timezone: str | None = None
    relations: tuple[Relation, ...] = ()
    # Past days' row counts may change between runs (late corrections) by this fraction of
    # the rows a run saw before it fails; any change at all warns.
    max_rewritten_fraction: float = Field(default=0.005, ge=0, le=1)
    # The days a run at D reads as new: rows dated in [D - new_days, D). 1 is the day the
    # night adds (D - 1): the references checks read those rows only.
    new_days: int = Field(default=1, ge=1)
    # How far back the use case's SQL reads its tables (a table may say otherwise): the days
    # whose rows and content ``history_unchanged`` compares from one night to the next. The
    # use case's windows and ``window_days`` count too, whichever is longest.
    lookback_days: Lookback | None = None

    def lookback(self, table: str, windows: Mapping[str, int] | None = None) -> int:
        """Days before a run date that the use case reads of ``table``: its own
        ``lookback_days``, else the contract's, but never fewer than ``window_days`` nor
        than the longest window the use case keeps over it (``windows``: table -> days)."""
        spec = self.tables[table]
        declared = spec.lookback_days or self.lookback_days or 0
        return max(declared, self.window_days, (windows or {}).get(table, 0))

    @field_validator("tables")
    @classmethod
    def _some_tables(cls, value: dict[str, TableSpec]) -> dict[str, TableSpec]:
        if not value:
            raise _problem("at least one table", "{}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise _problem(
                "an IANA time zone name such as UTC or America/New_York", _show(value)
            ) from None
        return value

    @model_validator(mode="after")
    def _relations_name_tables(self) -> Contract:
        for i, rel in enumerate(self.relations):
            for key in ("table", "join"):
                name = getattr(rel, key)
                if name not in self.tables:
                    raise _problem(
                        f"a table of the contract ({', '.join(self.tables)})",
                        _show(name),
                        f"relations[{i}].{key}",
                    )
            for column in rel.using:
                for table in (rel.table, rel.join):
                    if column not in self.tables[table].columns:
                        raise _problem(
                            f"a column of both {rel.table} and {rel.join}",
                            _show(column),
                            f"relations[{i}].using",
                        )
        return self

    @model_validator(mode="after")
    def _references_name_columns(self) -> Contract:
        for name, spec in self.tables.items():
            for column, declared in spec.columns.items():
                if declared.referenced is None:
                    continue
                key = f"tables.{name}.columns.{column}.references"
                table, target = declared.referenced
                if table not in self.tables:
                    raise _problem(
                        f"a table of the contract ({', '.join(self.tables)})", _show(table), key
                    )
                columns = self.tables[table].columns
                if target not in columns:
                    raise _problem(
                        f"a column of {table} ({', '.join(columns)})", _show(target), key
                    )
                if not _comparable(declared.type, columns[target].type):
                    raise _problem(
                        f"a column whose type compares with {column}'s ({declared.type})",
                        f"{table}.{target} of type {columns[target].type}",
                        key,
                    )
        return self

    def null_limit(self, table: str, column: str, entity_key: str | None = None) -> float:
        """The largest fraction of nulls allowed in ``table.column`` (0 for ``not_null``
        columns and the entity key)."""
        spec = self.tables[table]
        if column in spec.not_null or column == entity_key:
            return 0.0
        own = spec.columns[column].max_null_fraction
        return self.max_null_fraction if own is None else own


def _comparable(one: str, other: str) -> bool:
    """Whether columns of the declared types ``one`` and ``other`` compare with ``=``."""
    a, b = (FAMILIES.get(type_name(t), frozenset({type_name(t)})) for t in (one, other))
    return bool(a & b) or (a | b) <= FAMILIES["number"]


def dated_tables(contract: Contract) -> list[str]:
    """The tables of ``contract`` that have a ``date_column``, in contract order."""
    return [name for name, spec in contract.tables.items() if spec.date_column is not None]


class _ContractLoader(yaml.SafeLoader):
    """Safe YAML that rejects a key given twice (PyYAML would keep the last silently)."""


def _mapping_without_duplicates(loader: Any, node: Any) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"key {key!r} given twice",
                key_node.start_mark,
            )
    return dict(loader.construct_mapping(node, deep=True))


_ContractLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_contract(path: Path) -> Contract:
    """Read and validate a source contract file.

    Raises:
        ConfigError: the file is missing, is not YAML, or does not match the format; the
            message names the file, the key path (``tables.<table>.volume.min_ratio``),
            what was expected and what was found, one line per problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"source contract {path}: expected a readable YAML file, found {exc.strerror or exc}"
        ) from exc
    try:
        data = yaml.load(text, Loader=_ContractLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(path, exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"source contract {path}: (top level): expected a mapping with the keys "
            f"{', '.join(Contract.model_fields)}, found "
            f"{'an empty file' if data is None else _show(data)}"
        )
    try:
        return Contract.model_validate(data)
    except ValidationError as exc:
        lines = [f"source contract {path}: {problem}" for problem in _problems(exc)]
        raise ConfigError("\n".join([*lines, "Fix the file and re-run."])) from exc


def _yaml_message(path: Path, exc: yaml.YAMLError) -> str:
    def where(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} started at {where(context_mark)})"
    at = where(mark) if mark is not None else "(file)"
    return f"source contract {path}: {at}: expected valid YAML, found this YAML error: {problem}"


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        ctx = error.get("ctx") or {}
        kind = error["type"]
        if kind == "contract":
            if "key" in ctx:
                loc = (*loc, ctx["key"])
            expected, found = str(ctx["expected"]), str(ctx["found"])
        elif kind == "extra_forbidden":
            expected = f"one of the keys {', '.join(_model_at(loc).model_fields)}"
            found = f"unknown key {loc[-1]!r}"
        elif kind == "missing":
            expected, found = f"the key {loc[-1]!r}", "no such key"
        else:
            expected, found = _expected_from(error["msg"]), _show(error.get("input"))
        out.append(f"{_key_path(loc)}: expected {expected}, found {found}")
    return out


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model that holds the last key of ``loc``."""
    parents = loc[:-1]
    if len(parents) < 2 or parents[0] != "tables":
        return Contract
    rest = parents[2:]
    if rest[:2] == ("volume", "calendar"):
        return VolumeDays
    if rest[:1] == ("volume",):
        return VolumeSpec
    if rest[:1] == ("columns",) and len(rest) == 2:
        return ColumnSpec
    return TableSpec


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            path += " (the key)"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _expected_from(message: str) -> str:
    text = message.removeprefix("Input should be ").split(", ")[0]
    text = text.replace("a valid dictionary", "a mapping").replace("a valid tuple", "a list")
    if message.startswith("Input should be") and not text.startswith(("a ", "an ")):
        text = f"a value {text}"
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
