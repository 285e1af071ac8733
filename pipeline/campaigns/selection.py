"""Whom a campaign contacts on a night, and the control members to compare them with.

The band is the night's top risk band (``risk_decile <= audience_deciles``). Eligible are
the opted in, not unsubscribed, and not contacted by another campaign in the last
``suppression_days``. The policy in force ranks them (the probability, or an uplift
policy's expected uplift); up to ``capacity`` outside the control group are chosen, most
promising first, and the control members who would have qualified are the comparison for
uplift. Nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from psycopg2 import sql

from pipeline.campaigns.campaign import campaign_name, campaign_table, configured, published_run
from pipeline.conf.config import Settings
from pipeline.conf.usecase import UseCase
from pipeline.core import keys
from pipeline.core.errors import DataError
from pipeline.store import db


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
    band = _band(settings, uc, score_date)
    entity_keys = keys.to_numpy(band.column(uc.entity_key))
    people = contacts(settings, uc, entity_keys)
    allowed = _eligibility(settings, uc, campaign, score_date, entity_keys, people)
    in_control = band.column("control_group").to_numpy(zero_copy_only=False)
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
    chosen, control_rows, ranked = choose(score, allowed.eligible, in_control, cfg.capacity, floor)
    return Selection(
        score_date=score_date,
        campaign=campaign,
        run=run,
        band=band,
        policy=name,
        score=score,
        chosen=chosen,
        control_rows=control_rows,
        contact=_contact_of(uc, people),
        excluded=allowed.excluded(in_control, ranked, len(chosen)),
        snapshot=snapshot,
    )


def _band(settings: Settings, uc: UseCase, score_date: date) -> pa.Table:
    """The night's top risk band, most at risk first."""
    k, p = db.quote_ident(uc.entity_key), db.quote_ident(uc.probability_column)
    return db.read_arrow(
        settings.database_url,
        f"SELECT {k}, model_version, {p}, risk_decile, control_group "
        f"FROM {db.quote_ident('predictions', uc.score_table)} "
        f"WHERE score_date = :d AND risk_decile <= :band ORDER BY {p} DESC, {k}",
        {"d": score_date, "band": configured(uc).audience_deciles},
    )


def _contact_of(uc: UseCase, people: pa.Table) -> dict[Any, tuple[str, str]]:
    """(first name, email) by key."""
    return {
        k: (name, email)
        for k, name, email in zip(
            people.column(uc.entity_key).to_pylist(),
            people.column("first_name").to_pylist(),
            people.column("email").to_pylist(),
            strict=True,
        )
    }


@dataclass(frozen=True)
class _Eligibility:
    """Per band row: whether the entity opted in, has not unsubscribed, is not suppressed."""

    opted_in: np.ndarray
    not_unsubscribed: np.ndarray
    not_suppressed: np.ndarray

    @property
    def eligible(self) -> np.ndarray:
        return self.opted_in & self.not_unsubscribed & self.not_suppressed

    def excluded(self, in_control: np.ndarray, ranked: int, chosen: int) -> dict[str, int]:
        """How many of the band were left out, by the first reason that left them out."""
        eligible = self.eligible
        wanted = eligible & ~in_control
        return {
            "control_group": int((eligible & in_control).sum()),
            "not_opted_in": int((~self.opted_in).sum()),
            "unsubscribed": int((self.opted_in & ~self.not_unsubscribed).sum()),
            "suppressed": int((self.opted_in & self.not_unsubscribed & ~self.not_suppressed).sum()),
            "expected_no_uplift": int(wanted.sum()) - ranked,
            "over_capacity": ranked - chosen,
        }


def _eligibility(
    settings: Settings,
    uc: UseCase,
    campaign: str,
    score_date: date,
    entity_keys: np.ndarray,
    people: pa.Table,
) -> _Eligibility:
    """Who of the band (``entity_keys``, with their contacts ``people``) may be contacted."""
    cfg = configured(uc)
    key = sql.Identifier(uc.entity_key)
    opted = keys.to_numpy(people.column(uc.entity_key))[
        people.column("opt_in").to_numpy(zero_copy_only=False).astype(bool)
    ]
    unsubscribed = _keys_of(
        settings,
        uc,
        sql.SQL("SELECT {key} FROM {t} WHERE {key} = ANY(CAST(%s AS {kt}[]))").format(
            key=key, t=campaign_table(cfg.opt_outs_table), kt=sql.SQL(uc.entity.type)
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
        ).format(
            key=key,
            log=campaign_table(cfg.send_log_table),
            band=campaign_table(cfg.control_table),
        ),
        window + window,
    )
    return _Eligibility(
        opted_in=np.isin(entity_keys, opted),
        not_unsubscribed=~np.isin(entity_keys, unsubscribed),
        not_suppressed=~np.isin(entity_keys, suppressed),
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


def rows_for(table: pa.Table, key: str, wanted: np.ndarray) -> pa.Table:
    """The rows of ``table`` for ``wanted`` keys, in that order."""
    pos, found = keys.lookup(keys.to_numpy(table.column(key)), np.arange(table.num_rows), wanted)
    if not found.all():
        raise DataError(
            "the feature snapshot of the published run lacks some scored entities; "
            "re-run the night so that scores and snapshot agree"
        )
    return table.take(pa.array(pos))
