"""Campaign feed: control group, audience with reasons, exports, idempotent sends.

A use case with a ``campaign`` block in its config gets one (its tables are
``campaigns.<campaign name>_audience``, ``_control_band``, ``_send_log``, ``_opt_outs``).

* **Control group.** A salted hash of the entity key puts ``control_fraction`` of all
  entities in a permanent control group: the same ones whatever the run, model
  version or backfill. The flag is published with the predictions; they are never emailed.
* **Audience.** After a publish, the top risk band (``risk_decile <= audience_deciles``),
  opted in, not unsubscribed, outside the control group and not contacted by another
  campaign in the last ``suppression_days``, up to ``campaign_capacity``, most at risk
  first. Each entity carries up to three reasons from the model itself (see
  :func:`contributions`) in the use case's own words (``campaign.reasons``). The control members who would have qualified
  go to ``campaigns.control_band`` (the comparison for uplift). Exported as CSV and
  Parquet for the email service.
* **Sends.** ``campaigns.send_log`` has one row per (campaign, customer), ever. A row is
  claimed ('sending') and committed before the SMTP call and marked 'sent' after it, so a
  retry, re-run or backfill skips everyone already claimed: nobody is emailed twice. A
  process killed between the claim and the mark leaves 'sending': that message may or
  may not have left, so it is reported as unconfirmed and never retried.

Email addresses never go to logs or return values (XComs): only counts and entity keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import smtplib
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from psycopg2 import sql

from pipeline.conf.config import Settings, private_dir, private_file
from pipeline.conf.sections import Campaign
from pipeline.conf.usecase import UseCase
from pipeline.core import files, keys
from pipeline.core.errors import ConfigError, DataError, plain
from pipeline.core.faults import fault_point
from pipeline.store import db

log = logging.getLogger(__name__)


def configured(uc: UseCase) -> Campaign:
    """The use case's campaign block.

    Raises:
        ConfigError: the use case has none.
    """
    if uc.campaign is None:
        raise ConfigError(
            f"use case {uc.name!r} has no campaign: add a campaign block to {uc.source} "
            "(contacts, template, control_salt) and run `nightscore db init`"
        )
    return uc.campaign


def campaign_name(uc: UseCase, score_date: date) -> str:
    return f"{uc.name}_{configured(uc).name}_{score_date:%Y%m%d}"


def _table(name: str) -> sql.Composable:
    return sql.Identifier("campaigns", name)


# -- reasons -------------------------------------------------------------------------------


def _plural(n: float, one: str, many: str | None = None) -> str:
    return f"{n:.0f} {one if round(n) == 1 else (many or one + 's')}"


def _percent(x: float) -> str:
    return f"{x:.0%}"


def reason_templates(uc: UseCase) -> dict[str, Any]:
    """The campaign's phrase for each feature (Jinja, with the filters plural and percent).

    Raises:
        ConfigError: a phrase that is not a valid template, naming the feature.
    """
    import jinja2

    env = jinja2.Environment(autoescape=False, undefined=jinja2.StrictUndefined)
    env.filters["plural"] = _plural
    env.filters["percent"] = _percent
    out = {}
    for feature, phrase in configured(uc).reasons.items():
        try:
            out[feature] = env.from_string(phrase)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(
                f"{uc.source}: key campaign.reasons.{feature}: expected a Jinja phrase, found "
                f"{phrase!r} ({exc.message})"
            ) from None
    return out


def reason_text(templates: dict[str, Any], feature: str, value: Any) -> str:
    """The phrase for ``feature`` at ``value`` (plain ``feature: value`` where none fits)."""
    template = templates.get(feature)
    if template is None or value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{feature.replace('_', ' ')}: {value}"
    return str(template.render(value=value)).strip()


def contributions(
    model: Any, rows: pa.Table, columns: list[str], baseline: dict[str, Any]
) -> np.ndarray:
    """Per row and feature: how much the feature raises this customer's score.

    The model's probability for the row minus its probability with that one feature set
    to the population's typical value (median, or the most common category). Positive
    means the customer's own value pushes the risk up. One batch predict per feature.
    """
    from pipeline.stages import train

    p = train.predict(model, rows, columns)
    out = np.zeros((rows.num_rows, len(columns)))
    for j, name in enumerate(columns):
        col = rows.column(name)
        typical = pa.array([baseline[name]] * rows.num_rows, type=col.type)
        swapped = rows.set_column(rows.schema.get_field_index(name), name, typical)
        out[:, j] = p - train.predict(model, swapped, columns)
    return out


def typical_values(table: pa.Table, columns: list[str]) -> dict[str, Any]:
    """The median of each numeric feature, the most common value of each categorical or
    boolean one."""
    typical: dict[str, Any] = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_boolean(col.type):
            counts = col.value_counts()
            typical[name] = counts.field("values")[
                int(np.argmax(counts.field("counts").to_numpy()))
            ].as_py()
        else:
            value = pc.approximate_median(col).as_py()
            typical[name] = round(value) if pa.types.is_integer(col.type) else value
    return typical


def top_reasons(
    contrib: np.ndarray,
    rows: pa.Table,
    columns: list[str],
    templates: dict[str, Any],
    most: int = 3,
) -> list[tuple[list[str], list[str]]]:
    """Up to ``most`` (feature, words) per row: the features raising its score the most.

    Only features with a phrase are reasons; with no phrases at all, every feature is.
    """
    usable = np.array([c in templates or not templates for c in columns])
    ranked = np.argsort(-np.where(usable, contrib, -np.inf), axis=1)[:, :most]
    values = {c: rows.column(c).to_pylist() for c in columns}
    out = []
    for i, order in enumerate(ranked):
        chosen = [j for j in order if contrib[i, j] > 0 and usable[j]] or [int(order[0])]
        names = [columns[j] for j in chosen]
        out.append((names, [reason_text(templates, c, values[c][i]) for c in names]))
    return out


# -- audience ------------------------------------------------------------------------------


def published_run(settings: Settings, uc: UseCase, score_date: date) -> dict[str, Any]:
    """The published run of ``score_date`` (model version, snapshot), or a DataError."""
    run = db.scalar(
        settings.database_url,
        "SELECT json_build_object('run_id', run_id, 'model_version', model_version, "
        "'snapshot_sha256', snapshot_sha256) FROM ml.publications "
        "WHERE use_case = %s AND score_date = %s",
        (uc.name, score_date),
    )
    if not run:
        raise DataError(
            f"no published {uc.name} scores for {score_date} in ml.publications: run {uc.name}_nightly "
            "for that date first (the audience is built from published predictions only)"
        )
    return dict(run)


def latest_published(settings: Settings, uc: UseCase) -> date | None:
    value = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.publications WHERE use_case = %s",
        (uc.name,),
    )
    return db.to_date(value) if value else None


def _array_literal(entity_keys: np.ndarray) -> str:
    """A PostgreSQL array literal of the keys (text keys quoted and escaped)."""
    if entity_keys.dtype.kind in "iu":
        return "{" + ",".join(str(int(k)) for k in entity_keys) + "}"
    quoted = ('"' + str(k).replace("\\", "\\\\").replace('"', '\\"') + '"' for k in entity_keys)
    return "{" + ",".join(quoted) + "}"


def _keys_of(
    settings: Settings, uc: UseCase, query: sql.Composable, params: tuple[Any, ...]
) -> np.ndarray:
    """The keys ``query`` selects (its first column), as a key array."""
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            found = [r[0] for r in cur.fetchall()]
        conn.commit()
    finally:
        conn.close()
    return np.array(found, dtype=np.int64 if uc.entity.type == "bigint" else object)


def contacts(settings: Settings, uc: UseCase, entity_keys: np.ndarray) -> pa.Table:
    """(key, first_name, email, opt_in) of ``entity_keys`` from the warehouse's contact table."""
    c = configured(uc).contacts
    query = sql.SQL(
        "SELECT CAST({k} AS {t}) AS {key}, {first} AS first_name, {email} AS email, "
        "CAST({opt} AS boolean) AS opt_in FROM {table} WHERE {k} = ANY(CAST(%s AS {t}[]))"
    ).format(
        k=sql.Identifier(c.key),
        t=sql.SQL(uc.entity.type),
        key=sql.Identifier(uc.entity_key),
        first=sql.Identifier(c.first_name),
        email=sql.Identifier(c.email),
        opt=sql.Identifier(c.opt_in),
        table=sql.Identifier(c.table),
    )
    conn = db.connect(settings.warehouse_url)
    try:
        with conn.cursor() as cur:
            db.set_search_path(cur, settings.warehouse_schema)
            try:
                cur.execute(query, (_array_literal(entity_keys),))
            except Exception as exc:
                raise db.source_error(exc, settings.warehouse_schema) from exc
            rows = cur.fetchall()
        conn.commit()
    finally:
        conn.close()
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [[], [], [], []]
    return pa.table(
        {
            uc.entity_key: pa.array(columns[0], type=keys.arrow_type(uc.entity.type)),
            "first_name": pa.array(columns[1], type=pa.string()),
            "email": pa.array(columns[2], type=pa.string()),
            "opt_in": pa.array(columns[3], type=pa.bool_()),
        }
    )


