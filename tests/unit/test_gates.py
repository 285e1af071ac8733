from __future__ import annotations

import numpy as np
import pytest

from pipeline.conf.sections import Gates
from pipeline.core import figures
from pipeline.stages import evaluate
from pipeline.synthetic import populations

WORLD = populations.World(prevalence=0.05, risk_sd=1.6)
GATES = Gates()


def model(auc: float, **kwargs) -> populations.Model:
    return populations.Model(WORLD.noise_for_auc(auc), **kwargs)


def pair(challenger, champion, positives=1000, seed=0, **kwargs) -> populations.Draw:
    return populations.draw(
        WORLD, challenger, champion, positives=positives, rng=np.random.default_rng(seed), **kwargs
    )


def checks_of(verdict: evaluate.Verdict) -> dict[str, dict]:
    return {str(c["check"]): c for c in verdict.checks}


def test_a_clearly_better_model_passes_every_check() -> None:
    d = pair(model(0.80), model(0.75))
    verdict = evaluate.judge(GATES, d.y, d.p_challenger, d.p_champion)
    assert verdict.passed, verdict.failed
    assert verdict.evidence["log_loss_gain"]["confidence"] > 0.99


def test_a_worse_model_is_kept_out_and_the_message_names_the_key() -> None:
    d = pair(model(0.72), model(0.75))
    checks = checks_of(evaluate.judge(GATES, d.y, d.p_challenger, d.p_champion))
    better = checks["better_than_champion"]
    assert not better["passed"]
    assert "gates.promote_confidence" in str(better["expected"])
    assert "95% CI" in str(better["found"])


def test_the_burden_flips_when_the_champion_has_decayed() -> None:
    # slightly worse on a small holdout: not shown better, not shown worse either
    d = pair(model(0.745), model(0.75), positives=60, seed=3)
    confidence = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)["log_loss_gain"][
        "confidence"
    ]
    assert GATES.decayed_promote_confidence < confidence < GATES.promote_confidence
    normal = checks_of(evaluate.judge(GATES, d.y, d.p_challenger, d.p_champion))
    decayed = checks_of(
        evaluate.judge(GATES, d.y, d.p_challenger, d.p_champion, decayed="realized AUC fell")
    )
    assert not normal["better_than_champion"]["passed"]
    assert decayed["better_than_champion"]["passed"]
    assert "gates.decayed_promote_confidence" in str(decayed["better_than_champion"]["expected"])
    assert "realized AUC fell" in str(decayed["better_than_champion"]["expected"])


def test_a_score_shift_that_fixes_calibration_is_not_a_fault() -> None:
    # same ranking; the champion's log-odds are off by +1.2: moving the scores back is the fix
    d = pair(model(0.75), model(0.75, shift=1.2), positives=2000)
    verdict = evaluate.judge(GATES, d.y, d.p_challenger, d.p_champion)
    shift = checks_of(verdict)["score_shift_vs_champion"]
    assert evaluate.psi(d.p_champion, d.p_challenger) > GATES.score_psi_limit
    assert shift["passed"] and "the shift is a fix" in str(shift["found"])
    assert verdict.passed, verdict.failed
    # the reverse, a challenger that breaks calibration, is stopped by the shift and the evidence
    bad = checks_of(evaluate.judge(GATES, d.y, d.p_champion, d.p_challenger))
    assert not bad["score_shift_vs_champion"]["passed"]
    assert not bad["better_than_champion"]["passed"]
    # and the check can be turned off
    off = Gates(score_psi_limit=None)
    assert "score_shift_vs_champion" not in checks_of(
        evaluate.judge(off, d.y, d.p_champion, d.p_challenger)
    )


@pytest.mark.parametrize(
    ("mutate", "failing"),
    [
        (lambda p: np.where(np.arange(len(p)) % 7 == 0, np.nan, p), "no_nan_scores"),
        (lambda p: np.full_like(p, 0.3), "scores_not_constant"),
        (lambda p: np.where(p > np.quantile(p, 0.6), 0.9, p), "top_decile_distinct"),
    ],
)
def test_sanity_checks_catch_broken_scores(mutate, failing: str) -> None:
    d = pair(model(0.75), model(0.75))
    broken = mutate(d.p_challenger)
    checks = evaluate.gate_checks(
        GATES,
        challenger={"roc_auc": 0.9, "lift_top_decile": 5.0, "rows": 1e4, "positive_rate": 0.05},
        p_challenger=broken,
    )
    assert not {c["check"]: c for c in checks}[failing]["passed"]


