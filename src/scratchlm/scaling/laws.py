"""Scaling-law fits: how loss falls with parameters N, training tokens D and compute C.

Approach 3 of Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models"): the
parametric form L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising the Huber loss
(delta 1e-3) between the predicted and observed log-loss, the prediction written as
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, by L-BFGS from
a grid of initialisations (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in
{0, 5, ..., 25}), keeping the best. The Huber losses are summed, not averaged: Besiroglu et al.
(2024, "Chinchilla Scaling: A replication attempt", Epoch AI) trace Hoffmann et al.'s
implausible estimates to an optimiser stopped early by a too-small objective.

Minimising L(N, D) under C = 6 N D gives (Hoffmann et al., eq. 4)
    N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b, G = (alpha A / (beta B))^(1 / (alpha + beta)),
    a = beta / (alpha + beta), b = alpha / (alpha + beta).

Approach 2 (IsoFLOP profiles): at each compute budget, a parabola of loss against log N
through the runs of that budget; its vertex is that budget's compute-optimal N (and, along
the budget's runs, D), and power laws N_opt = k C^a, D_opt = k' C^b through the vertices give
the exponents directly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from scratchlm.errors import ScratchError

HUBER_DELTA = 1e-3  # Hoffmann et al.'s delta, on residuals of log-loss


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens, L nats)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a(self) -> float:
        """The exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """The exponent of D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) that minimise the loss at `compute` FLOPs counted as 6 N D."""
        if compute <= 0:
            raise ScratchError(f"the compute budget must be positive, got {compute:g}")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (compute / 6) ** self.a, (compute / 6) ** self.b / g

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "a": self.a, "b": self.b}


# Hoffmann et al. 2022, eq. 10 (the body's rounded values); Besiroglu et al. 2024, table 1.
HOFFMANN = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
EPOCH = ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
PUBLISHED = {"hoffmann": HOFFMANN, "epoch": EPOCH}