@dataclass(frozen=True)
class Selection:
    """Whom a policy would contact on a night, and its comparable control members."""

    score_date: date
    campaign: str
    run: dict[str, Any]
    band: pa.Table  # the top risk band, most at risk first
    policy: str  # 'risk' or the uplift policy's version
    score: np.ndarray  # what the band is ranked by (probability or expected uplift)
    chosen: np.ndarray  # band rows to contact, best first
    control_rows: np.ndarray  # band rows of the comparable control members
    contact: dict[Any, tuple[str, str]]
    excluded: dict[str, int]
    snapshot: pa.Table | None = None  # the night's features, when a policy read them to rank

    @property
    def audience(self) -> pa.Table:
        return _ranked(self.band, self.chosen, self.policy, self.score)

    @property
    def control(self) -> pa.Table:
        return _ranked(self.band, self.control_rows, self.policy, self.score)


def _ranked(band: pa.Table, rows: np.ndarray, policy: str, score: np.ndarray) -> pa.Table:
    taken = band.take(pa.array(rows, type=pa.int64()))
    return taken.append_column("policy", pa.array([policy] * len(rows), pa.string())).append_column(
        "rank_score", pa.array(score[rows], pa.float64())
    )


def choose(
    score: np.ndarray, eligible: np.ndarray, in_control: np.ndarray, capacity: int, floor: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """The cut of a campaign, given each band row's score (the higher, the sooner it is
    contacted; rows at or below ``floor`` never are), eligibility and control-group flag.

    Returns the rows contacted (up to ``capacity`` eligible rows outside the control group,
    best first, ties to the earlier row), the control rows who would have made the same
    cut (eligible members scoring at least the last one contacted; all eligible members
    above ``floor`` when capacity is not reached), and how many eligible non-members were
    ranked above ``floor``.
    """
    order = np.lexsort((np.arange(len(score)), -score))  # best first, ties to the earlier row
    order = order[score[order] > floor]
    wanted = eligible & ~in_control
    chosen = order[wanted[order]][:capacity]
    cutoff = score[chosen[-1]] if len(chosen) == capacity else floor
    control_rows = order[(eligible & in_control)[order] & (score[order] >= cutoff)]
    return chosen, control_rows, int(wanted[order].sum())


def select(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    rank_by: str | None = None,
    version: str | None = None,
) -> Selection:
    """Whom the campaign of ``score_date`` contacts, without writing anything.

    The band is the top ``audience_deciles`` risk deciles; eligible are the opted in, not
    unsubscribed and not suppressed. The policy in force ranks them (``policy.in_force``:
    the probability, or an uplift policy's expected uplift, which never contacts whom it
    expects an email to push away); up to ``capacity`` outside the control group are
    chosen, and the control members who would have made the same cut are the comparison.
    To compare policies on a night: ``rank_by="risk"`` ranks by risk whatever the policy
    in force, ``version`` by that uplift policy (in force or not).
    """
    from pipeline.campaigns import policy

    cfg = configured(uc)
    run = published_run(settings, uc, score_date)
    campaign = campaign_name(uc, score_date)
    key = sql.Identifier(uc.entity_key)
    k, p = db.quote_ident(uc.entity_key), db.quote_ident(uc.probability_column)
    band = db.read_arrow(
        settings.database_url,
        f"SELECT {k}, model_version, {p}, risk_decile, control_group "
        f"FROM {db.quote_ident('predictions', uc.score_table)} "
        f"WHERE score_date = :d AND risk_decile <= :band ORDER BY {p} DESC, {k}",
        {"d": score_date, "band": cfg.audience_deciles},
    )
    entity_keys = keys.to_numpy(band.column(uc.entity_key))
    people = contacts(settings, uc, entity_keys)
    contact = {
        k: (name, email)
        for k, name, email in zip(
            people.column(uc.entity_key).to_pylist(),
            people.column("first_name").to_pylist(),
            people.column("email").to_pylist(),
            strict=True,
        )
    }
    opted = keys.to_numpy(people.column(uc.entity_key))[
        people.column("opt_in").to_numpy(zero_copy_only=False).astype(bool)
    ]
    unsubscribed = _keys_of(
        settings,
        uc,
        sql.SQL("SELECT {key} FROM {t} WHERE {key} = ANY(CAST(%s AS {kt}[]))").format(
            key=key, t=_table(cfg.opt_outs_table), kt=sql.SQL(uc.entity.type)
        ),
        (_array_literal(entity_keys),),
    )
    # Contacted by another campaign within the suppression window. A control member is
    # never sent anything, so the window applies to them as if they had been: one who
    # stood in another campaign's control band within it is left out too (comparable groups).
    window = (campaign, score_date - timedelta(days=cfg.suppression_days), score_date)
    suppressed = _keys_of(
        settings,
        uc,
        sql.SQL(
            "SELECT {key} FROM {log} WHERE campaign <> %s AND status IN ('sending', 'sent') "
            "AND score_date BETWEEN %s AND %s "
            "UNION SELECT {key} FROM {band} WHERE campaign <> %s AND score_date BETWEEN %s AND %s"
        ).format(key=key, log=_table(cfg.send_log_table), band=_table(cfg.control_table)),
        window + window,
    )
    in_control = band.column("control_group").to_numpy(zero_copy_only=False)
    opted_in = np.isin(entity_keys, opted)
    not_unsubscribed = ~np.isin(entity_keys, unsubscribed)
    not_suppressed = ~np.isin(entity_keys, suppressed)
    eligible = opted_in & not_unsubscribed & not_suppressed
    probs = band.column(uc.probability_column).to_numpy()
    name, score = policy.RISK, probs
    if version is None and rank_by != policy.RISK:
        in_force = policy.in_force(settings, uc)
        version = in_force["version"] if in_force is not None else None
    snapshot = None
    if version is not None:
        name = version
        snapshot = night_features(settings, uc, score_date, run)
        frame = frame_of(uc, snapshot, entity_keys)
        score = policy.expected_uplift(settings, uc, name, frame, probs)
    floor = -np.inf if name == policy.RISK else 0.0  # uplift: never whom it expects to lose
    chosen, control_rows, ranked = choose(score, eligible, in_control, cfg.capacity, floor)
    wanted = eligible & ~in_control
    return Selection(
        score_date,
        campaign,
        run,
        band,
        name,
        score,
        chosen,
        control_rows,
        contact,
        {
            "control_group": int((eligible & in_control).sum()),
            "not_opted_in": int((~opted_in).sum()),
            "unsubscribed": int((opted_in & ~not_unsubscribed).sum()),
            "suppressed": int((opted_in & not_unsubscribed & ~not_suppressed).sum()),
            "expected_no_uplift": int(wanted.sum()) - ranked,
            "over_capacity": ranked - len(chosen),
        },
        snapshot,
    )


def night_features(
    settings: Settings, uc: UseCase, score_date: date, run: dict[str, Any]
) -> pa.Table:
    """The night's published feature snapshot: the key and every feature column."""
    import pyarrow.parquet as pq

    from pipeline.stages import features, train

    snapshot = features.find_snapshot(settings, uc, score_date, run["snapshot_sha256"])
    cat, num = train.split_columns(pq.read_schema(snapshot.path), uc)
    return features.read_snapshot(snapshot, [uc.entity_key, *cat, *num])


def frame_of(uc: UseCase, table: pa.Table, wanted: np.ndarray) -> pd.DataFrame:
    """The features of the ``wanted`` keys (in that order) from a night's snapshot table,
    categories first, as the models take them."""
    from pipeline.stages import train

    cat, num = train.split_columns(table.schema, uc)
    return train.to_frame(rows_for(table, uc.entity_key, wanted), cat + num)


def features_for(
    settings: Settings, uc: UseCase, score_date: date, run: dict[str, Any], wanted: np.ndarray
) -> pd.DataFrame:
    """The features of the ``wanted`` keys (in that order) from the night's published
    snapshot: every feature column, categories first, as the models take them."""
    return frame_of(uc, night_features(settings, uc, score_date, run), wanted)


def build_audience(settings: Settings, uc: UseCase, score_date: date) -> dict[str, Any]:
    """Write the audience (and control band) of ``score_date`` and export it; returns counts."""
    from pipeline.stages import features
    from pipeline.store import registry

    began = time.monotonic()
    chosen = select(settings, uc, score_date)
    audience = chosen.audience
    reasons: list[tuple[list[str], list[str]]] = []
    if len(chosen.chosen):
        run = chosen.run
        model, mv = registry.load_model(settings, uc.name, run["model_version"])
        columns = [f["name"] for f in mv.feature_schema]
        table = chosen.snapshot
        if table is None:
            snapshot = features.find_snapshot(settings, uc, score_date, run["snapshot_sha256"])
            table = features.read_snapshot(snapshot, [uc.entity_key, *columns])
        rows = rows_for(table, uc.entity_key, keys.to_numpy(audience.column(uc.entity_key)))
        contrib = contributions(model, rows, columns, typical_values(table, columns))
        reasons = top_reasons(contrib, rows, columns, reason_templates(uc))
    _store_audience(
        settings, uc, score_date, chosen.campaign, audience, chosen.control, chosen.contact, reasons
    )
    exports = export_audience(settings, uc, score_date)
    out = {
        "score_date": score_date.isoformat(),
        "campaign": chosen.campaign,
        "model_version": chosen.run["model_version"],
        "policy": chosen.policy,
        "band": chosen.band.num_rows,
        "audience": len(chosen.chosen),
        "control_band": len(chosen.control_rows),
        "excluded": chosen.excluded,
        "exports": exports,
        "seconds": round(time.monotonic() - began, 2),
    }
    _store_counts(settings, uc, score_date, out)
    log.info(
        "%s: %d of %d in the top band selected (policy %s), %d control members comparable; "
        "excluded %s",
        chosen.campaign,
        out["audience"],
        out["band"],
        chosen.policy,
        out["control_band"],
        out["excluded"],
    )
    return out


def _store_counts(settings: Settings, uc: UseCase, score_date: date, out: dict[str, Any]) -> None:
    """The audience's counts and exclusions by reason, for the campaign's report page."""
    db.scalar(
        settings.database_url,
        "INSERT INTO monitoring.campaign_audiences (use_case, score_date, campaign, "
        "model_version, policy, band, audience, control_band, excluded) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (use_case, score_date) DO "
        "UPDATE SET campaign = EXCLUDED.campaign, model_version = EXCLUDED.model_version, "
        "policy = EXCLUDED.policy, band = EXCLUDED.band, audience = EXCLUDED.audience, "
        "control_band = EXCLUDED.control_band, excluded = EXCLUDED.excluded, built_at = now() "
        "RETURNING 1",
        (
            uc.name,
            score_date,
            out["campaign"],
            out["model_version"],
            out["policy"],
            out["band"],
            out["audience"],
            out["control_band"],
            json.dumps(out["excluded"]),
        ),
    )


def build_announced(settings: Settings, uc: UseCase, dates: list[str]) -> dict[str, Any]:
    """Build the audiences of the dates that publish events announced (oldest first).

    A date with no published run here (its publish was superseded, or the event came
    from another deployment) is skipped with a warning; nothing buildable is an error.
    """
    built, skipped = [], []
    for day in sorted(set(dates)):
        try:
            built.append(build_audience(settings, uc, db.to_date(day)))
        except DataError as err:
            if "no published" not in str(err):
                raise
            log.warning("skipping %s: %s", day, err)
            skipped.append(day)
    if not built:
        raise DataError(
            f"none of the announced dates ({plain(sorted(set(dates)))}) has published {uc.name} scores "
            f"in ml.publications; trigger {uc.name}_campaign with score_date set to a published date"
        )
    return {"score_date": built[-1]["score_date"], "built": built, "skipped": skipped}


def rows_for(table: pa.Table, key: str, wanted: np.ndarray) -> pa.Table:
    """The rows of ``table`` for ``wanted`` keys, in that order."""
    pos, found = keys.lookup(keys.to_numpy(table.column(key)), np.arange(table.num_rows), wanted)
    if not found.all():
        raise DataError(
            "the feature snapshot of the published run lacks some scored entities; "
            "re-run the night so that scores and snapshot agree"
        )
    return table.take(pa.array(pos))


def _store_audience(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    campaign: str,
    audience: pa.Table,
    control: pa.Table,
    contact: dict[Any, tuple[str, str]],
    reasons: list[tuple[list[str], list[str]]],
) -> None:
    """Replace the date's audience and control band in one transaction."""
    from psycopg2.extras import execute_values

    key, prob = uc.entity_key, uc.probability_column
    a_rows = [
        (
            score_date,
            campaign,
            k,
            rank,
            version,
            p,
            decile,
            contact[k][0],
            contact[k][1],
            words,
            names,
            policy,
            score,
        )
        for rank, (k, version, p, decile, (names, words), policy, score) in enumerate(
            zip(
                audience.column(key).to_pylist(),
                audience.column("model_version").to_pylist(),
                audience.column(prob).to_pylist(),
                audience.column("risk_decile").to_pylist(),
                reasons,
                audience.column("policy").to_pylist(),
                audience.column("rank_score").to_pylist(),
                strict=True,
            ),
            1,
        )
    ]
    c_rows = list(
        zip(
            [score_date] * control.num_rows,
            [campaign] * control.num_rows,
            *(
                control.column(c).to_pylist()
                for c in (key, "model_version", prob, "risk_decile", "policy", "rank_score")
            ),
            strict=True,
        )
    )
    cfg = configured(uc)
    names = {
        "audience": _table(cfg.audience_table),
        "control": _table(cfg.control_table),
        "key": sql.Identifier(key),
        "prob": sql.Identifier(prob),
    }
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            for table in ("audience", "control"):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE score_date = %s").format(names[table]),
                    (score_date,),
                )
            execute_values(
                cur,
                sql.SQL(
                    "INSERT INTO {audience} (score_date, campaign, {key}, audience_rank, "
                    "model_version, {prob}, risk_decile, first_name, email, reasons, "
                    "reason_features, policy, rank_score) VALUES %s"
                )
                .format(**names)
                .as_string(conn),
                a_rows,
                page_size=1000,
            )
            execute_values(
                cur,
                sql.SQL(
                    "INSERT INTO {control} (score_date, campaign, {key}, model_version, {prob}, "
                    "risk_decile, policy, rank_score) VALUES %s"
                )
                .format(**names)
                .as_string(conn),
                c_rows,
                page_size=1000,
            )
        conn.commit()
    finally:
        conn.close()