def test_schema_problems_fail_the_gate() -> None:
    d = pair(model(0.8), model(0.75))
    verdict = evaluate.judge(GATES, d.y, d.p_challenger, schema_problems=["usage_trend missing"])
    compatible = checks_of(verdict)["feature_schema_compatible"]
    assert not compatible["passed"] and "usage_trend missing" in str(compatible["found"])


def test_first_model_is_judged_on_evidence_floors_and_sanity_only() -> None:
    d = pair(model(0.8), model(0.75))
    names = set(checks_of(evaluate.judge(GATES, d.y, d.p_challenger)))
    assert {"auc_floor", "lift_floor", "holdout_positives"} <= names
    assert not names & {"better_than_champion", "auc_not_worse", "score_shift_vs_champion"}


def test_evidence_is_paired_and_deterministic() -> None:
    d = pair(model(0.77), model(0.75), positives=200)
    a = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)
    assert a == evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)
    auc = a["roc_auc_diff"]
    assert auc["estimate"] == pytest.approx(
        evaluate.roc_auc(d.y, d.p_challenger) - evaluate.roc_auc(d.y, d.p_champion)
    )
    assert auc["low"] < auc["estimate"] < auc["high"]
    gain = a["log_loss_gain"]["estimate"]
    assert gain == pytest.approx(
        evaluate.classification_metrics(d.y, d.p_champion)["log_loss"]
        - evaluate.classification_metrics(d.y, d.p_challenger)["log_loss"]
    )
    same = evaluate.paired_evidence(d.y, d.p_champion, d.p_champion)
    for name in ("roc_auc_diff", "log_loss_gain", "brier_gain"):
        assert same[name]["estimate"] == same[name]["se"] == 0.0
        assert same[name]["confidence"] == 0.5


def test_rows_of_one_entity_count_once() -> None:
    d = pair(model(0.77), model(0.75), positives=300)
    once = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)
    twice = [np.tile(a, 2) for a in (d.y, d.p_challenger, d.p_champion)]
    entity = np.tile(np.arange(len(d.y)), 2)
    naive = evaluate.paired_evidence(*twice)
    clustered = evaluate.paired_evidence(*twice, entity=entity)
    for name in ("roc_auc_diff", "log_loss_gain"):
        assert clustered[name]["estimate"] == pytest.approx(once[name]["estimate"])
        # each row twice is no new evidence: the clustered error is the original one
        assert clustered[name]["se"] == pytest.approx(once[name]["se"], rel=0.01)
        assert naive[name]["se"] == pytest.approx(once[name]["se"] / np.sqrt(2), rel=0.01)
    assert clustered["log_loss_gain"]["entities"] == len(d.y)


def test_the_interval_of_the_auc_difference_matches_its_spread_over_draws() -> None:
    estimates, errors = [], []
    for seed in range(300):
        d = pair(model(0.77), model(0.75), positives=100, seed=seed)
        e = evaluate.paired_evidence(d.y, d.p_challenger, d.p_champion)["roc_auc_diff"]
        estimates.append(e["estimate"])
        errors.append(e["se"])
    assert np.mean(estimates) == pytest.approx(0.02, abs=0.003)
    assert np.mean(errors) == pytest.approx(np.std(estimates), rel=0.15)


def _features(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Five features, three of them carrying the risk; labels drawn from the true probability."""
    x = rng.standard_normal((rows, 5))
    logit = -3.4 + x[:, 0] + 0.7 * x[:, 1] - 0.5 * x[:, 2]
    return x, (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)


@pytest.mark.parametrize("positives", [25, 50, 100, 200, 1000, 5000])
def test_a_challenger_fitted_on_shuffled_labels_is_rejected_at_every_holdout_size(
    positives: int,
) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(positives)
    x, y = _features(rng, 20_000)
    champion = HistGradientBoostingClassifier(max_iter=60, random_state=0).fit(x, y)
    shuffled = HistGradientBoostingClassifier(max_iter=60, random_state=0).fit(
        x, rng.permutation(y)
    )
    hx, hy = _features(rng, int(positives / y.mean()))
    verdict = evaluate.judge(
        GATES, hy, shuffled.predict_proba(hx)[:, 1], champion.predict_proba(hx)[:, 1]
    )
    assert not verdict.passed
    assert not checks_of(verdict)["better_than_champion"]["passed"]


@pytest.mark.parametrize(
    ("value", "limit", "digits", "shown"),
    [
        (0.2496, 0.25, 3, "0.2496"),
        (0.2504, 0.25, 3, "0.2504"),
        (0.25, 0.25, 3, "0.250"),
        (0.4971, 0.5, 2, "0.497"),
        (0.61234, 0.6, 4, "0.6123"),
    ],
)
def test_figures_show_which_side_of_the_limit_they_fall(value, limit, digits, shown) -> None:
    assert figures.beside(value, limit, digits) == shown
