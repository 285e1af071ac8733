"""Training is reproducible: same data and seed, same bytes and version, whatever the threads."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pyarrow as pa
import pytest
from threadpoolctl import threadpool_limits

from pipeline import train, usecase
from pipeline.errors import ConfigError

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
        update={"model": usecase.ModelSpec(estimator="logistic_regression", params={"C": 0.5})}
    )
    t, y = table()
    model = train.fit(uc, t, ["country", "f0", "f1", "f2", "f3"], y)
    p = train.predict(model, t, ["country", "f0", "f1", "f2", "f3"])
    assert 0 < p.min() < p.max() < 1


def test_an_unknown_model_parameter_names_the_key_and_the_choices() -> None:
    uc = UC.evolve({"model": {"params": {"max_iters": 10}}})
    with pytest.raises(ConfigError, match=r"model\.params.*max_iter.*found max_iters"):
        train.build_model(uc, [], ["f0"])
