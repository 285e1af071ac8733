"""Training is reproducible: same data and seed, same bytes and version, whatever the threads."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
from threadpoolctl import threadpool_limits

from pipeline.conf import sections, usecase
from pipeline.core.errors import ConfigError
from pipeline.stages import train

UC = usecase.load("churn")


def table(n: int = 6000, seed: int = 3) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(size=n) > 1.2).astype(np.int64)
    t = pa.table(
        {
            "customer_id": np.arange(n, dtype=np.int64),
            "country": pa.array(rng.choice(["GB", "DE", "PL"], n)),
            **{f"f{i}": x[:, i] for i in range(4)},
        }
    )
    return t, y


def fitted_bytes(threads: int, uc: usecase.UseCase = UC) -> bytes:
    t, y = table()
    with threadpool_limits(limits=threads, user_api="openmp"):
        model = train.fit(uc, t, ["country", "f0", "f1", "f2", "f3"], y)
    return pickle.dumps(model, protocol=5)


def test_same_data_and_seed_give_the_same_model_bytes_with_one_or_two_threads() -> None:
    one, two = fitted_bytes(1), fitted_bytes(2)
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()
    t, _ = table()
    a, b = pickle.loads(one), pickle.loads(two)
    cols = ["country", "f0", "f1", "f2", "f3"]
    assert np.array_equal(train.predict(a, t, cols), train.predict(b, t, cols))


def test_logistic_regression_is_a_model_spec_too() -> None:
    uc = UC.model_copy(
        update={"model": sections.ModelSpec(estimator="logistic_regression", params={"C": 0.5})}
    )
    t, y = table()
    model = train.fit(uc, t, ["country", "f0", "f1", "f2", "f3"], y)
    p = train.predict(model, t, ["country", "f0", "f1", "f2", "f3"])
    assert 0 < p.min() < p.max() < 1


def test_an_unknown_model_parameter_names_the_key_and_the_choices() -> None:
    uc = UC.evolve({"model": {"params": {"max_iters": 10}}})
    with pytest.raises(ConfigError, match=r"model\.params.*max_iter.*found max_iters"):
        train.build_model(uc, [], ["f0"])


def test_sampling_rates_keep_the_rare_class_whole_while_it_fits() -> None:
    y = np.array([1] * 100 + [0] * 9900)
    assert train.sampling_rates(y, None) is None
    assert train.sampling_rates(y, 10_000) is None
    rates = train.sampling_rates(y, 1000)
    assert rates is not None and rates[1] == 1.0 and rates[0] == pytest.approx(900 / 9900)
    # a rare class bigger than half the cap is sampled too, both at one rate
    balanced = train.sampling_rates(np.array([1] * 5000 + [0] * 5000), 1000)
    assert balanced is not None and list(balanced) == [0.1, 0.1]


def test_categories_are_native_and_unseen_or_many_categories_still_score() -> None:
    t, y = table()
    cols = ["country", "f0", "f1", "f2", "f3"]
    model = train.fit(UC, t, cols, y)
    assert list(model[-1].is_categorical_) == [True, False, False, False, False]
    unseen = t.set_column(1, "country", pa.array(["XX"] * t.num_rows))
    p = train.predict(model, unseen, cols)
    assert np.isfinite(p).all()
    # 400 distinct values: the rarest are grouped, not an error
    many = t.set_column(1, "country", pa.array([f"c{i % 400}" for i in range(t.num_rows)]))
    p = train.predict(train.fit(UC, many, cols, y), many, cols)
    assert np.isfinite(p).all()


def test_cpu_allowance_follows_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.cpu_allowance() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= train.cpu_allowance() <= (os.cpu_count() or 1)
