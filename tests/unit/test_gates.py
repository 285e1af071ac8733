from __future__ import annotations

import numpy as np
import pytest

from pipeline import evaluate

POLICY = {
    "auc_floor": 0.7,
    "lift_floor": 2.0,
    "noninferiority_margin": 0.01,
    "score_psi_limit": 0.25,
}


def data(seed: int = 0, n: int = 5000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(float)
    strong = np.clip(0.1 + 0.25 * y + rng.normal(0, 0.08, n), 0.001, 0.999)
    weak = np.clip(0.1 + 0.05 * y + rng.normal(0, 0.08, n), 0.001, 0.999)
    return y, strong, weak


def checks_for(y, p, champion_p=None, **overrides):
    policy = POLICY | overrides
    ch = evaluate.classification_metrics(y, p)
    champ = evaluate.classification_metrics(y, champion_p) if champion_p is not None else None
    ci = (
        evaluate.paired_bootstrap(y, p, champion_p, resamples=200, seed=1)
        if champion_p is not None
        else None
    )
    return {
        c["check"]: c
        for c in evaluate.gate_checks(
            **policy,
            challenger=ch,
            p_challenger=p,
            champion=champ,
            p_champion=champion_p,
            intervals=ci,
        )
    }


def test_a_better_model_passes_every_check() -> None:
    y, strong, weak = data()
    checks = checks_for(y, strong, weak, score_psi_limit=5.0)
    assert all(c["passed"] for c in checks.values()), checks


def test_a_worse_model_fails_noninferiority_and_names_the_interval() -> None:
    y, strong, weak = data()
    checks = checks_for(y, weak, strong, auc_floor=0.5, lift_floor=1.0, score_psi_limit=5.0)
    assert not checks["auc_noninferiority"]["passed"]
    assert "[" in checks["auc_noninferiority"]["found"]


@pytest.mark.parametrize(
    ("mutate", "failing"),
    [
        (lambda p: np.where(np.arange(len(p)) % 7 == 0, np.nan, p), "no_nan_scores"),
        (lambda p: np.full_like(p, 0.3), "scores_not_constant"),
        (lambda p: np.clip(p + 0.4, 0, 1), "score_psi_vs_champion"),
    ],
)
def test_sanity_checks_catch_broken_scores(mutate, failing: str) -> None:
    y, strong, _ = data()
    broken = mutate(strong)
    ch = {"roc_auc": 0.9, "lift_top_decile": 5.0}
    champ = evaluate.classification_metrics(y, strong)
    ci = {"roc_auc_diff": {"estimate": 0.0, "low": 0.0, "high": 0.0}}
    checks = {
        c["check"]: c
        for c in evaluate.gate_checks(
            **POLICY,
            challenger=ch,
            p_challenger=broken,
            champion=champ,
            p_champion=strong,
            intervals=ci,
        )
    }
    assert not checks[failing]["passed"]


def test_schema_problems_fail_the_gate() -> None:
    y, strong, _ = data()
    checks = {
        c["check"]: c
        for c in evaluate.gate_checks(
            **POLICY,
            challenger=evaluate.classification_metrics(y, strong),
            p_challenger=strong,
            schema_problems=["usage_trend missing"],
        )
    }
    assert not checks["feature_schema_compatible"]["passed"]
    assert "usage_trend missing" in checks["feature_schema_compatible"]["found"]


def test_first_model_is_judged_on_floors_and_sanity_only() -> None:
    y, strong, _ = data()
    names = set(checks_for(y, strong))
    assert "auc_noninferiority" not in names and {"auc_floor", "lift_floor"} <= names


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    y, strong, weak = data(3)
    a = evaluate.paired_bootstrap(y, strong, weak, resamples=1000, seed=9)
    b = evaluate.paired_bootstrap(y, strong, weak, resamples=1000, seed=9)
    assert a == b
    ci = a["roc_auc_diff"]
    assert ci["resamples"] == 1000 and ci["low"] < ci["estimate"] < ci["high"]
    same = evaluate.paired_bootstrap(y, strong, strong, resamples=300, seed=9)["roc_auc_diff"]
    assert same["low"] == same["high"] == 0.0  # paired: identical models differ by exactly zero


def test_psi_and_agreement() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(10_000)
    assert evaluate.psi(p, p) == pytest.approx(0.0)
    assert evaluate.psi(p, p**3) > 0.25
    same = evaluate.agreement(p, p, capacity=100)
    assert same["spearman"] == pytest.approx(1.0) and same["top_decile_overlap"] == 1.0
    assert same["audience_enter"] == same["audience_leave"] == 0
    other = evaluate.agreement(p, rng.random(10_000), capacity=100)
    assert abs(other["spearman"]) < 0.05 and other["audience_enter"] > 80


def test_a_holdout_above_the_cap_is_bootstrapped_on_a_sample_of_it() -> None:
    y, strong, weak = data(4)
    whole = evaluate.paired_bootstrap(y, strong, weak, resamples=300, seed=9)
    capped = evaluate.paired_bootstrap(y, strong, weak, resamples=300, seed=9, max_rows=len(y) // 4)
    for name in ("roc_auc_diff", "lift_top_decile_diff"):
        # the estimate is the whole holdout's, the interval scaled to its size
        assert capped[name]["estimate"] == whole[name]["estimate"]
        assert capped[name]["rows"] == len(y) // 4 and whole[name]["rows"] == len(y)
        width = whole[name]["high"] - whole[name]["low"]
        assert 0.6 * width < capped[name]["high"] - capped[name]["low"] < 1.6 * width
        assert capped[name]["low"] < capped[name]["estimate"] < capped[name]["high"]
