"""Scoring throughput of the predictors that could serve a HistGradientBoosting model, side
by side on the same model and rows, each against scikit-learn's ``predict_proba``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/predictors.py [--rows 1000000]
        [--train-rows 300000] [--threads 2] [--repeat 3]

The model is ``train.fit`` with churn's shipped parameters (usecases/churn/usecase.yaml)
on synthetic rows of churn's shape: three string columns (one with more categories than
the encoder keeps), nineteen numbers with missing values. Every candidate starts from the
same Arrow table, so its rows/s includes getting to the matrix it reads:

- ``sklearn``: ``train.predict`` (Arrow -> pandas -> Pipeline.predict_proba), the baseline;
- ``forest``: ``pipeline.stages.forest`` as it serves (Arrow -> encoded matrix -> the compiled
  bitvector kernel, numba); ``forest-walk``: the same with its per-tree walk (what serves
  trees of more than 64 leaves);
- ``onnxruntime``: the classifier converted by skl2onnx, fed the encoded matrix;
- ``tl2cgen``: the classifier imported by treelite 4 and compiled to C by TL2cgen (gcc),
  fed the encoded matrix.

rows/CPU-s divides by the CPU seconds of all the process's threads: on a shared machine it
moves less than rows/s. The last two are not nightscore dependencies; a candidate whose package is missing is
reported as skipped (install it into the venv to compare:
``.venv/bin/uv pip install --python .venv/bin/python onnxruntime skl2onnx tl2cgen treelite``).
The best of ``--repeat`` runs is reported: the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

STRINGS = ["contract_type", "country", "channel"]
NUMBERS = [f"n{i:02d}" for i in range(19)]
COLUMNS = STRINGS + NUMBERS


def churn_shaped(n: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """``n`` synthetic rows with churn's column shape and a label with real signal."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 10.0, size=(n, len(NUMBERS)))
    x[:, 5:9] = np.round(x[:, 5:9] / 10)  # counts
    x[rng.random(x.shape) < np.linspace(0, 0.3, len(NUMBERS))] = np.nan
    contract = rng.choice(np.array(["monthly", "annual", "two_year"], dtype=object), n)
    country = rng.choice(np.array(["GB", "DE", "PL", "FR", "ES", "IT"], dtype=object), n)
    channels = np.array([f"channel-{i}" for i in range(300)], dtype=object)
    channel = channels[np.minimum(rng.zipf(1.3, n) - 1, len(channels) - 1)]
    for column in (country, channel):
        column[rng.random(n) < 0.01] = None
    filled = np.nan_to_num(x, nan=20.0)
    signal = (
        1.2 * (contract == "monthly")
        - 0.02 * filled[:, 0]
        + 0.3 * np.nan_to_num(x[:, 5])
        + 0.4 * np.isin(channel, channels[3:30])
        + 0.5 * (country == "PL")
        # interactions and curves: enough structure for early stopping to run a while
        + 0.8 * np.sin(filled[:, 1] / 4) * (filled[:, 2] > 20)
        + 0.4 * np.cos(filled[:, 3] / 6) * (contract != "two_year")
        + 0.002 * filled[:, 4] * filled[:, 10] / 4
        - 0.6 * (np.abs(filled[:, 11] - filled[:, 12]) < 5)
    )
    y = (signal + rng.logistic(size=n) > 2.5).astype(np.int64)
    table = pa.table(
        {
            "contract_type": pa.array(contract, pa.string()),
            "country": pa.array(country, pa.string()),
            "channel": pa.array(channel, pa.string()),
            **{name: pa.array(x[:, i]) for i, name in enumerate(NUMBERS)},
        }
    )
    return table, y


def best_of(repeat: int, run: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """The best wall seconds and the best CPU seconds (all threads of the process) of
    ``repeat`` runs, and the last result."""
    walls, cpus, out = [], [], np.empty(0)
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), out


def onnx_candidate(model: Any, fast: Any, threads: int) -> tuple[Callable[[pa.Table], Any], float]:
    import onnxruntime as ort
    from skl2onnx import to_onnx

    started = time.perf_counter()
    onx = to_onnx(model[-1], np.zeros((1, len(fast.matrix))), options={"zipmap": False})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(onx.SerializeToString(), opts)
    name = session.get_inputs()[0].name
    prepared = time.perf_counter() - started

    def predict(table: pa.Table) -> np.ndarray:
        outputs = session.run(None, {name: fast.encode(table)})
        return np.asarray(outputs[1], dtype=np.float64)[:, 1]

    return predict, prepared