def export_audience(settings: Settings, uc: UseCase, score_date: date) -> dict[str, str]:
    """Write the date's audience as CSV and Parquet for the email service (atomically)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    cfg = configured(uc)
    table = db.read_arrow(
        settings.database_url,
        f"SELECT {db.quote_ident(uc.entity_key)}, audience_rank, first_name, email, "
        f"{db.quote_ident(uc.probability_column)}, risk_decile, reasons[1] AS reason_1, "
        "reasons[2] AS reason_2, reasons[3] AS reason_3, campaign, model_version "
        f"FROM {db.quote_ident('campaigns', cfg.audience_table)} WHERE score_date = :d "
        "ORDER BY audience_rank",
        {"d": score_date},
    )
    out_dir = private_dir(settings.home / "exports" / uc.name / score_date.isoformat())
    paths = {}
    for kind in ("csv", "parquet"):
        final = out_dir / f"{cfg.audience_table}.{kind}"
        files.sweep(out_dir)
        tmp = files.temporary(final)
        if kind == "csv":
            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
        os.replace(private_file(tmp), final)
        paths[kind] = str(final)
    return paths


# -- sending -------------------------------------------------------------------------------


DEFAULT_SENDER = "Customer Care <care@nightscore.invalid>"


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to send: from Airflow's SMTP connection (``nightscore_smtp``)."""

    host: str
    port: int = 25
    login: str | None = None
    password: str | None = None
    starttls: bool = False
    ssl: bool = False
    sender: str = DEFAULT_SENDER
    timeout: float = 30.0


