"""Use cases are files: ``usecases/<name>/usecase.yaml`` plus the SQL and contract it names.

Everything that differs between one prediction use case and the next (or between this
warehouse and someone else's) lives in a use case folder: the entity key, the warehouse
connection and schema, the feature, label and population SQL, the source contract, the
horizon and training window, the model, the gates, the feature checks, the schedule, the
served table and an optional campaign. The code holds none of it.

Use cases are discovered at run time in the folders of ``$NIGHTSCORE_USECASES`` (paths
separated by ``:``; default ``<repository>/usecases``) and validated into a typed,
frozen ``UseCase``, assembled from the blocks of ``pipeline.conf.sections``. Every error
names the file, the key, what was expected and what was found. Every file a use case uses is named in its config (paths are relative to its
folder); nothing is derived from the use case's name.

String values may refer to environment variables: ``${VAR}`` or ``${VAR:-default}``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.conf.sections import (
    IDENTIFIER,
    Alerts,
    Campaign,
    Entity,
    FeatureChecks,
    Gates,
    Label,
    ModelSpec,
    Monitoring,
    Report,
    Schedule,
    Section,
    Serving,
    SqlFiles,
    State,
    Training,
    Warehouse,
    Window,
    existing_file,
    identifier,
)
from pipeline.core.errors import ConfigError
from pipeline.core.paths import REPO_ROOT

if TYPE_CHECKING:
    import numpy as np

ENV_USECASES = "NIGHTSCORE_USECASES"
ENV_USE_CASE = "NIGHTSCORE_USE_CASE"
CONFIG_NAMES = ("usecase.yaml", "usecase.yml", "usecase.toml")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UseCase(Section):
    """One prediction use case, validated from its folder. Frozen; build with :func:`load`."""

    name: str = identifier(40)
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
        return existing_file(value, info)

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