def tl2cgen_candidate(
    model: Any, fast: Any, threads: int, folder: Path
) -> tuple[Callable[[pa.Table], Any], float]:
    import tl2cgen
    import treelite

    started = time.perf_counter()
    imported = treelite.sklearn.import_model(model[-1])
    lib = folder / "forest.so"
    tl2cgen.export_lib(imported, toolchain="gcc", libpath=str(lib), params={"parallel_comp": 8})
    predictor = tl2cgen.Predictor(str(lib), nthread=threads)
    prepared = time.perf_counter() - started

    def predict(table: pa.Table) -> np.ndarray:
        matrix = tl2cgen.DMatrix(fast.encode(table), dtype="float64")
        return np.asarray(predictor.predict(matrix), dtype=np.float64).reshape(len(table), -1)[
            :, -1
        ]

    return predict, prepared


def _short(err: BaseException) -> str:
    """The first line of an error and of its cause (converters quote whole models)."""
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
    return text if err.__cause__ is None else f"{text} (caused by {_short(err.__cause__)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--train-rows", type=int, default=300_000)
    parser.add_argument("--threads", type=int, default=0, help="default: the CPU allowance")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--trees", type=int, default=0, help="fit exactly this many trees (no early stopping)"
    )
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from pipeline.conf import usecase
    from pipeline.stages import forest, train

    threads = args.threads or train.cpu_allowance()
    uc = usecase.load("churn")
    if args.trees:
        params = {**uc.model.params, "max_iter": args.trees, "early_stopping": False}
        uc = uc.model_copy(update={"model": uc.model.model_copy(update={"params": params})})
    table, y = churn_shaped(args.train_rows, seed=1)
    started = time.perf_counter()
    model = train.fit(uc, table, COLUMNS, y)
    trees = model[-1].n_iter_
    print(
        f"model: churn's parameters, fitted on {args.train_rows:,} rows in "
        f"{time.perf_counter() - started:.1f} s: {trees} trees"
    )
    rows, _ = churn_shaped(args.rows, seed=2)

    candidates: dict[str, tuple[Callable[[pa.Table], np.ndarray] | None, str]] = {}
    prepared: dict[str, float] = {}
    started = time.perf_counter()
    fast = forest.compile_model(model, COLUMNS)
    prepared["forest"] = time.perf_counter() - started
    print(f"forest: compiled (or loaded from numba's cache) in {fast.compile_seconds:.2f} s")
    candidates["sklearn"] = (lambda t: train.predict(model, t, COLUMNS), "")
    candidates["forest"] = (lambda t: fast.predict(t, threads=threads), "")
    walk = dataclasses.replace(fast, masks=None)
    prepared["forest-walk"] = prepared["forest"]
    candidates["forest-walk"] = (lambda t: walk.predict(t, threads=threads), "")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in [
            ("onnxruntime", lambda: onnx_candidate(model, fast, threads)),
            ("tl2cgen", lambda: tl2cgen_candidate(model, fast, threads, Path(tmp))),
        ]:
            try:
                predict, seconds = build()
                candidates[name] = (predict, "")
                prepared[name] = seconds
            except ImportError as err:
                candidates[name] = (None, f"skipped: {err.name} is not installed")
            except Exception as err:
                candidates[name] = (None, f"failed to build: {_short(err)}")

        print(f"\n{args.rows:,} rows, {trees} trees, {threads} threads, best of {args.repeat}\n")
        print(
            f"{'predictor':<12} {'rows/s':>10} {'rows/CPU-s':>11} {'max |diff|':>11} "
            f"{'rows differing':>15}  note"
        )
        expected: np.ndarray | None = None
        with threadpool_limits(limits=threads, user_api="openmp"):
            for name, (predict, note) in candidates.items():
                if predict is None:
                    print(f"{name:<12} {'':>10} {'':>11} {'':>11} {'':>15}  {note}")
                    continue
                try:
                    seconds, cpu, p = best_of(args.repeat, lambda predict=predict: predict(rows))
                except Exception as err:
                    print(f"{name:<12} {'':>10} {'':>11} {'':>11} {'':>15}  failed: {_short(err)}")
                    continue
                if expected is None:
                    expected = p
                diff = np.abs(p - expected)
                setup = f"prepared in {prepared[name]:.1f} s" if name in prepared else "baseline"
                print(
                    f"{name:<12} {args.rows / seconds:>10,.0f} {args.rows / cpu:>11,.0f} "
                    f"{float(np.max(diff)):>11.3g} {int(np.count_nonzero(diff)):>15,}  {setup}"
                )


if __name__ == "__main__":
    main()
