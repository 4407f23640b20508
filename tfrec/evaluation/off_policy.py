"""Off-policy estimates: the value a new policy would have had, from logs of another policy.

Logged rewards only cover what the logging policy chose to show; reweighting them by
how much more (or less) often the target policy would have chosen the same action
removes that bias without running an experiment. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["OffPolicyEstimate", "importance_weights", "ips_estimate", "pbm_ips_estimate",
           "position_bias", "slate_ips_estimate", "slate_snips_estimate", "snips_estimate"]


@dataclass(frozen=True)
class OffPolicyEstimate:
    """Estimated value of a target policy from logs of another (logging) policy.

    Args:
      value: estimated mean reward per decision under the target policy.
      stderr: its standard error; ci_low / ci_high the normal (1 - alpha) interval.
      effective_sample_size: (sum w)^2 / sum w^2; far below n means a few large
        weights dominate and the estimate is unreliable.
      n: logged decisions used.
    """

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    effective_sample_size: float
    n: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def importance_weights(rewards: Sequence[float], target_propensity: Sequence[float],
                       logging_propensity: Sequence[float],
                       clip: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Rewards and weights pi_target(a|x) / pi_logging(a|x) of each logged decision.

    Validated here once so IPS and SNIPS reject the same bad logs with the same message.

    Args:
      rewards: observed reward of each logged decision.
      target_propensity: probability the target policy takes the logged action, in [0, 1].
      logging_propensity: probability the logging policy took it, in (0, 1].
      clip: optional maximum weight (> 0).

    Returns:
      (rewards, weights) as float64 arrays.

    Raises:
      ValueError: shapes differ or are empty, a value is not finite, a propensity is
        out of range, or clip <= 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    pt = np.asarray(target_propensity, dtype=np.float64)
    p0 = np.asarray(logging_propensity, dtype=np.float64)
    if not (r.ndim == pt.ndim == p0.ndim == 1) or not (r.size == pt.size == p0.size):
        raise ValueError(f"rewards, target_propensity and logging_propensity must be 1-D of "
                         f"equal length, got {r.shape}, {pt.shape}, {p0.shape}")
    if r.size == 0:
        raise ValueError("no logged decisions")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(pt)) and np.all(np.isfinite(p0))):
        raise ValueError("rewards and propensities must be finite")
    if np.any(p0 <= 0) or np.any(p0 > 1):
        raise ValueError("logging propensities must be in (0, 1]: an action the logging "
                         "policy could never take cannot be evaluated")
    if np.any(pt < 0) or np.any(pt > 1):
        raise ValueError("target propensities must be in [0, 1]")
    w = pt / p0
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 (or None for no clipping), got {clip}")
        w = np.minimum(w, clip)
    return r, w


def _normal_quantile(alpha: float) -> float:
    """z such that a normal interval of +-z standard errors covers 1 - alpha."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for 95% intervals, got {alpha}")
    return NormalDist().inv_cdf(1 - alpha / 2)


def _group_index(groups: Optional[Sequence[Any]], n: int) -> np.ndarray:
    """Group number (0..G-1) of each of `n` values; each value its own group without
    `groups`. Raises ValueError when there is not one key per value."""
    keys = np.arange(n) if groups is None else np.asarray(groups)
    if keys.shape != (n,):
        raise ValueError(f"groups must have one key per value ({n}), got {keys.shape}")
    return np.unique(keys, return_inverse=True)[1].reshape(n)


def _effective_sample_size(w: np.ndarray) -> float:
    """Kish's effective sample size of importance weights (0 without a positive one)."""
    return float(w.sum() ** 2 / np.sum(w ** 2)) if np.any(w > 0) else 0.0


