"""A night's audience written down: selected, given its reasons, stored and exported.

The audience and the control band of a date replace those stored before in one
transaction (``campaigns.<campaign>_audience``, ``_control_band``), their counts and
exclusions go to ``monitoring.campaign_audiences`` for the campaign's report page, and the
audience is exported as CSV and Parquet for the email service.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

import pyarrow as pa
from psycopg2 import sql

from pipeline.campaigns.campaign import campaign_table, configured
from pipeline.campaigns.reasons import contributions, reason_templates, top_reasons, typical_values
from pipeline.campaigns.selection import Selection, rows_for, select
from pipeline.conf.config import Settings, private_dir, private_file
from pipeline.conf.usecase import UseCase
from pipeline.core import files, keys
from pipeline.core.errors import DataError, plain
from pipeline.store import db

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Audience:
    """A night's audience as it is stored: whom to contact, best first, with their contact
    details and reasons, and the control members who would have made the same cut."""

    score_date: date
    campaign: str
    members: pa.Table  # ranked, best first (``Selection.audience``)
    control: pa.Table  # ``Selection.control``
    contact: dict[Any, tuple[str, str]]  # (first name, email) by key
    reasons: list[tuple[list[str], list[str]]]  # (features, words) per member


def build_audience(settings: Settings, uc: UseCase, score_date: date) -> dict[str, Any]:
    """Write the audience (and control band) of ``score_date`` and export it; returns counts."""
    began = time.monotonic()
    chosen = select(settings, uc, score_date)
    members = chosen.audience
    audience = Audience(
        score_date=score_date,
        campaign=chosen.campaign,
        members=members,
        control=chosen.control,
        contact=chosen.contact,
        reasons=_reasons(settings, uc, chosen, members),
    )
    _store_audience(settings, uc, audience)
    exports = export_audience(settings, uc, score_date)
    out = _counts(chosen, exports, began)
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


def _reasons(
    settings: Settings, uc: UseCase, chosen: Selection, members: pa.Table
) -> list[tuple[list[str], list[str]]]:
    """Each member's reasons from the published model (none when nobody was chosen)."""
    from pipeline.stages import features
    from pipeline.store import registry

    if not len(chosen.chosen):
        return []
    run = chosen.run
    model, mv = registry.load_model(settings, uc.name, run["model_version"])
    columns = [f["name"] for f in mv.feature_schema]
    table = chosen.snapshot
    if table is None:
        snapshot = features.find_snapshot(settings, uc, chosen.score_date, run["snapshot_sha256"])
        table = features.read_snapshot(snapshot, [uc.entity_key, *columns])
    rows = rows_for(table, uc.entity_key, keys.to_numpy(members.column(uc.entity_key)))
    contrib = contributions(model, rows, columns, typical_values(table, columns))
    return top_reasons(contrib, rows, columns, reason_templates(uc))


def _counts(chosen: Selection, exports: dict[str, str], began: float) -> dict[str, Any]:
    """What a built audience reports: its size, its exclusions, its exports, its time."""
    return {
        "score_date": chosen.score_date.isoformat(),
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


def _store_audience(settings: Settings, uc: UseCase, audience: Audience) -> None:
    """Replace the date's audience and control band in one transaction."""
    from psycopg2.extras import execute_values

    a_rows, c_rows = _audience_rows(uc, audience), _control_rows(uc, audience)
    cfg = configured(uc)
    names = {
        "audience": campaign_table(cfg.audience_table),
        "control": campaign_table(cfg.control_table),
        "key": sql.Identifier(uc.entity_key),
        "prob": sql.Identifier(uc.probability_column),
    }
    conn = db.connect(settings.database_url)
    try:
        with conn.cursor() as cur:
            for table in ("audience", "control"):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE score_date = %s").format(names[table]),
                    (audience.score_date,),
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


def _audience_rows(uc: UseCase, audience: Audience) -> list[tuple[Any, ...]]:
    """The rows of the audience table, in rank order (ranks from 1)."""
    members, contact = audience.members, audience.contact
    return [
        (
            audience.score_date,
            audience.campaign,
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
                members.column(uc.entity_key).to_pylist(),
                members.column("model_version").to_pylist(),
                members.column(uc.probability_column).to_pylist(),
                members.column("risk_decile").to_pylist(),
                audience.reasons,
                members.column("policy").to_pylist(),
                members.column("rank_score").to_pylist(),
                strict=True,
            ),
            1,
        )
    ]


def _control_rows(uc: UseCase, audience: Audience) -> list[tuple[Any, ...]]:
    """The rows of the control band table."""
    control = audience.control
    columns = (uc.entity_key, "model_version", uc.probability_column, "risk_decile")
    return list(
        zip(
            [audience.score_date] * control.num_rows,
            [audience.campaign] * control.num_rows,
            *(control.column(c).to_pylist() for c in (*columns, "policy", "rank_score")),
            strict=True,
        )
    )


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
