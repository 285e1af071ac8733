"""Labelled populations of known truth, for measuring decision rules (the synthetic world).

Every row has a true probability ``p = sigmoid(alpha + z)``, ``z ~ N(0, risk_sd**2)``, and a
label drawn from it. A model sees the true risk through noise of its own, ``w = z + e``,
and turns it into a probability. A calibrated model gives ``E[p | w]`` (the probit
approximation of the logistic-normal integral); its ROC AUC is a function of its noise
alone, computed here by quadrature, so a challenger "better by 0.02 AUC" is a model whose
noise is chosen to make its true AUC 0.02 higher. Champion and challenger share part of
their noise (``shared``): models fitted on the same features err alike, which is what makes
a paired comparison sharper than two separate ones.

The product never imports this module: ``benchmarks/gates.py`` and the tests do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import expit
from scipy.stats import norm

_GRID = np.linspace(-8.0, 8.0, 801)  # quadrature grid of the true logit, in risk_sd units
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(32)  # for E[f(x)], x ~ N(0, 1)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


@dataclass(frozen=True)
class World:
    """The population's law: base rate and spread of the true risk (log-odds)."""

    prevalence: float = 0.05
    risk_sd: float = 1.6

    @property
    def alpha(self) -> float:
        return _intercept(self.prevalence, self.risk_sd)

    def auc(self, noise_sd: float) -> float:
        """True ROC AUC of a model whose view of the risk has noise ``noise_sd``."""
        return _auc(self.prevalence, self.risk_sd, round(noise_sd, 12))

    def noise_for_auc(self, target: float) -> float:
        """The noise that gives a model the true AUC ``target`` (bisection on ``auc``)."""
        low, high = 1e-4, 50.0
        if not self.auc(high) < target < self.auc(low):
            raise ValueError(
                f"AUC {target} is outside what this world allows "
                f"({self.auc(high):.4f} .. {self.auc(low):.4f})"
            )
        for _ in range(80):
            mid = math.sqrt(low * high)
            low, high = (mid, high) if self.auc(mid) > target else (low, mid)
        return math.sqrt(low * high)


@lru_cache(maxsize=64)
def _intercept(prevalence: float, risk_sd: float) -> float:
    weights = norm.pdf(_GRID)
    weights /= weights.sum()
    low, high = -30.0, 30.0
    for _ in range(100):
        mid = (low + high) / 2
        rate = float((weights * expit(mid + risk_sd * _GRID)).sum())
        low, high = (mid, high) if rate < prevalence else (low, mid)
    return (low + high) / 2


@lru_cache(maxsize=256)
def _auc(prevalence: float, risk_sd: float, noise_sd: float) -> float:
    """P(w of a positive > w of a negative), w = z + e: a double integral over the true risk
    of the two rows, with the noise's difference integrated in closed form."""
    z = risk_sd * _GRID
    density = norm.pdf(_GRID)
    p = expit(_intercept(prevalence, risk_sd) + z)
    pos = density * p
    neg = density * (1 - p)
    pos /= pos.sum()
    neg /= neg.sum()
    gap = z[:, None] - z[None, :]
    beats = (
        norm.cdf(gap / (math.sqrt(2) * noise_sd)) if noise_sd > 0 else (gap > 0) + 0.5 * (gap == 0)
    )
    return float(pos @ beats @ neg)


@dataclass(frozen=True)
class Model:
    """How a model scores the population: its noise, and what is wrong with it.

    ``shift``: a constant added to its log-odds (miscalibration). ``kind``: ``honest`` (a
    noisy view of the risk, calibrated), ``shuffled`` (fitted on shuffled labels: scores
    near the base rate that know nothing), ``leaky`` (learned a feature that gave the label
    away in training and is noise out of time: confident and wrong).
    """

    noise_sd: float
    shift: float = 0.0
    kind: str = "honest"


@dataclass(frozen=True)
class Draw:
    """One labelled holdout scored by two models (rows aligned)."""

    y: np.ndarray
    truth: np.ndarray
    p_challenger: np.ndarray
    p_champion: np.ndarray
    entity: np.ndarray


def probabilities(world: World, model: Model, z: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The model's probabilities for true risks ``z`` given its standard-normal ``noise``."""
    if model.kind == "shuffled":
        return expit(world.alpha + 0.15 * noise + model.shift)
    if model.kind == "leaky":
        return expit(world.alpha + 2.5 * noise + model.shift)
    w = z + model.noise_sd * noise
    grid, logit = _calibration(world.prevalence, world.risk_sd, model.noise_sd)
    return expit(np.interp(w, grid, logit) + model.shift)


@lru_cache(maxsize=64)
def _calibration(
    prevalence: float, risk_sd: float, noise_sd: float
) -> tuple[np.ndarray, np.ndarray]:
    """A calibrated model's log-odds as a function of what it sees, on a fine grid of w:
    logit E[sigmoid(alpha + z) | w], z | w ~ N(w s2 / (s2 + t2), s2 t2 / (s2 + t2)),
    by Gauss-Hermite quadrature (interpolated between grid points)."""
    s2, t2 = risk_sd**2, noise_sd**2
    spread = math.sqrt(s2 + t2)
    grid = np.linspace(-9 * spread, 9 * spread, 4001)
    mean = grid * s2 / (s2 + t2)
    sd = math.sqrt(s2 * t2 / (s2 + t2))
    rate = expit(_intercept(prevalence, risk_sd) + mean[:, None] + sd * _NODES[None, :]) @ _WEIGHTS
    return grid, np.log(rate / (1 - rate))


def draw(
    world: World,
    challenger: Model,
    champion: Model,
    *,
    positives: int,
    rng: np.random.Generator,
    shared: float = 0.8,
    snapshots: int = 1,
) -> Draw:
    """A holdout with about ``positives`` positives scored by both models.

    ``shared``: the share of each model's noise variance common to both. ``snapshots`` > 1
    pools that many snapshots of the same entities (a row per entity and snapshot, the
    risk drifting a little between them), as pooled holdout dates are.
    """
    entities = max(2, round(positives / world.prevalence / snapshots))
    rows = entities * snapshots

    def per_row(persist: float = 0.95) -> np.ndarray:
        """Standard normal per row; with pooled snapshots an entity's draws are alike
        (correlation ``persist`` from one snapshot to another): its risk, a model's error
        about it and, through overlapping label windows, its outcome persist."""
        own = rng.standard_normal(entities)
        if snapshots == 1:
            return own
        fresh = rng.standard_normal(rows)
        return persist * np.repeat(own, snapshots) + math.sqrt(1 - persist**2) * fresh

    z = world.risk_sd * per_row()
    truth = expit(world.alpha + z)
    y = (norm.cdf(per_row(0.7)) < truth).astype(np.int8)
    common, own = per_row(), (per_row(), per_row())
    a, b = math.sqrt(shared), math.sqrt(1 - shared)
    p_ch, p_champ = (
        probabilities(world, m, z, a * common + b * mine if m.kind == "honest" else mine)
        for m, mine in ((challenger, own[0]), (champion, own[1]))
    )
    return Draw(y, truth, p_ch, p_champ, np.repeat(np.arange(entities), snapshots))