def render(uc: UseCase, first_name: str, reasons: list[str]) -> tuple[str, str]:
    """(subject, body) of the campaign's email (``campaign.template``) for one entity."""
    import jinja2

    template = configured(uc).template
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template.parent),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    text = env.get_template(template.name).render(first_name=first_name, reasons=reasons)
    head, _, body = text.partition("\n")
    if not head.startswith("Subject: "):
        raise ConfigError(
            f"email template {template} (campaign.template of {uc.source}) must start with a "
            "'Subject: ...' line"
        )
    return head.removeprefix("Subject: ").strip(), body


class MessageError(ValueError):
    """One entity's message cannot be built (a bad address, say): that entity fails alone."""


def _header(value: str) -> str:
    """A header value on one line: control characters (CR, LF, ...) become spaces."""
    return " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in value).split())


def _message(
    sender: str, to: str, subject: str, body: str, message_id: str, campaign: str
) -> EmailMessage:
    """The email, validated: one address in To, header values on one line.

    Raises:
        MessageError: the address is not a single valid address, or a header is refused.
    """
    address = (to or "").strip()
    _, parsed = parseaddr(address)
    if (
        not parsed
        or parsed != address
        or "@" not in parsed
        or any(unicodedata.category(c)[0] in "CZ" for c in parsed)
    ):
        raise MessageError(f"invalid email address ({len(address)} characters)")
    msg = EmailMessage()
    try:
        msg["From"] = _header(sender)
        msg["To"] = parsed
        msg["Subject"] = _header(subject)
        msg["Message-ID"] = message_id
        msg["X-Campaign"] = _header(campaign)
        msg.set_content(body)
        bytes(msg)  # everything must serialize before anything is claimed
    except (ValueError, TypeError) as exc:
        raise MessageError(f"message cannot be built: {type(exc).__name__}: {exc}") from None
    return msg