# ------------------------------------------------------------------------------------------------
# Approach 3: the parametric fit


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float, counts: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Summed Huber loss of the log-loss residuals, and its gradient in (a, b, e, alpha, beta),
    for a batch of parameter vectors theta (G, 5) at once: (G,), (G, 5). `counts` (G, k)
    weighs each run per row (a bootstrap resample is a row of counts); None counts each
    once."""
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))  # each (G, 1)
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))  # (3, G, k)
    top = terms.max(0)
    lse = top + np.log(np.exp(terms - top).sum(0))  # (G, k)
    weights = np.exp(terms - lse)  # (3, G, k): d lse / d term
    r = lse - log_l
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))  # (G, k)
    dr = np.where(small, r, delta * np.sign(r))  # (G, k)
    if counts is not None:
        loss, dr = loss * counts, dr * counts
    loss = loss.sum(1)
    grad = np.stack([(dr * weights[0]).sum(1), (dr * weights[1]).sum(1),
                     (dr * weights[2]).sum(1), -(dr * weights[0] * log_n).sum(1),
                     -(dr * weights[1] * log_d).sum(1)], axis=1)
    return loss, grad


def lbfgs_batch(fun, x0: np.ndarray, iters: int = 500, memory: int = 10,
                tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Minimise a batch of independent problems by L-BFGS from each row of x0 at once.
    fun(x, rows) gets the points x (len(rows), p) of the batch's rows `rows` (so per-row data
    can be picked) and returns their values and gradients, (len(rows),) and (len(rows), p).
    The two-loop recursion per row, a backtracking (Armijo) line search per row, a row frozen
    once its step lowers its loss by less than `tol` (relative). One batched call replaces
    thousands of scipy calls, whose per-call overhead would make Hoffmann et al.'s
    4,500-point grid take a quarter of an hour."""
    x = np.array(x0, dtype=np.float64)
    f, g = fun(x, np.arange(len(x)))
    # (s, y, rho) of the last `memory` steps, per row; a row without a step there has zeros.
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    active = np.flatnonzero(np.isfinite(f))
    for _ in range(iters):
        if not len(active):
            break
        q = g[active].copy()
        alphas = []
        for s, y, rho in reversed(history):
            a = rho[active] * (s[active] * q).sum(1)
            q -= a[:, None] * y[active]
            alphas.append(a)
        gamma = np.full(len(active), 1e-3)  # a cautious first step, before any curvature
        if history:
            s, y = history[-1][0][active], history[-1][1][active]
            yy = (y * y).sum(1)
            gamma = np.where(yy > 0, (s * y).sum(1) / np.where(yy > 0, yy, 1), gamma)
        r = gamma[:, None] * q
        for (s, y, rho), a in zip(history, reversed(alphas)):
            r += s[active] * (a - rho[active] * (y[active] * r).sum(1))[:, None]
        p = -r
        slope = (p * g[active]).sum(1)
        uphill = slope >= 0
        p[uphill] = -g[active][uphill]
        slope[uphill] = -(p[uphill] ** 2).sum(1)
        # Backtracking: halve each row's step until its loss falls enough (Armijo).
        step = np.zeros_like(x)
        f_new, g_new = f.copy(), g.copy()
        t = np.ones(len(active))
        pending = np.arange(len(active))
        for _ in range(40):
            rows = active[pending]
            f_try, g_try = fun(x[rows] + t[pending, None] * p[pending], rows)
            ok = np.isfinite(f_try) & (f_try <= f[rows] + 1e-4 * t[pending] * slope[pending])
            step[rows[ok]] = t[pending[ok], None] * p[pending[ok]]
            f_new[rows[ok]], g_new[rows[ok]] = f_try[ok], g_try[ok]
            pending = pending[~ok]
            if not len(pending):
                break
            t[pending] *= 0.5
        y_all = g_new - g
        sy = (step * y_all).sum(1)
        good = sy > 1e-16
        history.append((np.where(good[:, None], step, 0.0), np.where(good[:, None], y_all, 0.0),
                        np.where(good, 1 / np.where(good, sy, 1), 0.0)))
        history = history[-memory:]
        gain = f[active] - f_new[active]
        x, f, g = x + step, f_new, g_new
        active = active[gain > tol * np.maximum(np.abs(f[active]), 1e-30)]
    return x, f


def _check_points(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> None:
    if not len(n) == len(d) == len(loss):
        raise ScratchError("N, D and the losses must have one value per run")
    if len(n) < 5:
        raise ScratchError(f"the parametric fit has 5 constants and needs at least 5 runs, got "
                           f"{len(n)}; add sizes or budgets to the sweep")
    if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0)) or \
            not np.all(np.isfinite(loss)):
        raise ScratchError("N, D and the losses must be positive and finite")


def init_grid() -> np.ndarray:
    """Hoffmann et al.'s grid of initial (a, b, e, alpha, beta): 4,500 points."""
    return np.array(list(itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5),
                                           np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
                                           np.arange(0, 2.5, 0.5))), dtype=np.float64)


def fit_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                   delta: float = HUBER_DELTA, inits: np.ndarray | None = None
                   ) -> tuple[ChinchillaLaw, float]:
    """The law that best fits the runs (N, D, loss), and its summed Huber loss: L-BFGS from
    every initialisation (batched), then scipy's L-BFGS-B from the best end point to polish
    it."""
    from scipy.optimize import minimize

    n_, d_, l_ = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    _check_points(n_, d_, l_)
    args = (np.log(n_), np.log(d_), np.log(l_), delta)
    starts = init_grid() if inits is None else np.atleast_2d(np.asarray(inits, np.float64))
    best = starts[0]
    if len(starts) > 1:
        # A loose stop for the grid (the best end point is polished below) keeps it short.
        ends, values = lbfgs_batch(lambda th, _: _objective(th, *args), starts, iters=150,
                                   tol=1e-6)
        if not np.isfinite(values).any():
            raise ScratchError("the parametric fit did not converge from any initialisation")
        best = ends[np.nanargmin(np.where(np.isfinite(values), values, np.nan))]

    def one(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _objective(theta[None], *args)
        return float(value[0]), grad[0]

    res = minimize(one, best, jac=True, method="L-BFGS-B",
                   options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-14})
    theta = res.x if res.fun <= one(best)[0] else best
    a, b, e, alpha, beta = theta
    return ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                         beta=float(beta)), one(theta)[0]