def mean_interval(values: Sequence[float], alpha: float = 0.05,
                  groups: Optional[Sequence[Any]] = None) -> Tuple[float, float, float]:
    """(mean, low, high): the mean with its normal-approximation interval.

    The online side of an off-policy check, measured the way the estimates are. With
    `groups` (e.g. the user of each request) the standard error is cluster-robust:
    one user's requests are not independent draws. Bounds are NaN for fewer than two
    values (or groups).
    """
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if groups is not None:
        sums = np.bincount(_group_index(groups, len(x)), weights=x - mean)
        g = sums.size
        se = (float(np.sqrt(g / (g - 1) * np.sum(sums ** 2)) / len(x)) if g > 1
              else float("nan"))
    else:
        se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    z = _normal_quantile(alpha)
    return mean, mean - z * se, mean + z * se


def _estimate(value: float, stderr: float, w: np.ndarray, alpha: float) -> OffPolicyEstimate:
    z = _normal_quantile(alpha)
    ess = _effective_sample_size(w)
    return OffPolicyEstimate(value=float(value), stderr=float(stderr),
                             ci_low=float(value - z * stderr), ci_high=float(value + z * stderr),
                             effective_sample_size=ess, n=int(w.size))


def ips_estimate(rewards: Sequence[float], target_propensity: Sequence[float],
                 logging_propensity: Sequence[float], clip: Optional[float] = None,
                 alpha: float = 0.05) -> OffPolicyEstimate:
    """Inverse propensity scoring: mean of reward * pi_target(a|x) / pi_logging(a|x).

    Unbiased for the target policy's value whenever the logging policy gives every
    action the target may take a non-zero probability; clipping the weights trades a
    little bias for much less variance.

    Args:
      rewards: observed reward of each logged decision.
      target_propensity: probability the target policy takes the logged action.
      logging_propensity: probability the logging policy took it (> 0).
      clip: optional maximum weight.
      alpha: 1 - confidence of the interval.

    Returns:
      The estimate with its standard error, interval and effective sample size.

    Raises:
      ValueError: see `importance_weights`; alpha outside (0, 1).
    """
    r, w = importance_weights(rewards, target_propensity, logging_propensity, clip)
    terms = r * w
    stderr = terms.std(ddof=1) / math.sqrt(terms.size) if terms.size > 1 else float("nan")
    return _estimate(terms.mean(), stderr, w, alpha)


def snips_estimate(rewards: Sequence[float], target_propensity: Sequence[float],
                   logging_propensity: Sequence[float], clip: Optional[float] = None,
                   alpha: float = 0.05) -> OffPolicyEstimate:
    """Self-normalised IPS: sum(r * w) / sum(w).

    Slightly biased but bounded by the reward range and far less variable than IPS
    when weights are large; the standard error uses the delta method.

    Args:
      rewards / target_propensity / logging_propensity / clip / alpha: as ips_estimate.

    Returns:
      The estimate with its standard error, interval and effective sample size.

    Raises:
      ValueError: as ips_estimate, or every weight is zero (the target policy never
        takes a logged action, so the logs say nothing about it).
    """
    r, w = importance_weights(rewards, target_propensity, logging_propensity, clip)
    total = w.sum()
    if total <= 0:
        raise ValueError("all importance weights are zero: the target policy never takes "
                         "a logged action")
    value = float(np.sum(r * w) / total)
    stderr = math.sqrt(float(np.sum((w * (r - value)) ** 2))) / total
    return _estimate(value, stderr, w, alpha)


def _slate_shape(*arrays) -> Tuple[int, int]:
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"rewards and propensities must be [lists, positions] arrays of one "
                         f"shape, got {sorted(shapes)}")
    return next(iter(shapes))


