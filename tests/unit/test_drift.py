"""Feature drift against the training reference: numeric (quantile bins) and categorical."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.conf import usecase
from pipeline.stages import checks

UC = usecase.load("churn")
COUNTRIES = ["GB", "DE", "FR", "ES", "IT"]


def frame(
    rng: np.random.Generator, n: int, shift: float = 0.0, new_country: float = 0.0
) -> pa.Table:
    country = rng.choice(COUNTRIES, n).astype(object)
    country[rng.random(n) < new_country] = "PL"
    return pa.table(
        {
            "customer_id": np.arange(n),
            "minutes_30d": rng.gamma(4.0, 50.0, n) * (1 + shift),
            "country": pa.array(country.tolist(), pa.string()),
        }
    )


def test_same_distribution_is_stable_and_a_shift_is_flagged() -> None:
    rng = np.random.default_rng(3)
    reference = checks.reference_profile(frame(rng, 20_000), ["minutes_30d", "country"])
    assert set(reference["country"]["categories"]) == set(COUNTRIES)
    stable = checks.feature_psi(frame(rng, 20_000), reference)
    assert stable["minutes_30d"] < 0.02 and stable["country"] < 0.01
    drifted = checks.feature_psi(frame(rng, 20_000, shift=0.5), reference)
    assert drifted["minutes_30d"] > UC.feature_checks.psi_limit
    assert drifted["country"] < 0.01


def test_a_category_never_seen_in_training_counts_in_full() -> None:
    rng = np.random.default_rng(4)
    reference = checks.reference_profile(frame(rng, 20_000), ["minutes_30d", "country"])
    launched = frame(rng, 20_000, new_country=0.10)  # a tenth of tonight's customers are Polish
    psi = checks.feature_psi(launched, reference)
    assert psi["country"] > UC.feature_checks.psi_limit
    results = checks.check_features(launched, UC, None, reference)
    flagged = [r for r in results if r.check == "feature_psi" and not r.passed]
    assert [r.target for r in flagged] == ["country"]
    assert (
        flagged[0].severity == "warn"
    )  # drift warns (and requests a retrain); it never stops a run
    assert "expected PSI <= 0.25" in flagged[0].describe()


def test_a_reference_without_categories_still_checks_numeric_features() -> None:
    """Model cards written before categorical profiles existed keep working."""
    rng = np.random.default_rng(5)
    reference = checks.reference_profile(frame(rng, 5_000), ["minutes_30d"])
    assert set(checks.feature_psi(frame(rng, 5_000), reference)) == {"minutes_30d"}
