"""Train a challenger: a seeded scikit-learn Pipeline on several past snapshots.

The model carries its own preprocessing (one-hot encoding of categories; gradient boosted
trees handle missing numbers natively), so scoring applies exactly what training did.
The artifact is a pickle plus a JSON card next to it: features and dtypes, training
window, out-of-time metrics, library versions and the pickle's sha256.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import platform
from contextlib import suppress
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.conf.config import Settings, private_dir, private_file
from pipeline.conf.usecase import UseCase
from pipeline.core import files
from pipeline.core.errors import ConfigError, DataError
from pipeline.stages import checks, evaluate, features
from pipeline.store import registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedModel:
    """A trained challenger and the holdout dates it is judged on tonight.

    ``registered_before``: the same artifact bytes were already registered (by an earlier
    night or an earlier attempt), under ``version``: no new name, no new candidate.
    """

    version: str
    sha256: str
    artifact_uri: str
    metrics: dict[str, float]
    holdouts: list[features.Snapshot]
    card: dict[str, Any]
    snapshots_reused: int = 0  # built by earlier nights (not in the card: not the model's)
    registered_before: bool = False

    def as_xcom(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "artifact_uri": self.artifact_uri,
            "roc_auc": self.metrics.get("roc_auc"),
            "lift_top_decile": self.metrics.get("lift_top_decile"),
            "holdouts": [h.as_xcom() for h in self.holdouts],
            "registered_before": self.registered_before,
        }


def build_model(uc: UseCase, categorical: list[str], numeric: list[str]) -> Any:
    """The unfitted Pipeline: preprocessing suited to the estimator, seeded.

    ``hist_gradient_boosting`` takes categories natively (ordinal codes, the rarest past
    254 grouped, unseen ones as missing) and missing numbers as they are: a column per
    category instead of a one-hot block keeps the matrix narrow for training and scoring.
    ``logistic_regression`` one-hot encodes categories, imputes medians and standardizes.

    Raises:
        ConfigError: a ``model.params`` key the estimator does not take.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    params: dict[str, Any] = dict(uc.model.params)
    clf: Any
    if uc.model.estimator == "hist_gradient_boosting":
        categories: Any = OrdinalEncoder(
            handle_unknown="use_encoded_value",
            unknown_value=np.nan,
            encoded_missing_value=np.nan,
            max_categories=254,
            dtype=np.float32,
        )
        numbers: Any = "passthrough"
        params.setdefault("early_stopping", False)
        params.setdefault("categorical_features", list(range(len(categorical))) or None)
        clf = _estimator(HistGradientBoostingClassifier, uc, params)
    else:
        categories = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        numbers = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
        params.setdefault("max_iter", 1000)
        clf = _estimator(LogisticRegression, uc, params)
    pre = ColumnTransformer(
        [("categorical", categories, categorical), ("numeric", numbers, numeric)],
        verbose_feature_names_out=False,
    )
    return Pipeline([("preprocess", pre), ("model", clf)])


def _estimator(cls: Any, uc: UseCase, params: dict[str, Any]) -> Any:
    allowed = set(cls().get_params())
    unknown = sorted(set(params) - allowed - {"random_state"})
    if unknown:
        raise ConfigError(
            f"{uc.source}: key model.params: expected parameters of {cls.__name__} "
            f"({', '.join(sorted(allowed))}), found {', '.join(unknown)}"
        )
    return cls(random_state=uc.model.seed, **params)


def without_thread_count(model: Any) -> Any:
    """The fitted model with no record of the thread count it was fitted with.

    HistGradientBoosting keeps the OpenMP thread count of the fit in its bin mapper, so the
    pickle (and the version derived from its hash) would change with the machine's cores;
    ``None`` lets scoring use whatever the worker allows. The trees do not depend on it.
    """
    estimator = model[-1] if hasattr(model, "steps") else model
    mapper = getattr(estimator, "_bin_mapper", None)
    if mapper is not None and hasattr(mapper, "n_threads"):
        mapper.n_threads = None
    return model


def split_columns(schema: pa.Schema, uc: UseCase) -> tuple[list[str], list[str]]:
    """(categorical, numeric) feature names from a snapshot schema."""
    cols = features.feature_columns(schema, uc)
    categorical = [c for c in cols if pa.types.is_string(schema.field(c).type)]
    numeric = [c for c in cols if c not in categorical]
    return categorical, numeric


def to_frame(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    """Features as pandas with NaN for missing numbers (what the model was fitted on)."""
    frame = table.select(columns).to_pandas()
    for name in columns:
        if frame[name].dtype.kind in "iub":
            frame[name] = frame[name].astype(np.float64)
    return frame


def library_versions() -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


@dataclass(frozen=True)
class TrainingData:
    """Matured, labelled snapshots for a run: training rows and the out-of-time holdout.

    With ``training.max_rows`` below the snapshots' rows, ``table`` is a seeded sample:
    every class is drawn at its own rate (positives kept whole while they fit) and
    ``weights`` (1 / rate) make the sample stand for every row; ``uniform`` marks the rows
    of a plain random sample of it (the drift reference).
    """

    snapshots: list[features.Snapshot]
    holdouts: list[features.Snapshot]
    table: pa.Table
    weights: np.ndarray | None = None
    uniform: np.ndarray | None = None
    rows_before_cap: int = 0
    reused: int = 0

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.table.column("label").to_numpy())

    @property
    def holdout(self) -> features.Snapshot:
        """The newest holdout date's snapshot."""
        return self.holdouts[-1]

    def reference_table(self) -> pa.Table:
        """Rows drawn at one rate whatever their label: the training distribution."""
        return self.table if self.uniform is None else self.table.filter(pa.array(self.uniform))


