"""How often do the promotion gates promote a challenger, by its true quality and the holdout's size?

    .venv/bin/python benchmarks/gates.py [--draws 200] [--shared 0.8] [--decayed]

Draws champion/challenger pairs of known relative quality from a labelled population of
known truth (``pipeline.synthetic.populations``: a true probability per row, 5% positives, a
champion whose true ROC AUC is 0.75) at holdouts of 25 to 5,000 positives, runs the
shipped gates (``pipeline.stages.evaluate.judge`` with the defaults of ``gates:``) on each draw
and prints the share promoted per cell. The challengers: better by 0.05, 0.02 and 0.01
AUC; equal; worse by 0.01 and 0.03; as good at ranking but miscalibrated (+0.5 log-odds);
as good at ranking while the champion is the miscalibrated one; broken (fitted on
shuffled labels; leaky: confident scores from a feature that gave the label away in
training and is noise out of time). ``--shared`` is the share of each model's noise the
two have in common (how alike they score; the Spearman correlation it gives is printed).
It also prints how often the 95% intervals of the paired evidence hold the true
difference, with rows counted once and, for three pooled holdout dates, per entity.
``--decayed`` adds the table for a champion that monitoring found decayed (the burden
of proof flips). Seeded: the same arguments print the same table.

The last line reads
``gates: broken promoted <max %>; worse-by-0.03 promoted <at 50> / <at 100>; better-by-0.02 promoted <at 50> / <at 200>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipeline.conf.sections import Gates  # noqa: E402
from pipeline.stages import evaluate  # noqa: E402
from pipeline.synthetic import populations  # noqa: E402

SIZES = (25, 50, 100, 200, 1000, 5000)
CHAMPION_AUC = 0.75
SHIFT = 0.5  # log-odds


@dataclass(frozen=True)
class Case:
    name: str
    challenger: populations.Model
    champion: populations.Model
    should: str  # promote | keep | either
    truth_auc: float  # challenger minus champion


def cases(world: populations.World) -> list[Case]:
    base = world.noise_for_auc(CHAMPION_AUC)
    champ = populations.Model(base)

    def by(delta: float) -> populations.Model:
        return populations.Model(world.noise_for_auc(CHAMPION_AUC + delta))

    return [
        Case("better by 0.05", by(0.05), champ, "promote", 0.05),
        Case("better by 0.02", by(0.02), champ, "promote", 0.02),
        Case("better by 0.01", by(0.01), champ, "promote", 0.01),
        Case("equal", populations.Model(base), champ, "either", 0.0),
        Case("worse by 0.01", by(-0.01), champ, "keep", -0.01),
        Case("worse by 0.03", by(-0.03), champ, "keep", -0.03),
        Case("miscalibrated (+0.5)", populations.Model(base, shift=SHIFT), champ, "keep", 0.0),
        Case(
            "champion miscalibrated",
            populations.Model(base),
            populations.Model(base, shift=SHIFT),
            "promote",
            0.0,
        ),
        Case("broken: shuffled", populations.Model(base, kind="shuffled"), champ, "keep", np.nan),
        Case("broken: leaky", populations.Model(base, kind="leaky"), champ, "keep", np.nan),
    ]


def true_log_loss_gain(world: populations.World, case: Case, seed: int) -> float:
    """The challenger's log-loss gain on the whole population (a 1M-row draw)."""
    d = populations.draw(
        world,
        case.challenger,
        case.champion,
        positives=50_000,
        rng=np.random.default_rng(seed),
    )
    return float(
        np.mean(
            evaluate.log_loss_rows(d.y, d.p_champion) - evaluate.log_loss_rows(d.y, d.p_challenger)
        )
    )


def covers(ci: dict[str, float], truth: float) -> bool:
    return ci["low"] <= truth <= ci["high"]


WORLD = populations.World(prevalence=0.05, risk_sd=1.6)


@dataclass(frozen=True)
class Row:
    """One case under one mode: the promote rate per holdout size, and (normal mode) whether
    each draw's 95% intervals held the true differences."""

    mode: str | None
    case: str
    promoted: dict[int, float]
    auc_covered: list[bool]
    gain_covered: list[bool]
    spearman: list[float]


def run_case(index: int, mode: str | None, draws: int, shared: float, seed: int) -> Row:
    from scipy.stats import spearmanr

    gates = Gates()
    case = cases(WORLD)[index]
    truth_gain = true_log_loss_gain(WORLD, case, 1000 + index)
    promoted, auc_covered, gain_covered, spearman = {}, [], [], []
    for size in SIZES:
        rng = np.random.default_rng([seed, index, size])
        wins = 0
        for _ in range(draws):
            d = populations.draw(
                WORLD, case.challenger, case.champion, positives=size, rng=rng, shared=shared
            )
            verdict = evaluate.judge(gates, d.y, d.p_challenger, d.p_champion, decayed=mode)
            wins += verdict.passed
            if mode is None and not np.isnan(case.truth_auc):
                auc_covered.append(covers(verdict.evidence["roc_auc_diff"], case.truth_auc))
                gain_covered.append(covers(verdict.evidence["log_loss_gain"], truth_gain))
            if case.name == "equal" and size == 1000 and len(spearman) < 20:
                spearman.append(float(spearmanr(d.p_challenger, d.p_champion).statistic))
        promoted[size] = 100.0 * wins / draws
    return Row(mode, case.name, promoted, auc_covered, gain_covered, spearman)