@contextmanager
def _smtp(target: SmtpTarget) -> Iterator[smtplib.SMTP]:
    cls = smtplib.SMTP_SSL if target.ssl else smtplib.SMTP
    server = cls(target.host, target.port, timeout=target.timeout)
    try:
        if target.starttls and not target.ssl:
            server.starttls()
        if target.login:
            server.login(target.login, target.password or "")
        yield server
    finally:
        try:
            server.quit()
        except smtplib.SMTPException:
            server.close()


def send_campaign(
    settings: Settings,
    uc: UseCase,
    score_date: date,
    run_id: str,
    *,
    target: SmtpTarget | None,
    dry_run: bool = True,
    rate_per_second: float | None = None,
    past_dates: bool = False,
) -> dict[str, Any]:
    """Email the date's audience at most once each; returns counts (never addresses).

    ``dry_run`` renders every message into ``$NIGHTSCORE_HOME/outbox/<campaign>/`` and
    records nothing, so a later real send still reaches everyone. Only the newest
    published date is emailed (a backfill rebuilds older audiences for the record) unless
    ``past_dates``.
    """
    campaign = campaign_name(uc, score_date)
    cfg = configured(uc)
    newest = latest_published(settings, uc)
    if not past_dates and newest != score_date:
        log.info(
            "%s: %s is not the newest published date (%s); nobody is emailed from past "
            "predictions (pass past_dates to force)",
            campaign,
            score_date,
            newest,
        )
        return {"campaign": campaign, "sent": 0, "skipped_reason": f"newest published is {newest}"}
    key = sql.Identifier(uc.entity_key)
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "SELECT {key}, first_name, email, reasons FROM {t} WHERE score_date = %s "
                    "ORDER BY audience_rank"
                ).format(key=key, t=_table(cfg.audience_table)),
                (score_date,),
            )
            audience = cur.fetchall()
            cur.execute(
                sql.SQL("SELECT {key}, status FROM {t} WHERE campaign = %s").format(
                    key=key, t=_table(cfg.send_log_table)
                ),
                (campaign,),
            )
            claimed = dict(cur.fetchall())
            cur.execute(
                sql.SQL("SELECT {key} FROM {t}").format(key=key, t=_table(cfg.opt_outs_table))
            )
            unsubscribed = {r[0] for r in cur.fetchall()}
        conn.commit()
    finally:
        conn.close()
    todo = [r for r in audience if r[0] not in claimed and r[0] not in unsubscribed]
    counts: dict[str, Any] = {
        "campaign": campaign,
        "audience": len(audience),
        "already_sent": sum(1 for s in claimed.values() if s == "sent"),
        "unconfirmed": sorted(k for k, s in claimed.items() if s == "sending"),
        "unsubscribed": sum(1 for r in audience if r[0] in unsubscribed and r[0] not in claimed),
        "sent": 0,
        "failed": 0,
        "skipped": 0,
        "dry_run": dry_run,
    }
    rate = rate_per_second or cfg.send_rate_per_second
    began = time.monotonic()
    if dry_run:
        outbox = private_dir(settings.home / "outbox" / campaign)
        rendered = 0
        for entity, first_name, email, reasons in todo:
            try:
                msg = _build(uc, target, campaign, entity, first_name, email, reasons)
            except MessageError as err:
                counts["failed"] += 1
                log.warning("%s: %s %s: %s", campaign, uc.entity_key, entity, err)
                continue
            path = outbox / f"{_file_name(entity)}.eml"
            path.write_bytes(bytes(msg))
            private_file(path)
            rendered += 1
        counts["rendered"] = rendered
        counts["outbox"] = str(outbox)
        log.info("%s dry run: %d messages rendered into %s", campaign, len(todo), outbox)
        return counts
    if target is None:
        raise ConfigError(
            "no SMTP server for a real send: define the Airflow connection nightscore_smtp "
            '(host, port, login, password; extra {"starttls": true, "from": "..."}) '
            "or run with dry_run"
        )
    if todo:
        with _smtp(target) as server:
            conn = db.connect(settings.database_url)
            try:
                for i, (entity, first_name, email, reasons) in enumerate(todo, 1):
                    _pace(began, i - 1, rate)
                    status = _send_one(
                        conn,
                        server,
                        target,
                        uc,
                        campaign,
                        score_date,
                        run_id,
                        entity,
                        first_name,
                        email,
                        reasons,
                    )
                    counts[status] += 1
                    fault_point("campaign_sent", i)
            finally:
                conn.close()
    seconds = time.monotonic() - began
    counts["seconds"] = round(seconds, 2)
    log.info(
        "%s: %d sent, %d failed, %d already sent, %d unsubscribed, %d unconfirmed "
        "(claimed by a run that stopped mid-send; not retried) in %.1fs",
        campaign,
        counts["sent"],
        counts["failed"],
        counts["already_sent"],
        counts["unsubscribed"],
        len(counts["unconfirmed"]),
        seconds,
    )
    return counts


