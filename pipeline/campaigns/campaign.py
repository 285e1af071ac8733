"""The campaign of a use case: its config block, its name per night, its tables, and the
published night it is for.

A use case with a ``campaign`` block in its config gets one (its tables are
``campaigns.<campaign name>_audience``, ``_control_band``, ``_send_log``, ``_opt_outs``).

* **Control group.** A salted hash of the entity key puts ``control_fraction`` of all
  entities in a permanent control group: the same ones whatever the run, model
  version or backfill. The flag is published with the predictions; they are never emailed.
* **Audience.** After a publish, the top risk band, ranked by the policy in force, up to
  the campaign's capacity (:mod:`pipeline.campaigns.selection`), each entity with up to
  three reasons from the model itself (:mod:`pipeline.campaigns.reasons`), stored and
  exported for the email service (:mod:`pipeline.campaigns.audience`).
* **Sends.** At most one email per (campaign, customer), ever
  (:mod:`pipeline.campaigns.sending`).

Email addresses never go to logs or return values (XComs): only counts and entity keys.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from psycopg2 import sql

from pipeline.conf.config import Settings
from pipeline.conf.sections import Campaign
from pipeline.conf.usecase import UseCase
from pipeline.core.errors import ConfigError, DataError
from pipeline.store import db


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
    """The name of the use case's campaign of ``score_date`` (``<use case>_<campaign>_<yyyymmdd>``)."""
    return f"{uc.name}_{configured(uc).name}_{score_date:%Y%m%d}"


def campaign_table(name: str) -> sql.Composable:
    """The campaign table ``name`` in the ``campaigns`` schema, as an SQL identifier."""
    return sql.Identifier("campaigns", name)


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
    """The newest score date published for the use case (None before the first publish)."""
    value = db.scalar(
        settings.database_url,
        "SELECT max(score_date) FROM ml.publications WHERE use_case = %s",
        (uc.name,),
    )
    return db.to_date(value) if value else None


def campaign_date(settings: Settings, uc: UseCase, requested: str | None) -> date:
    """The score date a campaign run is for: the one asked for, else the newest published."""
    if requested:
        return db.to_date(requested)
    newest = latest_published(settings, uc)
    if newest is None:
        raise DataError(f"nothing published for {uc.name} yet: no campaign to run")
    return newest
