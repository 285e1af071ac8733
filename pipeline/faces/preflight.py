"""``nightscore usecase check | show | init``: the first things a new user runs.

``check`` tries a use case against its warehouse as of a date, item by item, the way a
night would use it: the serving objects, the warehouse connection, the source contract,
the history the training window needs, one feature snapshot and one labelled snapshot,
population/label alignment, label maturity, class balance and the holdout's positives
against the gate's minimum. Each item is one readable line; any failure makes the
command exit non-zero.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pipeline.conf import contract as contracts
from pipeline.conf import sections, usecase
from pipeline.conf.config import Settings, load_settings
from pipeline.conf.urls import redact
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ConfigError, NightscoreError
from pipeline.stages import features, sources
from pipeline.store import serving

log = logging.getLogger(__name__)

SKELETON = Path(__file__).resolve().parent / "skeleton"


@dataclass
class Item:
    name: str
    status: str  # ok, FAIL, warn, skip
    detail: str


@dataclass
class Report:
    use_case: str
    as_of: date
    items: list[Item] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.status != "FAIL" for i in self.items)

    def text(self) -> str:
        lines = [f"use case {self.use_case} as of {self.as_of}:"]
        lines += [f"  {i.status:4}  {i.name:20} {i.detail}" for i in self.items]
        failed = sum(i.status == "FAIL" for i in self.items)
        lines.append(
            f"{'ready' if not failed else f'{failed} item(s) failed'}: "
            + (
                f"`nightscore run --use-case {self.use_case} --date {self.as_of}` runs a night"
                if not failed
                else "fix them and run this check again"
            )
        )
        return "\n".join(lines)


def check(name: str, as_of: date) -> Report:
    """Check use case ``name`` for a run at ``as_of``; never raises on bad data or config."""
    report = Report(name, as_of)
    add = report.items.append
    try:
        uc = usecase.load(name)
    except ConfigError as err:
        add(Item("config", "FAIL", str(err).replace("\n", " | ")))
        return report
    add(Item("config", "ok", f"{uc.source}"))
    settings = load_settings(uc=uc)
    state: dict[str, Any] = {}

    def step(item: str, body: Callable[[], tuple[str, str]], needs: tuple[str, ...] = ()) -> None:
        blocked = [n for n in needs if not state.get(n)]
        if blocked:
            add(Item(item, "skip", f"needs {', '.join(blocked)}"))
            return
        try:
            status, detail = body()
        except NightscoreError as err:
            status, detail = "FAIL", str(err).replace("\n", " | ")
        except Exception as err:  # a check must report, never crash the command
            log.debug("check %s failed", item, exc_info=True)
            status, detail = "FAIL", f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        state[item] = status != "FAIL"
        add(Item(item, status, detail))

    step("serving objects", lambda: _serving(settings, uc))
    step("warehouse", lambda: _warehouse(settings))
    step("contract", lambda: _contract(settings, uc, as_of), ("warehouse",))
    step("history", lambda: _history(settings, uc, as_of), ("warehouse",))
    step("model", lambda: _model(uc))
    step("features", lambda: _features(settings, uc, as_of, state), ("warehouse",))
    holdout = as_of - timedelta(days=uc.label.horizon_days)
    step("label maturity", lambda: _maturity(uc, as_of))
    step("labels", lambda: _labels(settings, uc, holdout, as_of, state), ("warehouse",))
    step("class balance", lambda: _balance(uc, state), ("labels",))
    step("holdout positives", lambda: _positives(uc, state), ("labels",))
    if uc.campaign is not None:
        step("campaign", lambda: _campaign(settings, uc), ("warehouse",))
    return report


def _serving(settings: Settings, uc: UseCase) -> tuple[str, str]:
    gone = serving.missing(settings, uc)
    if gone:
        return "FAIL", f"missing {', '.join(gone)}: run `nightscore db init`"
    return "ok", ", ".join(o.qualified for o in serving.objects(uc))


def _warehouse(settings: Settings) -> tuple[str, str]:
    from pipeline.store import db

    found = db.scalar(
        settings.warehouse_url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
        (settings.warehouse_schema,),
    )
    where = (
        f"{redact(settings.warehouse_url)} schema {settings.warehouse_schema} "
        f"(from {settings.warehouse_source})"
    )
    if not found:
        return "FAIL", f"{where}: the schema has no tables; check warehouse.schema"
    return "ok", f"{where}: {found} tables"


def _contract(settings: Settings, uc: UseCase, as_of: date) -> tuple[str, str]:
    contract = contracts.load_contract(uc.contract)
    results = sources.check_sources(
        settings.warehouse_url,
        settings.warehouse_schema,
        contract,
        as_of,
        uc.warehouse.timezone,
        uc.entity_key,
    )
    failed = [r for r in results if not r.passed and r.severity == "fail"]
    if failed:
        shown = "; ".join(r.describe() for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        return "FAIL", f"{len(failed)} of {len(results)} source checks failed: {shown}{more}"
    return "ok", f"{len(results)} source checks on {len(contract.tables)} tables pass"


def _history(settings: Settings, uc: UseCase, as_of: date) -> tuple[str, str]:
    contract = contracts.load_contract(uc.contract)
    dated = contracts.dated_tables(contract)
    if not dated:
        return "FAIL", (
            f"the contract ({uc.contract.name}) declares no table with a date_column: nightscore "
            "replays the warehouse as of past dates (features from facts dated before D, the "
            "outcome from events dated in [D, D + horizon)), so it needs dated facts: at least "
            "the events or records the features count, with a date or timestamp, and the date "
            "of the outcome. A table that only holds a label, with no dates, cannot be replayed"
        )
    starts = sources.table_starts(
        settings.warehouse_url, settings.warehouse_schema, contract, as_of, uc.warehouse.timezone
    )
    oldest = as_of - timedelta(days=uc.history_days())
    window = f"the training window needs facts from {oldest} ({uc.history_text()})"
    empty = [name for name, day in starts.items() if day is None]
    if empty:
        return "FAIL", f"no rows dated before {as_of} in {', '.join(empty)}; {window}"
    # every dated table must reach back far enough: the latest start binds
    table, start = max(((n, d) for n, d in starts.items() if d), key=lambda t: t[1])
    missing = (start - oldest).days
    if missing > 0:
        earliest = start + timedelta(days=uc.history_days())
        return "FAIL", (
            f"{window}; {table} starts {start}: {missing} days missing. Shorten the window "
            f"(training.snapshots, training.step_days, label.horizon_days in {uc.source.name}) "
            f"or run {earliest} or later"
        )
    return "ok", f"every dated table reaches back to {start} or earlier ({table}); {window}"


def _model(uc: UseCase) -> tuple[str, str]:
    from pipeline.stages import train

    train.build_model(uc, [], [])
    return "ok", f"{uc.model.estimator} {uc.model.params or '(defaults)'}"


def _features(
    settings: Settings, uc: UseCase, as_of: date, state: dict[str, Any]
) -> tuple[str, str]:
    import pyarrow as pa

    from pipeline.stages import checks

    snap = features.build_snapshot(settings, uc, as_of)
    table = features.read_snapshot(snap)
    columns = features.feature_columns(table.schema, uc)
    categorical = [c for c in columns if pa.types.is_string(table.schema.field(c).type)]
    problems = [
        r.describe()
        for r in checks.check_features(table, uc, None, None)
        if not r.passed and r.severity == "fail"
    ]
    state["population"] = snap.rows
    detail = (
        f"{snap.rows:,} {uc.entity_key} as of {as_of}; {len(columns)} features "
        f"({len(categorical)} categorical: {', '.join(categorical) or 'none'})"
    )
    if not columns:
        return "FAIL", f"{detail}: the features query returns no feature beside the key"
    if problems:
        return "FAIL", f"{detail}; feature checks: {'; '.join(problems[:5])}"
    return "ok", detail


def _maturity(uc: UseCase, as_of: date) -> tuple[str, str]:
    holdout = as_of - timedelta(days=uc.label.horizon_days)
    train = features.training_dates(uc, as_of)[0]
    return "ok", (
        f"a run at {as_of} holds out {holdout} (its labels close on {as_of}); trains on "
        f"{len(train)} snapshots {train[0]} .. {train[-1]}, every {uc.training.step_days} days"
    )


def _labels(
    settings: Settings, uc: UseCase, holdout: date, as_of: date, state: dict[str, Any]
) -> tuple[str, str]:
    snap = features.build_snapshot(settings, uc, holdout, labelled=True, known_through=as_of)
    y = features.read_snapshot(snap, ["label"]).column("label").to_numpy()
    state["holdout_rows"], state["holdout_positives"] = len(y), int(y.sum())
    return "ok", (
        f"holdout {holdout}: {len(y):,} rows, every {uc.entity_key} of the features query "
        f"labelled once ({uc.sql.labels.name} and {uc.sql.features.name} agree)"
    )


def _balance(uc: UseCase, state: dict[str, Any]) -> tuple[str, str]:
    rows, positives = state["holdout_rows"], state["holdout_positives"]
    rate = positives / rows if rows else 0.0
    detail = f"{positives:,} positives of {rows:,} ({rate:.2%})"
    if positives == 0 or positives == rows:
        return "FAIL", f"{detail}: a model needs both outcomes; check {uc.sql.labels.name}"
    return ("warn" if rate < 0.001 or rate > 0.5 else "ok"), detail


POOL_BELOW = 100  # holdout positives under which pooling holdout dates is suggested


def _positives(uc: UseCase, state: dict[str, Any]) -> tuple[str, str]:
    positives, need = state["holdout_positives"], uc.gates.min_holdout_positives
    pooled = uc.training.holdout_snapshots
    per_date = f"{positives} positives on the newest holdout date"
    if positives * pooled < need:
        return "FAIL", (
            f"{per_date} (x {pooled} pooled: training.holdout_snapshots), the gates need {need} "
            "(gates.min_holdout_positives): no challenger could be promoted. Pool more "
            "holdout dates (training.holdout_snapshots), lengthen label.horizon_days or widen "
            "the population; lowering the minimum makes the comparison a coin toss"
        )
    pooling = f", about {positives * pooled} over {pooled} pooled dates" if pooled > 1 else ""
    detail = f"{per_date}{pooling} >= gates.min_holdout_positives {need}"
    if positives * pooled < POOL_BELOW:
        return "warn", (
            f"{detail}; with under {POOL_BELOW} the gates promote only about half to three "
            "quarters of the challengers better by 0.02 AUC (README: Gates and their error "
            "rates): training.holdout_snapshots 2 or 3 pools more evidence"
        )
    return "ok", detail


def _campaign(settings: Settings, uc: UseCase) -> tuple[str, str]:
    import numpy as np

    from pipeline.campaigns import campaign, reasons, selection, sending

    cfg = campaign.configured(uc)
    reasons.reason_templates(uc)
    sending.render(uc, "Alex", ["a reason"])
    c = cfg.contacts
    empty = np.array([], dtype=np.int64 if uc.entity.type == "bigint" else object)
    selection.contacts(settings, uc, empty)
    return "ok", (
        f"contacts {c.table}({c.key}, {c.first_name}, {c.email}, {c.opt_in}); template "
        f"{cfg.template.name}; {len(cfg.reasons)} reason phrases"
    )


def show(uc: UseCase) -> str:
    """The resolved config (defaults filled in), its files, where it reads and what it serves."""
    import yaml

    settings = load_settings(uc=uc)
    data = uc.model_dump(by_alias=True, mode="json")
    lines = [
        f"# {uc.name}: {uc.source}",
        f"# warehouse: {redact(settings.warehouse_url)} schema {settings.warehouse_schema} "
        f"(from {settings.warehouse_source})",
        f"# history needed before a run date: {uc.history_days()} days",
        "# files: " + ", ".join(f"{role}={path.name}" for role, path in usecase.iter_files(uc)),
        "# serving objects: " + ", ".join(o.qualified for o in serving.objects(uc)),
        "# DAGs: "
        + ", ".join(
            f"{uc.name}_{kind}"
            for kind in ("nightly", "monitoring", "campaign")
            if kind != "campaign" or uc.campaign is not None
        ),
        yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip(),
    ]
    if uc.campaign is not None:
        from pipeline.campaigns import experiment

        power = experiment.plan_of(uc.campaign)
        lines.append(f"# campaign power: {experiment.plan_text(power)}")
    return "\n".join(lines)


def init_skeleton(name: str, parent: Path | None = None) -> Path:
    """Write a commented, valid skeleton use case ``<parent>/<name>/``.

    Raises:
        ConfigError: a bad name, or the folder exists already.
    """
    import re

    if not re.fullmatch(sections.IDENTIFIER, name) or len(name) > 28:
        raise ConfigError(
            f"use case name: expected lower-case letters, digits and _ (at most 28, starting "
            f"with a letter), found {name!r}"
        )
    parent = parent or usecase.search_path()[0]
    folder = parent / name
    if folder.exists():
        raise ConfigError(f"{folder} exists already; choose another name or edit it")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for path in SKELETON.iterdir():
        if path.is_file():
            (tmp / path.name).write_text(path.read_text().replace("__NAME__", name))
    tmp.rename(folder)
    return folder