def run(args: argparse.Namespace) -> int:
    from concurrent.futures import ProcessPoolExecutor

    gates = Gates()
    table = cases(WORLD)
    began = time.monotonic()
    print(
        f"world: {WORLD.prevalence:.0%} positives, true AUC of the oracle {WORLD.auc(1e-9):.3f}, "
        f"of the champion {CHAMPION_AUC}; {args.draws} draws per cell; noise shared by the two "
        f"models {args.shared:.0%}"
    )
    print(
        f"gates (defaults): promote_confidence {gates.promote_confidence}, decayed_promote_confidence "
        f"{gates.decayed_promote_confidence}, noninferiority_margin {gates.noninferiority_margin}, "
        f"auc_floor {gates.auc_floor}, lift_floor {gates.lift_floor}, score_psi_limit "
        f"{gates.score_psi_limit}, min_holdout_positives {gates.min_holdout_positives}"
    )
    modes = [None, "decayed in the benchmark"] if args.decayed else [None]
    tasks = [(i, mode) for mode in modes for i in range(len(table))]
    rows: dict[tuple[str | None, str], Row] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_case, i, mode, args.draws, args.shared, args.seed) for i, mode in tasks
        ]
        for future in futures:
            row = future.result()
            rows[(row.mode, row.case)] = row
            print(
                f"  {row.case} ({'champion decayed' if row.mode else 'normal'}) done, "
                f"{time.monotonic() - began:.0f} s",
                file=sys.stderr,
            )
    for mode in modes:
        title = (
            "champion decayed: promoted unless shown worse, % of draws"
            if mode
            else "promoted, % of draws"
        )
        print(f"\n{title}; columns: holdout positives")
        print(f"  {'challenger':<24} {'should':<8}" + "".join(f"{s:>7,}" for s in SIZES))
        for case in table:
            cells = "".join(f"{rows[(mode, case.name)].promoted[s]:>7.1f}" for s in SIZES)
            print(f"  {case.name:<24} {case.should:<8}{cells}")
    normal = [r for r in rows.values() if r.mode is None]
    auc_cov = np.mean([c for r in normal for c in r.auc_covered])
    gain_cov = np.mean([c for r in normal for c in r.gain_covered])
    spearman = np.mean([x for r in normal for x in r.spearman])
    print(
        f"\nthe two models' Spearman correlation (equal quality): {spearman:.3f}; "
        f"95% intervals holding the true difference: AUC {100 * auc_cov:.1f}%, "
        f"log-loss gain {100 * gain_cov:.1f}% (honest cases, all sizes)"
    )
    print(pooled_coverage(WORLD, table, args))
    broken = max(
        rows[(None, c.name)].promoted[s]
        for c in table
        if c.name.startswith("broken")
        for s in SIZES
    )
    worse = [rows[(None, "worse by 0.03")].promoted[s] for s in (50, 100)]
    better = [rows[(None, "better by 0.02")].promoted[s] for s in (50, 200)]
    print(f"({time.monotonic() - began:.0f} s)")
    print(
        f"gates: broken promoted {broken:.1f}%; worse-by-0.03 promoted {worse[0]:.1f}% / "
        f"{worse[1]:.1f}%; better-by-0.02 promoted {better[0]:.1f}% / {better[1]:.1f}%"
    )
    return 0


def pooled_coverage(world: populations.World, table: list[Case], args: argparse.Namespace) -> str:
    """Coverage of the AUC difference's interval when three holdout dates of the same
    entities are pooled: with the entity-clustered variance the gates use, and with every
    row counted as independent evidence."""
    case = next(c for c in table if c.name == "better by 0.02")
    rng = np.random.default_rng([args.seed, 99])
    clustered, naive = [], []
    for _ in range(args.draws):
        d = populations.draw(
            world,
            case.challenger,
            case.champion,
            positives=200,
            rng=rng,
            shared=args.shared,
            snapshots=3,
        )
        both = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion, d.entity)
        rows = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)
        clustered.append(covers(both["roc_auc_diff"], case.truth_auc))
        naive.append(covers(rows["roc_auc_diff"], case.truth_auc))
    return (
        f"three pooled holdout dates (200 positives): the AUC difference's 95% interval holds "
        f"the truth in {100 * np.mean(clustered):.1f}% of draws per entity, "
        f"{100 * np.mean(naive):.1f}% if rows were independent"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200, help="draws per cell (default 200)")
    ap.add_argument("--shared", type=float, default=0.8, help="noise the two models share")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--decayed", action="store_true", help="also the decayed-champion table")
    ap.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)"
    )
    return run(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