def bootstrap_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                         law: ChinchillaLaw, rounds: int = 100, seed: int = 0,
                         delta: float = HUBER_DELTA) -> dict[str, tuple[float, float]]:
    """Percentile (5%, 95%) intervals of each constant over `rounds` refits on runs resampled
    with replacement, each started from `law`. A resample is a vector of counts (how often
    each run was drawn) weighting its Huber terms, so every round is one row of a single
    batched L-BFGS: one SciPy fit per round took seconds each."""
    rng = np.random.default_rng(seed)
    n_, d_, l_ = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    counts = np.stack([np.bincount(rng.integers(0, len(n_), len(n_)), minlength=len(n_))
                       for _ in range(rounds)]).astype(np.float64)  # (rounds, k)
    counts = counts[(counts > 0).sum(1) >= 5]  # a round needs 5 distinct runs for 5 constants
    if not len(counts):
        return {}
    args = (np.log(n_), np.log(d_), np.log(l_), delta)
    start = np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])
    ends, values = lbfgs_batch(lambda th, rows: _objective(th, *args, counts=counts[rows]),
                               np.tile(start, (len(counts), 1)), iters=1000, tol=1e-12)
    draws = [ChinchillaLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                           beta=float(beta)).as_dict()
             for (a, b, e, alpha, beta), v in zip(ends, values) if np.isfinite(v)]
    return {k: (float(np.percentile([x[k] for x in draws], 5)),
                float(np.percentile([x[k] for x in draws], 95))) for k in draws[0]} \
        if draws else {}


# ------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles


@dataclass(frozen=True)
class IsoFLOP:
    """The parabola loss = c0 + c1 x + c2 x^2 (x = ln N) through one budget's runs, and its
    vertex."""

    compute: float
    coef: tuple[float, float, float]  # (c0, c1, c2)
    n_opt: float
    d_opt: float
    loss_opt: float
    runs: int


def isoflop_profile(compute: float, n: Sequence[float], d: Sequence[float],
                    loss: Sequence[float]) -> IsoFLOP | None:
    """The budget's vertex; None when it has fewer than 3 runs, or the parabola does not
    turn upwards, or its vertex lies outside the sizes tried (an extrapolation, not a
    measurement of the optimum)."""
    if len(n) < 3:
        return None
    x, y = np.log(np.asarray(n, dtype=np.float64)), np.asarray(loss, dtype=np.float64)
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None
    x_opt = -c1 / (2 * c2)
    if not x.min() <= x_opt <= x.max():
        return None
    # D along the budget's runs: ln D is linear in ln N (exactly, slope -1, under C = 6ND).
    slope, intercept = np.polyfit(x, np.log(np.asarray(d, dtype=np.float64)), 1)
    return IsoFLOP(compute, (float(c0), float(c1), float(c2)), float(math.exp(x_opt)),
                   float(math.exp(intercept + slope * x_opt)),
                   float(c0 + c1 * x_opt + c2 * x_opt ** 2), len(n))


@dataclass(frozen=True)
class PowerLaw:
    """y = k C^exponent."""

    k: float
    exponent: float

    def __call__(self, compute):
        return self.k * np.power(compute, self.exponent)


def fit_power_law(compute: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least squares of ln y on ln C."""
    if len(compute) < 2:
        raise ScratchError("a power law in compute needs at least two budgets with a vertex")
    slope, intercept = np.polyfit(np.log(compute), np.log(y), 1)
    return PowerLaw(float(math.exp(intercept)), float(slope))