def training_data(settings: Settings, uc: UseCase, run_date: date) -> TrainingData:
    """The training snapshots (reused where an earlier night built them) and the holdout
    snapshots for a model trained by ``run_date``'s run, capped at ``training.max_rows``.

    Raises:
        DataError: a snapshot is empty or the training labels have a single class.
    """
    train_dates, holdout_dates = features.training_dates(uc, run_date)
    try:
        built = [features.training_snapshot(settings, uc, d, run_date) for d in train_dates]
    except DataError as err:
        if "empty population" not in str(err):
            raise
        raise DataError(
            f"{err}. The training window of {uc.name} reaches back to {train_dates[0]}, "
            f"up to {uc.history_text()} before {run_date}. Shorten it in {uc.source}, or run a "
            f"later date; `nightscore usecase check {uc.name} --date {run_date}` shows the "
            "history the warehouse holds"
        ) from None
    held = [features.training_snapshot(settings, uc, d, run_date) for d in holdout_dates]
    holdouts = [s for s, _ in held]
    snaps = [s for s, _ in built]
    reused = sum(r for _, r in built) + sum(r for _, r in held)
    # the label column alone, to size the sample; each file's hash is checked when it is read whole
    labels = [pq.read_table(s.path, columns=["label"]).column("label").to_numpy() for s in snaps]
    y = np.concatenate(labels)
    if y.min() == y.max():
        raise DataError(
            f"training labels for {uc.name} ({train_dates[0]}..{train_dates[-1]}) are all {y[0]}; "
            f"a model needs both classes: check {uc.sql.labels.name} and the warehouse history"
        )
    rates = sampling_rates(y, uc.training.max_rows)
    if rates is None:
        table = pa.concat_tables([features.read_snapshot(s) for s in snaps])
        return TrainingData(snaps, holdouts, table, rows_before_cap=len(y), reused=reused)
    parts, weights, uniform = [], [], []
    for snap, label in zip(snaps, labels, strict=True):
        draw = np.random.default_rng([uc.model.seed, snap.as_of.toordinal()]).random(len(label))
        keep = draw < rates[label]
        parts.append(features.read_snapshot(snap).filter(pa.array(keep)))
        weights.append(1.0 / rates[label[keep]])
        uniform.append(draw[keep] < rates.min())
    log.info(
        "training %s on %d of %d rows (training.max_rows): negatives drawn at %.4f, "
        "positives at %.4f, weighted to stand for the rest",
        uc.name,
        sum(p.num_rows for p in parts),
        len(y),
        rates[0],
        rates[1],
    )
    return TrainingData(
        snaps,
        holdouts,
        pa.concat_tables(parts),
        np.concatenate(weights),
        np.concatenate(uniform),
        len(y),
        reused,
    )


def sampling_rates(labels: np.ndarray, max_rows: int | None) -> np.ndarray | None:
    """Per class (index 0 and 1), the rate a row is drawn at to fit ``max_rows``; ``None``
    when every row fits. The rarer class is kept whole if it fills at most half the cap."""
    n = len(labels)
    if max_rows is None or n <= max_rows:
        return None
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    rare = int(np.argmin(counts))
    rates = np.full(2, max_rows / n)
    if counts[rare] <= max_rows / 2:
        rates[rare] = 1.0
        rates[1 - rare] = (max_rows - counts[rare]) / counts[1 - rare]
    return rates


def cpu_allowance() -> int:
    """CPUs this process may use: its affinity, bounded by a cgroup CPU quota (containers,
    Kubernetes limits) and by ``OMP_NUM_THREADS`` when set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    allowance = cpus or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            allowance = min(allowance, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    with suppress(ValueError):
        allowance = min(allowance, int(os.environ.get("OMP_NUM_THREADS", "") or allowance))
    return max(1, allowance)


def threads(share: int = 1) -> Any:
    """A context in which OpenMP uses this process's part of the CPU allowance (one of
    ``share`` tasks running at once): oversubscribed OpenMP makes trees many times slower."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=thread_count(share), user_api="openmp")


