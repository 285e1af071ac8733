"""Feature checks by policy: non-finite values, unseen categories (a few warn, most stop the
night), nulls growing past training."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.conf import usecase
from pipeline.stages import checks

CHURN = usecase.load("churn")
BARE = CHURN.evolve({"feature_checks": {"default": {"max_null_fraction": None, "min": None}}})


def table(n: int = 10_000, seed: int = 1, **columns: object) -> pa.Table:
    rng = np.random.default_rng(seed)
    base = {
        "customer_id": np.arange(n),
        "balance_trend": rng.normal(0, 1, n),
        "country": pa.array(rng.choice(["GB", "DE", "FR"], n).tolist(), pa.string()),
    }
    return pa.table(base | columns)


def failed(results: list[checks.CheckResult]) -> dict[str, checks.CheckResult]:
    return {f"{r.check}:{r.target}": r for r in results if not r.passed}


def test_a_new_warehouses_natural_features_pass_the_default_policy() -> None:
    t = table()
    nullable = t.set_column(1, "balance_trend", pa.array([None] * 3000 + [-1.5] * 7000))
    assert failed(checks.check_features(nullable, BARE, None, None)) == {}


def test_nan_and_infinity_in_a_feature_fail() -> None:
    values = np.random.default_rng(2).normal(0, 1, 10_000)
    values[:3] = [np.nan, np.inf, -np.inf]
    t = table(balance_trend=values)
    bad = failed(checks.check_features(t, BARE, None, None))
    assert bad["finite:balance_trend"].found == "3 rows"


def test_a_small_share_of_categories_never_seen_in_training_warns() -> None:
    reference = checks.reference_profile(table(), ["balance_trend", "country"])
    country = np.array(table().column("country").to_pylist(), dtype=object)
    country[:100] = "BR"  # 1% of the rows: a PSI of about 0.05, under the drift limit
    tonight = table(country=pa.array(country.tolist(), pa.string()))
    results = checks.check_features(tonight, BARE, None, reference)
    psi = next(r for r in results if r.check == "feature_psi" and r.target == "country")
    assert psi.passed
    unseen = failed(results)["unseen_categories:country"]
    assert unseen.severity == "warn"
    assert unseen.found == "1.00%; appeared: 'BR' (100 rows); vanished: none"
    few = country.copy()
    few[30:100] = "GB"
    ok = checks.check_features(
        table(country=pa.array(few.tolist(), pa.string())), BARE, None, reference
    )
    assert "unseen_categories:country" not in failed(ok)


def test_nulls_growing_past_training_fail_a_feature_without_a_limit_of_its_own() -> None:
    reference = checks.reference_profile(table(), ["balance_trend", "country"])
    values = np.random.default_rng(4).normal(0, 1, 10_000).tolist()
    storm = table(balance_trend=pa.array([None] * 1500 + values[1500:]))
    bad = failed(checks.check_features(storm, BARE, None, reference))
    assert (
        "null_increase:balance_trend" in bad
        and "max_null_increase" in bad["null_increase:balance_trend"].expected
    )
    limited = BARE.evolve(
        {"feature_checks": {"features": {"balance_trend": {"max_null_fraction": 0.2}}}}
    )
    assert "null_increase:balance_trend" not in failed(
        checks.check_features(storm, limited, None, reference)
    )


def test_a_population_far_from_the_previous_nights_fails() -> None:
    t = table()
    ok = checks.check_features(t, CHURN, 11_000, None)
    assert "population_size:population" not in failed(ok)
    halved = failed(checks.check_features(t, CHURN, 20_000, None))["population_size:population"]
    assert halved.found == "10,000 (0.50 x)" and "0.75..1.33" in halved.expected


def respelled(t: pa.Table, share: float = 1.0) -> pa.Table:
    """``t`` with the country of the first ``share`` of its rows lower-cased."""
    country = t.column("country").to_pylist()
    cut = round(share * len(country))
    return t.set_column(
        2, "country", pa.array([c.lower() for c in country[:cut]] + country[cut:], pa.string())
    )


def test_every_value_respelled_stops_the_night_naming_what_appeared_and_vanished() -> None:
    reference = checks.reference_profile(table(), ["balance_trend", "country"])
    results = checks.check_features(respelled(table()), BARE, None, reference)
    unseen = failed(results)["unseen_categories:country"]
    assert unseen.severity == "fail"
    assert unseen.found.startswith("100.00%; appeared: ")
    for value in ("'gb'", "'de'", "'fr'"):
        assert f"{value} (" in unseen.found.split("; vanished")[0]
    for value in ("'GB'", "'DE'", "'FR'"):
        assert f"{value} (" in unseen.found.split("; vanished")[1]
    assert "max_unseen_share" in unseen.expected and "<= 20.0%" in unseen.expected


@pytest.mark.parametrize(("share", "severity"), [(0.19, "warn"), (0.21, "fail")])
def test_the_stop_follows_the_default_share(share: float, severity: str) -> None:
    reference = checks.reference_profile(table(), ["balance_trend", "country"])
    results = checks.check_features(respelled(table(), share), BARE, None, reference)
    assert failed(results)["unseen_categories:country"].severity == severity


def test_the_stop_is_configurable_per_feature() -> None:
    reference = checks.reference_profile(table(), ["balance_trend", "country"])
    tonight = respelled(table())
    never = BARE.evolve({"feature_checks": {"features": {"country": {"max_unseen_share": None}}}})
    assert (
        failed(checks.check_features(tonight, never, None, reference))[
            "unseen_categories:country"
        ].severity
        == "warn"
    )
    strict = BARE.evolve({"feature_checks": {"default": {"max_unseen_share": 0.005}}})
    few = respelled(table(), 0.01)
    unseen = failed(checks.check_features(few, strict, None, reference))
    assert unseen["unseen_categories:country"].severity == "fail"
    assert unseen["unseen_categories:country"].found.startswith("1.00%")
