"""A/B tests: is an observed uplift between two variants more than noise?

Per-user outcomes of a live experiment give an uplift; its confidence interval and
p-value (Welch's t or a bootstrap) say whether to ship it. numpy and math only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Sequence

import numpy as np

from tfrec.metrics.ranking import _check_k

__all__ = ["ABResult", "ab_test", "student_t_cdf"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional).

    Welch's test has fractional degrees of freedom, so this uses the incomplete beta
    function rather than a table.

    Args:
      t: the statistic.
      df: degrees of freedom (> 0).

    Returns:
      The cumulative probability.

    Raises:
      ValueError: df <= 0.
    """
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _inverse_cdf(cdf: Callable[[float], float], q: float, lo: float = -1e3,
                 hi: float = 1e3) -> float:
    """x with cdf(x) = q by bisection (the t quantile has no closed form)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class ABResult:
    """Outcome of comparing a treatment variant to control on per-user outcomes.

    Args:
      uplift: treatment mean - control mean; relative_uplift: uplift / control mean.
      ci_low / ci_high: (1 - alpha) confidence interval of the uplift.
      p_value: two-sided, for "no difference in means".
    """

    control_mean: float
    treatment_mean: float
    uplift: float
    relative_uplift: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str
    n_control: int
    n_treatment: int
    alpha: float

    @property
    def significant(self) -> bool:
        """p_value < alpha: the uplift is unlikely to be noise."""
        return self.p_value < self.alpha

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def _outcomes(values: Sequence[float], name: str) -> np.ndarray:
    """One variant's per-user outcomes as a validated float64 vector."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} outcomes must be 1-D (one value per user), got {x.shape}")
    if x.size < 2:
        raise ValueError(f"{name} needs at least 2 users, got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} outcomes must be finite numbers")
    return x


def ab_test(control: Sequence[float], treatment: Sequence[float], method: str = "welch",
            alpha: float = 0.05, num_bootstrap: int = 5000, seed: int = 0) -> ABResult:
    """Uplift of treatment over control with a confidence interval and a p-value.

    Welch's t-test does not assume equal variances (variants change behaviour, so
    variances differ); the bootstrap makes no normality assumption, which matters
    for skewed outcomes such as revenue per user.

    Args:
      control / treatment: one outcome per user (e.g. clicks, revenue).
      method: "welch" or "bootstrap" (percentile interval; p-value from the share
        of resampled uplifts on the other side of zero).
      alpha: 1 - confidence level.
      num_bootstrap: resamples for the bootstrap.
      seed: bootstrap seed.

    Returns:
      The uplift with its interval, p-value and the inputs' sizes.

    Raises:
      ValueError: unknown method, alpha outside (0, 1), fewer than 2 users in a
        variant, non-finite outcomes, or num_bootstrap < 1.
    """
    if method not in ("welch", "bootstrap"):
        raise ValueError(f"method must be 'welch' or 'bootstrap', got {method!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    c, t = _outcomes(control, "control"), _outcomes(treatment, "treatment")
    mc, mt = float(c.mean()), float(t.mean())
    uplift = mt - mc
    relative = uplift / mc if mc != 0 else float("nan")
    if method == "welch":
        vc, vt = c.var(ddof=1) / c.size, t.var(ddof=1) / t.size
        se = math.sqrt(vc + vt)
        if se == 0:
            p_value = 1.0 if uplift == 0 else 0.0
            low = high = uplift
        else:
            df = (vc + vt) ** 2 / (vc ** 2 / (c.size - 1) + vt ** 2 / (t.size - 1))
            stat = uplift / se
            p_value = 2.0 * (1.0 - student_t_cdf(abs(stat), df))
            q = _inverse_cdf(lambda x: student_t_cdf(x, df), 1 - alpha / 2)
            low, high = uplift - q * se, uplift + q * se
    else:
        num_bootstrap = _check_k(num_bootstrap, "num_bootstrap")
        rng = np.random.default_rng(seed)
        diffs = np.empty(num_bootstrap)
        chunk = max(1, 2_000_000 // max(c.size, t.size))
        for start in range(0, num_bootstrap, chunk):
            n = min(chunk, num_bootstrap - start)
            diffs[start:start + n] = (
                t[rng.integers(0, t.size, (n, t.size))].mean(axis=1)
                - c[rng.integers(0, c.size, (n, c.size))].mean(axis=1))
        low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
        p_value = min(1.0, 2.0 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return ABResult(control_mean=mc, treatment_mean=mt, uplift=uplift, relative_uplift=relative,
                    ci_low=float(low), ci_high=float(high), p_value=float(p_value), method=method,
                    n_control=int(c.size), n_treatment=int(t.size), alpha=float(alpha))