def slate_ips_estimate(rewards: Sequence[Sequence[float]],
                       target_propensity: Sequence[Sequence[float]],
                       logging_propensity: Sequence[Sequence[float]],
                       clip: Optional[float] = None, alpha: float = 0.05) -> OffPolicyEstimate:
    """Per-list value of a ranking policy from logged lists (position-based IPS).

    When a shopper's reaction to an item depends only on the item and its position,
    sum_j r_j * pi_target(d_j at j) / pi_logging(d_j at j) is unbiased for the target
    list's total reward; the interval treats each logged list as one draw.

    Args:
      rewards: [lists, positions] reward of the item shown at each position.
      target_propensity: [lists, positions] probability the target puts that item there.
      logging_propensity: [lists, positions] logged probability (> 0 where shown).
      clip: optional maximum weight.
      alpha: 1 - confidence of the interval.

    Returns:
      The estimated reward per list with its interval (n = lists).

    Raises:
      ValueError: shapes differ or are not 2-D, or as `importance_weights`.
    """
    lists, positions = _slate_shape(rewards, target_propensity, logging_propensity)
    r, w = importance_weights(np.ravel(rewards), np.ravel(target_propensity),
                              np.ravel(logging_propensity), clip)
    per_list = (r * w).reshape(lists, positions).sum(axis=1)
    stderr = per_list.std(ddof=1) / math.sqrt(lists) if lists > 1 else float("nan")
    estimate = _estimate(per_list.mean(), stderr, w, alpha)
    return OffPolicyEstimate(**{**estimate.to_dict(), "n": int(lists)})


def slate_snips_estimate(rewards: Sequence[Sequence[float]],
                         target_propensity: Sequence[Sequence[float]],
                         logging_propensity: Sequence[Sequence[float]],
                         clip: Optional[float] = None, alpha: float = 0.05) -> OffPolicyEstimate:
    """Self-normalised `slate_ips_estimate`: SNIPS per position, summed over positions.

    Each position's weights average 1 under the logging policy, so normalising them
    position by position keeps the estimate on the reward scale with far less variance
    than IPS when a few weights are large (slightly biased). Positions' errors are
    combined as if independent.

    Args / Returns / Raises: as `slate_ips_estimate`; positions whose weights are all
    zero (the target never matches a logged item there) add nothing.
    """
    lists, positions = _slate_shape(rewards, target_propensity, logging_propensity)
    r = np.asarray(rewards, dtype=np.float64)
    pt = np.asarray(target_propensity, dtype=np.float64)
    p0 = np.asarray(logging_propensity, dtype=np.float64)
    value, variance, weights = 0.0, 0.0, []
    for j in range(positions):
        _, w = importance_weights(r[:, j], pt[:, j], p0[:, j], clip)
        weights.append(w)
        if w.sum() <= 0:
            continue
        estimate = snips_estimate(r[:, j], pt[:, j], p0[:, j], clip, alpha)
        value += estimate.value
        variance += estimate.stderr ** 2
    estimate = _estimate(value, math.sqrt(variance), np.concatenate(weights), alpha)
    return OffPolicyEstimate(**{**estimate.to_dict(), "n": int(lists)})