def _pace(began: float, sent: int, rate: float) -> None:
    wait = began + sent / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def _message_id(campaign: str, entity: Any) -> str:
    return make_msgid(idstring=f"{campaign}.{_file_name(entity)}", domain="nightscore.invalid")


def _file_name(entity: Any) -> str:
    """A key as a safe file name or message-id part (text keys may hold any character)."""
    text = str(entity)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def _build(
    uc: UseCase,
    target: SmtpTarget | None,
    campaign: str,
    entity: Any,
    first_name: str,
    email: str,
    reasons: list[str],
) -> EmailMessage:
    """Render and build one entity's message.

    Raises:
        MessageError: it cannot be built.
    """
    try:
        subject, body = render(uc, _header(first_name or ""), reasons)
    except Exception as exc:  # a template error for this entity's values only
        raise MessageError(f"template cannot be rendered: {type(exc).__name__}: {exc}") from None
    sender = target.sender if target else DEFAULT_SENDER
    return _message(sender, email, subject, body, _message_id(campaign, entity), campaign)


def _send_one(
    conn: Any,
    server: smtplib.SMTP,
    target: SmtpTarget,
    uc: UseCase,
    campaign: str,
    score_date: date,
    run_id: str,
    entity: Any,
    first_name: str,
    email: str,
    reasons: list[str],
) -> str:
    """Build, claim, send, mark. Returns 'sent', 'failed' or 'skipped' (someone else's).

    The message is built and validated before anything is claimed: one that cannot be
    built is recorded 'failed' with the reason, and the send goes on to the next entity.
    """
    cfg = configured(uc)
    message_id = _message_id(campaign, entity)
    names = {
        "log": _table(cfg.send_log_table),
        "outs": _table(cfg.opt_outs_table),
        "key": sql.Identifier(uc.entity_key),
    }
    try:
        msg = _build(uc, target, campaign, entity, first_name, email, reasons)
        problem = None
    except MessageError as err:
        problem = str(err)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {log} (campaign, {key}, score_date, run_id, message_id, status, "
                "error, sent_at) SELECT %s, %s, %s, %s, %s, %s, %s, %s "
                "WHERE NOT EXISTS (SELECT 1 FROM {outs} WHERE {key} = %s) "
                "ON CONFLICT (campaign, {key}) DO NOTHING RETURNING 1"
            ).format(**names),
            (
                campaign,
                entity,
                score_date,
                run_id,
                message_id,
                "failed" if problem else "sending",
                problem,
                datetime.now(UTC) if problem else None,
                entity,
            ),
        )
        won = cur.fetchone() is not None
    conn.commit()
    if not won:
        return "skipped"
    if problem:
        log.warning("%s: %s %s not sent: %s", campaign, uc.entity_key, entity, problem)
        return "failed"
    fault_point("campaign_claimed")
    try:
        server.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        code = next(iter(exc.recipients.values()))[0] if exc.recipients else "?"
        _mark(conn, names, campaign, entity, "failed", f"recipient refused (SMTP {code})")
        return "failed"
    except (smtplib.SMTPException, OSError):
        # the server did not take the message: release the claim so a retry sends it
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("DELETE FROM {log} WHERE campaign = %s AND {key} = %s").format(**names),
                (campaign, entity),
            )
        conn.commit()
        raise
    _mark(conn, names, campaign, entity, "sent", None)
    return "sent"


def _mark(
    conn: Any,
    names: dict[str, Any],
    campaign: str,
    entity: Any,
    status: str,
    error: str | None,
) -> None:
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "UPDATE {log} SET status = %s, sent_at = now(), error = %s "
                "WHERE campaign = %s AND {key} = %s"
            ).format(**names),
            (status, error, campaign, entity),
        )
    conn.commit()


def campaign_date(settings: Settings, uc: UseCase, requested: str | None) -> date:
    """The score date a campaign run is for: the one asked for, else the newest published."""
    if requested:
        return db.to_date(requested)
    newest = latest_published(settings, uc)
    if newest is None:
        raise DataError(f"nothing published for {uc.name} yet: no campaign to run")
    return newest
