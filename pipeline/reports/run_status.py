"""What a run's report tab shows while the run has no report of its own: the run's state
and, when it waits, what it waits for or behind.

A queued run waits while its DAG (or its backfill) is paused, until its time, or behind the
runs that fill its DAG's ``max_active_runs`` (a backfill run: its backfill's); a running
night waits at a sensor (``wait_for_data``: its data; ``wait_for_turn``: the run holding
its use case's turn, ``pipeline.store.turns``) or at an approval. What Airflow knows of the run
comes in as a :class:`RunStatus` (``plugins/nightscore_reports.py`` reads it from Airflow's
database); this module reads only the turns.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from pipeline.conf.config import Settings
from pipeline.store import turns

LIVE = ("queued", "running")


@dataclass(frozen=True)
class RunStatus:
    """A DAG run as Airflow's metadata has it.

    Attributes:
        state: ``queued``, ``running``, ``success`` or ``failed``.
        run_after: the earliest moment the scheduler may start it.
        backfill: it is a run of a backfill.
        paused: what is paused and holds it back (``"DAG"``, ``"backfill"``), else None.
        max_active_runs: how many runs may run at once beside it: its DAG's, or its
            backfill's for a backfill run.
        running: the other runs counting against that limit, oldest first: (run id, since).
        waiting_at: its tasks that wait: a sensor between two looks, a deferred task (an
            approval waiting for a person).
    """

    dag_id: str
    run_id: str
    state: str
    run_after: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    backfill: bool = False
    paused: str | None = None
    max_active_runs: int | None = None
    running: tuple[tuple[str, datetime | None], ...] = ()
    waiting_at: tuple[str, ...] = ()

    @property
    def live(self) -> bool:
        """Queued or running: its report may still come."""
        return self.state in LIVE


def _at(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _run(run_id: str) -> str:
    """A run of the same DAG, linked to its own report tab (a sibling of this page's URL,
    so the link stays inside the tab)."""
    return f'<a href="{html.escape(quote(run_id, safe=""))}"><code>{html.escape(run_id)}</code></a>'


def why(
    status: RunStatus,
    holder: tuple[str, datetime | None] | None = None,
    *,
    nightly: bool = True,
    now: datetime | None = None,
) -> list[str]:
    """What holds ``status``'s run back (HTML sentences, values escaped), or what became of
    it; empty for a running run that waits on nothing.

    Args:
        holder: the run holding the use case's turn and since when (``turns.holder``),
            read when the run waits at ``wait_for_turn``.
        nightly: the run is a night (it waits for data and turns, its report comes from
            ``write_report``).
    """
    esc = html.escape
    now = now or datetime.now(UTC)
    out = []
    if status.state == "queued":
        if status.paused:
            out.append(
                f"Its {esc(status.paused)} is <strong>paused</strong>: the scheduler starts "
                f"none of its runs until it is unpaused."
                + (
                    " Unpausing the DAG also starts its latest scheduled night at once, unless "
                    "that night has run already (catchup is off: that one only)."
                    if nightly and status.paused == "DAG"
                    else ""
                )
            )
        if status.run_after is not None and status.run_after > now:
            out.append(f"It is due at {_at(status.run_after)}.")
        limit = status.max_active_runs
        if limit is not None and len(status.running) >= limit:
            ahead = ", ".join(
                _run(r) + (f" (running since {_at(t)})" if t else "") for r, t in status.running
            )
            whose = "its backfill runs" if status.backfill else "the DAG runs"
            out.append(
                f"It waits behind {ahead}: {whose} {limit} run{'s' if limit != 1 else ''} at a "
                "time (max_active_runs)."
            )
        if not out:
            out.append("Nothing holds it back: the scheduler starts it at its next loop.")
        return out
    for task in status.waiting_at:
        if task == "wait_for_data":
            out.append(
                "It waits for its data at <code>wait_for_data</code>: a night of today waits "
                "until the use case's fresh tables hold rows through the day before (the "
                "task's log names them), and is skipped if they never land."
            )
        elif task == "wait_for_turn":
            if holder is None or holder[0] == status.run_id:
                out.append(
                    "It waits at <code>wait_for_turn</code>; nobody holds the turn now: it "
                    "takes it at its next look."
                )
            else:
                since = f" since {_at(holder[1])}" if holder[1] else ""
                out.append(
                    f"It waits at <code>wait_for_turn</code> behind {_run(holder[0])}, which "
                    f"holds the use case's turn{since}: one night of a use case runs at a time "
                    "(scheduled, triggered and backfilled alike)."
                )
        elif task.startswith("approve_"):
            out.append(
                f"It waits at <code>{esc(task)}</code> for a person to approve or reject "
                "(<em>Browse → Required Actions</em>)."
            )
        else:
            out.append(f"It waits at <code>{esc(task)}</code>.")
    if not status.live and not out:
        out.append(
            f"It ended ({esc(status.state)}) before its night started (<code>start_run</code>), "
            "so there is nothing to report: its tasks say why (<code>wait_for_data</code> "
            "skips a night whose data never landed)."
            if nightly
            else f"It ended ({esc(status.state)}) without recording a page."
        )
    return out


def page_html(settings: Settings, status: RunStatus, use_case: str, *, nightly: bool = True) -> str:
    """The page of a run that has no report of its own (yet): its state, since when, and
    what it waits for or behind (:func:`why`; the turn's holder read from ``ml.night_turns``)."""
    from pipeline.reports.pages import simple_page

    esc = html.escape
    holder = turns.holder(settings, use_case) if "wait_for_turn" in status.waiting_at else None
    since = {
        "queued": f" since {_at(status.queued_at)}" if status.queued_at else "",
        "running": f" since {_at(status.started_at)}" if status.started_at else "",
    }.get(status.state, "")
    coming = (
        "Its report appears here once <code>write_report</code> has run."
        if nightly
        else "Its page appears here once it has recorded its date."
    )
    body = (
        f"<p class='meta'><code>{esc(status.dag_id)}</code> · <code>{esc(status.run_id)}</code>"
        f"</p><p>This run is <strong>{esc(status.state)}</strong>{since}"
        f" and has no report of its own{' yet' if status.live else ''}.</p>"
        + "".join(f"<p>{line}</p>" for line in why(status, holder, nightly=nightly))
        + (f"<p class='note'>{coming}</p>" if status.live else "")
        + "<p class='note'>Every report: <a href='../../'>nightscore reports</a>"
        ".</p>"
    )
    return simple_page(f"Run of {status.dag_id}: {status.state}", body)