def position_bias(rewards: np.ndarray, shown: np.ndarray, randomized: np.ndarray,
                  counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Examination weight of each position, relative to the first, from randomized lists.

    In a list whose order was drawn at random, every position holds the same mix of
    items, so the mean reward at position j over such lists is theta_j times one
    common attractiveness (the position-based click model).

    Args:
      rewards: [lists, positions] reward of the item shown at each position.
      shown: [lists, positions] a logged item is there.
      randomized: [lists] the list's order was drawn uniformly at random.
      counts: optional [lists] weight of each list (a bootstrap's resample counts).

    Returns:
      float64 [positions], 1 at the first position (0 where no randomized list shows
      anything).

    Raises:
      ValueError: no randomized list, or no reward at the first position of any.
    """
    weight = randomized.astype(np.float64) * (1.0 if counts is None else counts)
    shown_at = weight @ shown.astype(np.float64)
    mean = np.divide(weight @ (rewards * shown), shown_at, out=np.zeros(shown.shape[1]),
                     where=shown_at > 0)
    if not np.any(weight > 0):
        raise ValueError("no randomized (explored) lists: the position bias cannot be "
                         "measured; log with exploration (epsilon > 0)")
    if mean[0] <= 0:
        raise ValueError("no reward at the first position of any randomized list: too few "
                         "explored lists to measure the position bias")
    return mean / mean[0]


def pbm_ips_estimate(rewards: Sequence[Sequence[float]],
                     target_position: Sequence[Sequence[int]],
                     inclusion_propensity: Sequence[Sequence[float]],
                     randomized: Sequence[bool], groups: Optional[Sequence[Any]] = None,
                     alpha: float = 0.05, resamples: int = 1000,
                     seed: int = 0) -> OffPolicyEstimate:
    """Per-list value of a ranking from logged lists, crediting items at any position.

    Under the position-based click model (reward of item d at position j = theta_j *
    attractiveness of d), a logged reward of d at position j, scaled by
    theta_t / theta_j, estimates d's reward at the target's position t; weighting it by
    1 / P(d in the logged list) instead of 1 / P(d at exactly t) is unbiased with far
    smaller weights than position-by-position IPS. theta comes from the randomized
    (explored) lists of the same logs; the interval is a bootstrap over `groups`
    (users: requests of one user are not independent) that re-measures theta each time.

    Args:
      rewards: [lists, positions] reward of the item shown at each logged position.
      target_position: [lists, positions] where the target list puts that item, -1 if
        it does not show it (or nothing was logged there).
      inclusion_propensity: [lists, positions] probability the logging policy shows
        that item anywhere in the list, > 0 where logged.
      randomized: [lists] the logged order was drawn uniformly at random.
      groups: [lists] unit of resampling (default each list).
      alpha: 1 - confidence of the interval.
      resamples: bootstrap resamples.
      seed: bootstrap seed.

    Returns:
      The estimated reward per list; effective_sample_size from the item weights.

    Raises:
      ValueError: shapes differ, a credited item has no inclusion propensity, a target
        position lies past the logged width, or as `position_bias`.
    """
    lists, positions = _slate_shape(rewards, target_position, inclusion_propensity)
    r = np.asarray(rewards, dtype=np.float64)
    t = np.asarray(target_position, dtype=np.int64)
    p = np.asarray(inclusion_propensity, dtype=np.float64)
    randomized = np.asarray(randomized, dtype=bool)
    if randomized.shape != (lists,):
        raise ValueError(f"randomized must have one flag per list ({lists}), got "
                         f"{randomized.shape}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(p))):
        raise ValueError("rewards and propensities must be finite")
    credited = t >= 0
    if np.any(t >= positions):
        raise ValueError(f"a target position is past the logged width {positions}: the "
                         f"position bias there cannot be measured")
    if np.any(credited & ((p <= 0) | (p > 1))):
        raise ValueError("inclusion propensities of credited items must be in (0, 1]")
    shown = p > 0
    weight = np.where(credited, 1.0 / np.where(credited, p, 1.0), 0.0)
    # A[l, t, j]: weighted reward of list l's items logged at j that the target puts at t.
    a = np.zeros((lists, positions, positions))
    rows, cols = np.nonzero(credited)
    np.add.at(a, (rows, t[rows, cols], cols), (r * weight)[rows, cols])
    a = a.reshape(lists, positions * positions)

    def value(counts: Optional[np.ndarray]) -> float:
        theta = position_bias(r, shown, randomized, counts)
        ratio = np.divide.outer(theta, theta, out=np.zeros((positions, positions)),
                                where=theta[None, :] > 0)  # theta_t / theta_j
        per_list = a @ ratio.ravel()
        if counts is None:
            return float(per_list.mean())
        return float(counts @ per_list / counts.sum())

    point = value(None)
    group_of = _group_index(groups, lists)
    n_groups = int(group_of.max()) + 1
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(int(resamples)):
        picked = np.bincount(rng.integers(n_groups, size=n_groups), minlength=n_groups)
        try:
            draws.append(value(picked[group_of].astype(np.float64)))
        except ValueError:  # a resample without randomized lists: skip it
            continue
    if len(draws) < 2:
        raise ValueError("too few lists for a bootstrap interval")
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return OffPolicyEstimate(value=point, stderr=float(np.std(draws, ddof=1)),
                             ci_low=float(low), ci_high=float(high),
                             effective_sample_size=_effective_sample_size(weight[credited]),
                             n=int(lists))
