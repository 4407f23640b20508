"""Candidate id -> catalog features, inside the model.

Ranking requests carry candidate ids only; the ranker needs each candidate's title,
category, brand, price and popularity. Keeping that table in the model gives training
and serving one lookup, and the exported SavedModel needs no feature store.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.features.layers import _as_array

DAY = 86400


def catalog_statistics(catalog: pd.DataFrame, positives: pd.DataFrame, cut_ts: int,
                       recent_days: int = 14) -> pd.DataFrame:
    """Popularity features of each catalog item as known at `cut_ts` (no look-ahead).

    Args:
      catalog: catalog table (optional `created_ts` gives the item age).
      positives: positive interactions (user_id, item_id, ts).
      cut_ts: only interactions strictly before it count.
      recent_days: window of the recent-popularity count (trends, new items).

    Returns:
      DataFrame indexed like `catalog` with popularity, recent_popularity, age_days
      (log1p scaled, float32).
    """
    before = positives[positives["ts"] < cut_ts]
    recent = before[before["ts"] >= cut_ts - recent_days * DAY]
    ids = catalog["item_id"].astype(str)
    count = before.groupby("item_id").size().reindex(ids).fillna(0).to_numpy()
    recent_count = recent.groupby("item_id").size().reindex(ids).fillna(0).to_numpy()
    if "created_ts" in catalog:
        age = np.maximum(cut_ts - catalog["created_ts"].to_numpy(np.int64), 0) / DAY
    else:
        age = np.full(len(catalog), 365.0)
    return pd.DataFrame({"popularity": np.log1p(count), "recent_popularity": np.log1p(recent_count),
                         "age_days": np.log1p(age)}, index=catalog.index).astype(np.float32)


class CatalogLookup(tf.keras.layers.Layer):
    """Looks up catalog rows of item ids; unknown ids and padding ("") get row -1.

    Args:
      catalog: table with the candidate features of `features` (item_id, title,
        category, brand, price and declared extra columns).
      statistics: output of `catalog_statistics` (aligned with `catalog`); zeros if None.
      features: the feature specification; built-in features if None.
    """

    def __init__(self, catalog: pd.DataFrame, statistics: Optional[pd.DataFrame] = None,
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.features = features = features or default_spec()
        missing = [c for c in features.catalog_columns if c not in catalog]
        if missing:
            raise ValueError(f"catalog is missing column(s) {missing}; the ranker needs "
                             f"{list(features.catalog_columns)}")
        catalog = features.check_catalog(catalog)
        if len(catalog) == 0:
            raise ValueError("the ranker needs a non-empty catalog")
        ids = catalog["item_id"].astype(str)
        if ids.duplicated().any():
            raise ValueError(f"catalog has duplicated item ids, e.g. "
                             f"{ids[ids.duplicated()].iloc[0]!r}")
        self.num_items = len(catalog)
        self.item_ids = _as_array(ids)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=self.item_ids, num_oov_indices=1)
        stats = (statistics if statistics is not None else
                 pd.DataFrame(0.0, index=catalog.index,
                              columns=["popularity", "recent_popularity", "age_days"]))
        # One padding row at the end: gather(-1 -> last row) gives empty/zero features.
        def strings(column):
            return np.append(catalog[column].astype(str).to_numpy(object), "")

        def numbers(values):
            return np.append(np.asarray(values, np.float32), np.float32(0.0))

        text = ["title", "category", "brand"] + [f.name for f in features.extras
                                                  if f.dtype == "string"]
        self._strings = {c: strings(c) for c in text}
        # Price relative to the item's category (log ratio to the category median): what
        # a price-sensitive user compares, since "cheap" means different things per aisle.
        log_price = np.log1p(catalog["price"].astype(np.float64).clip(lower=0))
        median = log_price.groupby(catalog["category"].astype(str)).transform("median")
        self._numbers = {"price": numbers(catalog["price"].to_numpy(np.float32)),
                         "relative_price": numbers((log_price - median).to_numpy()),
                         **{c: numbers(stats[c].to_numpy()) for c in stats.columns},
                         **{f.name: numbers(catalog[f.name].to_numpy()) for f in features.extras
                            if f.dtype == "float"}}

    def build(self, input_shape):
        # Strings as non-trainable variables: saved with checkpoints and SavedModels.
        self.text_columns = {
            name: tf.Variable(values.astype(str), trainable=False, dtype=tf.string,
                              name=f"catalog_{name}")
            for name, values in self._strings.items()}
        self.number_columns = {
            name: self.add_weight(name=f"catalog_{name}", shape=values.shape, dtype=tf.float32,
                                  trainable=False,
                                  initializer=tf.keras.initializers.Constant(values))
            for name, values in self._numbers.items()}
        super().build(input_shape)

    def rows(self, item_id: tf.Tensor) -> tf.Tensor:
        """Catalog row of each id, -1 when unknown."""
        return self.lookup(item_id) - 1

    def call(self, item_id: tf.Tensor) -> Dict[str, tf.Tensor]:
        row = self.rows(item_id)
        gather_at = tf.where(row < 0, tf.cast(self.num_items, row.dtype), row)
        out = {"row": row}
        for name, column in {**self.text_columns, **self.number_columns}.items():
            out[name] = tf.gather(column, gather_at)
        return out

    def set_statistics(self, statistics: pd.DataFrame) -> None:
        """Refreshes popularity features (e.g. to the serving or evaluation time)."""
        if len(statistics) != self.num_items:
            raise ValueError(f"statistics have {len(statistics)} rows, the catalog "
                             f"{self.num_items}")
        for name, column in self.number_columns.items():
            if name in statistics.columns:
                column.assign(np.append(statistics[name].to_numpy(np.float32), np.float32(0.0)))