def thread_count(share: int = 1) -> int:
    """Threads for one of ``share`` tasks running at once: its part of the CPU allowance."""
    return max(1, cpu_allowance() // max(1, share))


def fit(
    uc: UseCase,
    table: pa.Table,
    columns: list[str],
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> Any:
    """Fit the use case's Pipeline on ``columns`` of ``table`` (seeded: same data, same model)."""
    categorical = [c for c in columns if pa.types.is_string(table.schema.field(c).type)]
    numeric = [c for c in columns if c not in categorical]
    model = build_model(uc, categorical, numeric)
    extra = {} if weights is None else {"model__sample_weight": weights}
    with threads():
        model.fit(to_frame(table, categorical + numeric), labels, **extra)
    return without_thread_count(model)


def save_and_register(
    settings: Settings,
    uc: UseCase,
    run_date: date,
    model: Any,
    columns: list[str],
    data: TrainingData,
    code_version: str = "",
) -> TrainedModel:
    """Measure on the (pooled) holdout, write the artifact and its card, register it as a
    candidate.

    The version is ``<use case>-<run date>-<sha256 prefix>``: the same data and seed give
    the same bytes. Bytes already registered under another version (a re-run, or a night
    whose training window did not move) keep that version: nothing is written or
    registered again, and the model is ``registered_before``.
    """
    hold = features.read_pooled(data.holdouts)
    p = predict(model, hold, columns)
    metrics = evaluate.classification_metrics(
        hold.column("label").to_numpy(), p, capacity=uc.capacity
    )
    blob = pickle.dumps(model, protocol=5)
    sha = registry_sha(blob)
    known = registry.with_sha256(settings, uc.name, sha)
    if known is not None:
        log.info(
            "trained %s as of %s: the same bytes as %s (sha256 %s), not registered again",
            uc.name,
            run_date,
            known.version,
            sha[:16],
        )
        return TrainedModel(
            known.version,
            sha,
            known.artifact_uri,
            metrics,
            data.holdouts,
            registry.card(known),
            data.reused,
            registered_before=True,
        )
    version = f"{uc.name}-{run_date:%Y%m%d}-{sha[:8]}"
    out_dir = settings.artifacts / uc.name / version
    private_dir(out_dir)
    files.sweep(out_dir)
    artifact = out_dir / "model.pkl"
    _write_whole(artifact, blob)
    schema = data.table.schema
    labels = hold.column("label").to_numpy()
    dates = hold.column(features.HOLDOUT_DATE).to_numpy()
    newest = data.holdouts[-1]
    card = {
        "use_case": uc.name,
        "version": version,
        "trained_as_of": run_date.isoformat(),
        "features": [{"name": c, "dtype": str(schema.field(c).type)} for c in columns],
        "training_window": {
            "snapshots": [
                {"as_of": s.as_of.isoformat(), "sha256": s.sha256, "rows": s.rows}
                for s in data.snapshots
            ],
            "holdout": {
                "as_of": newest.as_of.isoformat(),
                "sha256": newest.sha256,
                "rows": newest.rows,
            },
            "holdouts": [
                {
                    "as_of": h.as_of.isoformat(),
                    "sha256": h.sha256,
                    "rows": h.rows,
                    "positives": int(labels[dates == np.datetime64(h.as_of)].sum()),
                }
                for h in data.holdouts
            ],
            "label_horizon_days": uc.label.horizon_days,
            "training_rows": data.table.num_rows,
            "rows_before_cap": data.rows_before_cap or data.table.num_rows,
            "max_rows": uc.training.max_rows,
            "positive_rate": float(np.average(data.labels, weights=data.weights)),
        },
        "metrics": metrics,
        # per-feature distributions of the training data: the drift reference
        "reference": checks.reference_profile(data.reference_table(), columns),
        "library_versions": library_versions(),
        "seed": uc.model.seed,
        "estimator": uc.model.estimator,
        "model_params": uc.model.params,
        "code_version": code_version,
        "sha256": sha,
        "artifact_uri": str(artifact),
    }
    card_bytes = json.dumps(card, indent=2, sort_keys=True).encode()
    _write_whole(out_dir / "model.json", card_bytes)
    registry.register(settings, card, registry_sha(card_bytes))
    log.info(
        "trained %s on %d rows: out-of-time AUC %.4f, top-decile lift %.2f",
        version,
        data.table.num_rows,
        metrics["roc_auc"],
        metrics["lift_top_decile"],
    )
    return TrainedModel(version, sha, str(artifact), metrics, data.holdouts, card, data.reused)


def _write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (its owner's only) whole or not at all."""
    tmp = files.temporary(path)
    tmp.write_bytes(data)
    private_file(tmp)
    os.replace(tmp, path)


def train_challenger(
    settings: Settings, uc: UseCase, run_date: date, code_version: str = ""
) -> TrainedModel:
    """Train on matured snapshots before ``run_date`` and measure on the out-of-time holdout."""
    data = training_data(settings, uc, run_date)
    categorical, numeric = split_columns(data.table.schema, uc)
    columns = categorical + numeric
    model = fit(uc, data.table, columns, data.labels, data.weights)
    return save_and_register(settings, uc, run_date, model, columns, data, code_version)


def registry_sha(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def predict(model: Any, table: pa.Table, columns: list[str]) -> np.ndarray:
    """Probabilities of the positive class for the rows of ``table``."""
    return predict_frame(model, to_frame(table, columns))


def predict_frame(model: Any, frame: pd.DataFrame) -> np.ndarray:
    """Probabilities of the positive class for the rows of a :func:`to_frame` frame."""
    return np.asarray(model.predict_proba(frame)[:, 1], dtype=np.float64)
