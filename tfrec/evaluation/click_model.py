"""Position-based click model: what a new ranking would earn, judged from logged impressions.

Raw click-through rates mix item quality with where the logging policy showed an item;
separating the two lets a new top-N be scored at the positions it would use. numpy only.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from tfrec.data.schema import PAD
from tfrec.metrics.ranking import _as_id_matrix, _check_k

__all__ = ["PositionBasedClickModel", "calibration_table", "expected_business_metrics",
           "logged_impressions"]


_IMPRESSION_COLUMNS = ("ts", "user_id", "session_id", "event_type", "item_id", "position")


def logged_impressions(events: pd.DataFrame, catalog: Optional[pd.DataFrame] = None,
                       start_ts: Optional[int] = None,
                       end_ts: Optional[int] = None) -> pd.DataFrame:
    """One row per logged impression with its outcome (clicked, purchased) and price.

    A click or purchase is attributed to the impression of the same item in the same
    session; impressions without a session are matched on (user, item) instead.

    Args:
      events: validated events table (impression events carry a position >= 0).
      catalog: optional catalog for prices (0 when absent).
      start_ts / end_ts: keep impressions with start_ts <= ts < end_ts.

    Returns:
      DataFrame(ts, user_id, session_id, item_id, position, clicked, purchased, price).

    Raises:
      ValueError: the events table lacks a column the attribution needs.
    """
    missing = [c for c in _IMPRESSION_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events table is missing columns {missing}; logged_impressions needs "
                         f"{list(_IMPRESSION_COLUMNS)} (the validated events table)")
    key = np.where(events["session_id"].astype(str) != "", events["session_id"].astype(str),
                   "user:" + events["user_id"].astype(str))
    frame = events.assign(_key=key)
    shown = frame[(frame["event_type"] == "impression") & (frame["position"] >= 0)]
    if start_ts is not None:
        shown = shown[shown["ts"] >= start_ts]
    if end_ts is not None:
        shown = shown[shown["ts"] < end_ts]
    shown = shown.drop_duplicates(["_key", "item_id"], keep="first")

    def outcome(kind: str) -> np.ndarray:
        hits = frame.loc[frame["event_type"] == kind, ["_key", "item_id"]].drop_duplicates()
        marker = pd.MultiIndex.from_frame(hits)
        return pd.MultiIndex.from_frame(shown[["_key", "item_id"]]).isin(marker)

    out = pd.DataFrame({
        "ts": shown["ts"].to_numpy(np.int64), "user_id": shown["user_id"].to_numpy(object),
        "session_id": shown["session_id"].to_numpy(object),
        "item_id": shown["item_id"].to_numpy(object),
        "position": shown["position"].to_numpy(np.int64),
        "clicked": outcome("click"), "purchased": outcome("purchase")})
    prices = (catalog.set_index("item_id")["price"] if catalog is not None
              else pd.Series(dtype=np.float64))
    out["price"] = prices.reindex(out["item_id"]).fillna(0.0).to_numpy(np.float64)
    return out


class PositionBasedClickModel:
    """P(click | item i at position p) = examination(p) * attractiveness(i).

    Raw click-through rates mix how good an item is with where the logging policy put
    it; the position-based model separates the two (alternating ratio estimates, each
    item's and position's clicks divided by its expected exposure), so a new ranking
    can be scored at the positions *it* would use. Conversion (purchase given click)
    is per item. All rates are shrunk towards the global rate with `prior_strength`
    pseudo-observations, so rarely shown items do not get extreme estimates.

    Args:
      prior_strength: pseudo-impressions (and pseudo-clicks for conversion) of the
        global rate added to every item.
      iterations: alternating updates of examination and attractiveness.

    Raises:
      ValueError: prior_strength < 0 or iterations < 1.
    """

    def __init__(self, prior_strength: float = 20.0, iterations: int = 20) -> None:
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.prior_strength = float(prior_strength)
        self.iterations = int(iterations)
        self.examination_: Optional[np.ndarray] = None

    def fit(self, impressions: pd.DataFrame) -> "PositionBasedClickModel":
        """Estimates examination per position and attractiveness/conversion per item.

        Args:
          impressions: `logged_impressions` output (position, item_id, clicked, purchased).

        Returns:
          self, fitted.

        Raises:
          ValueError: no impressions, or a negative position.
        """
        if len(impressions) == 0:
            raise ValueError("no logged impressions to fit the click model on; widen the time "
                             "range or check that the events table has impression events")
        position = impressions["position"].to_numpy(np.int64)
        if position.min() < 0:
            raise ValueError("impression positions must be >= 0; drop impressions without a "
                             "position (-1) before fitting")
        codes, items = pd.factorize(impressions["item_id"].astype(str))
        clicked = impressions["clicked"].to_numpy(np.float64)
        purchased = impressions["purchased"].to_numpy(np.float64) * clicked
        num_pos, num_items = int(position.max()) + 1, len(items)
        s = self.prior_strength
        global_rate = clicked.mean()
        clicks_by_pos = np.bincount(position, clicked, num_pos)
        clicks_by_item = np.bincount(codes, clicked, num_items)
        exam = np.ones(num_pos)
        attract = np.full(num_items, max(global_rate, 1e-6))
        for _ in range(self.iterations):
            exposure = np.bincount(codes, exam[position], num_items)
            prior = clicked.sum() / max(exam[position].sum(), 1e-12)
            attract = (clicks_by_item + s * prior) / (exposure + s)
            seen = np.bincount(position, attract[codes], num_pos)
            exam = np.where(seen > 0, clicks_by_pos / np.maximum(seen, 1e-12), 0.0)
            exam = exam / exam[0] if exam[0] > 0 else exam
            exam = np.clip(exam, 0.0, 1.0)
        global_cvr = purchased.sum() / max(clicked.sum(), 1.0)
        purchases_by_item = np.bincount(codes, purchased, num_items)
        self.conversion_ = (purchases_by_item + s * global_cvr) / (clicks_by_item + s)
        self.examination_ = exam
        self.attractiveness_ = np.clip(attract, 0.0, 1.0)
        self._index = pd.Index(items)
        self.prior_attractiveness_ = float(np.clip(clicked.sum() / max(exam[position].sum(), 1e-12),
                                                   0.0, 1.0))
        self.prior_conversion_ = float(global_cvr)
        return self

    def _check_fitted(self) -> None:
        if self.examination_ is None:
            raise RuntimeError("PositionBasedClickModel is not fitted; call fit() first")

    def _item_rates(self, item_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        # Items never shown in the logs fall back to the global (prior) rates.
        codes = self._index.get_indexer(pd.Index(np.asarray(item_ids, dtype=object).ravel()))
        known = codes >= 0
        attract = np.where(known, self.attractiveness_[np.maximum(codes, 0)],
                           self.prior_attractiveness_)
        conversion = np.where(known, self.conversion_[np.maximum(codes, 0)],
                              self.prior_conversion_)
        shape = np.shape(item_ids)
        return attract.reshape(shape), conversion.reshape(shape)

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """Examination probability per position (beyond the logged depth: the last one).

        Args:
          positions: 0-based slate positions, any shape.

        Returns:
          P(examined) per position, same shape.

        Raises:
          ValueError: a negative position.
        """
        self._check_fitted()
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError(f"positions must be >= 0 (0 is the top slot), got {positions.min()}")
        return self.examination_[np.minimum(positions, len(self.examination_) - 1)]

    def click_probability(self, item_ids: Sequence[Any], positions: Sequence[int]) -> np.ndarray:
        """P(click) of each (item, position) pair; unknown items get the prior rate.

        Args:
          item_ids: item of each pair.
          positions: 0-based position of each pair, aligned with item_ids.

        Returns:
          examination(position) * attractiveness(item) per pair.
        """
        self._check_fitted()
        attract, _ = self._item_rates(np.asarray(item_ids, dtype=object))
        return self.examination(np.asarray(positions)) * attract

    def expected_outcomes(self, recommended: Any, prices: Optional[Mapping[str, float]] = None,
                          k: int = 10) -> Dict[str, float]:
        """Expected CTR, CVR and GMV of showing each top-k list at positions 0..k-1.

        Args:
          recommended: ranked ids per user, [users, width]; padding shows nothing.
          prices: item id -> price (GMV is 0 without prices).
          k: slate size.

        Returns:
          expected_ctr@k: expected clicks per shown item; expected_cvr@k: expected
          purchases per expected click; expected_gmv@k: expected revenue per list;
          expected_clicks@k / expected_purchases@k: per list.

        Raises:
          ValueError: k is not a positive integer.
        """
        self._check_fitted()
        k = _check_k(k)
        rec = _as_id_matrix(recommended)[:, :k]
        shown = rec != PAD
        attract, conversion = self._item_rates(rec)
        exam = self.examination(np.arange(rec.shape[1]))[None, :]
        p_click = np.where(shown, exam * attract, 0.0)
        p_buy = p_click * conversion
        if prices is not None:
            price_index = pd.Series(prices, dtype=np.float64)
            price = price_index.reindex(rec.ravel()).fillna(0.0).to_numpy().reshape(rec.shape)
        else:
            price = np.zeros(rec.shape)
        lists = max(rec.shape[0], 1)
        clicks, purchases = p_click.sum(), p_buy.sum()
        return {f"expected_ctr@{k}": float(clicks / max(shown.sum(), 1)),
                f"expected_cvr@{k}": float(purchases / clicks) if clicks > 0 else 0.0,
                f"expected_gmv@{k}": float((p_buy * price).sum() / lists),
                f"expected_clicks@{k}": float(clicks / lists),
                f"expected_purchases@{k}": float(purchases / lists)}


def expected_business_metrics(recommended: Any, events: pd.DataFrame, catalog: pd.DataFrame,
                              until_ts: Optional[int] = None, k: int = 10,
                              prior_strength: float = 20.0) -> Dict[str, float]:
    """Fits a position-based click model on logged impressions, then scores the lists.

    Args:
      recommended: ranked ids per user.
      events / catalog: the tables (impressions, clicks, purchases; prices).
      until_ts: fit on impressions before this time only (no look-ahead).
      k: slate size.
      prior_strength: see PositionBasedClickModel.

    Returns:
      `PositionBasedClickModel.expected_outcomes` of the lists.

    Raises:
      ValueError: no impressions before until_ts, or a bad k.
    """
    model = PositionBasedClickModel(prior_strength).fit(
        logged_impressions(events, catalog, end_ts=until_ts))
    prices = dict(zip(catalog["item_id"].astype(str), catalog["price"].astype(float)))
    return model.expected_outcomes(recommended, prices, k)


def calibration_table(probabilities: Sequence[float], labels: Sequence[float],
                      num_bins: int = 10) -> pd.DataFrame:
    """Predicted vs observed rate in equal-width probability bins (a reliability curve).

    Args:
      probabilities: predicted P(click) in [0, 1].
      labels: observed 0/1 outcomes.
      num_bins: bins over [0, 1]; empty bins are dropped.

    Returns:
      DataFrame(bin_low, bin_high, mean_predicted, observed_rate, count); its
      `attrs["ece"]` is the expected calibration error (count-weighted |gap|).

    Raises:
      ValueError: shapes differ, are empty, or a probability lies outside [0, 1].
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"probabilities and labels must be 1-D of equal non-zero length, got "
                         f"{p.shape} and {y.shape}")
    if np.any((p < 0) | (p > 1)) or np.isnan(p).any():
        raise ValueError("probabilities must lie in [0, 1]")
    num_bins = _check_k(num_bins, "num_bins")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.minimum(np.searchsorted(edges, p, side="right") - 1, num_bins - 1)
    count = np.bincount(bins, minlength=num_bins)
    keep = count > 0
    mean_p = np.bincount(bins, p, num_bins)[keep] / count[keep]
    rate = np.bincount(bins, y, num_bins)[keep] / count[keep]
    table = pd.DataFrame({"bin_low": edges[:-1][keep], "bin_high": edges[1:][keep],
                          "mean_predicted": mean_p, "observed_rate": rate,
                          "count": count[keep]})
    table.attrs["ece"] = float(np.sum(count[keep] * np.abs(mean_p - rate)) / p.size)
    return table
