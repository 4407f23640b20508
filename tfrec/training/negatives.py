"""Uniform catalog negatives beside each training batch (mixed negative sampling).

In-batch negatives are the batch's positives, so the long tail the model ranks against
at serving is rarely a negative in training; a few items drawn from the whole catalog per
step cover it, at a cost that grows with the draws, not with the catalog.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config
from tfrec.data.examples import candidate_probabilities
from tfrec.data.feature_spec import FeatureSpec, catalog_features
from tfrec.models.retrieval import NEGATIVES, PREPROCESSED, TwoTowerModel


def check_negatives(cfg: Config) -> int:
    """Validates `model.catalog_negatives`, returns it.

    Raises:
      ValueError: a value below 0 or not an integer.
    """
    value = cfg.model.catalog_negatives
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"model.catalog_negatives must be an integer >= 0, got {value!r}")
    return value


def draw_shares(positives: pd.DataFrame, catalog: pd.DataFrame, t_val: int) -> pd.Series:
    """Each catalog item's share of the training positives, as the records' candidate_prob.

    The logQ correction gives an item one probability whether it comes in the batch or
    among the draws, so the draws need the very shares the records carry: all positives
    before validation (`data.train_days` drops old examples, not their counts).

    Args:
      positives: `positive_interactions` of the whole event log.
      catalog: the catalog the draws come from.
      t_val: start of the validation period.
    """
    return candidate_probabilities(positives, catalog, before_ts=t_val)


def raw_negatives_dataset(catalog: pd.DataFrame, num: int, seed: int,
                          shares: Optional[pd.Series] = None,
                          features: Optional[FeatureSpec] = None) -> tf.data.Dataset:
    """Endless batches of `num` catalog items drawn uniformly (with replacement), seeded,
    as raw candidate features: what a worker without the model's layers can produce.

    The catalog is public: negatives drawn from it carry no training data.

    Args:
      catalog: the items to draw from (every item equally likely).
      num: items per batch.
      seed: seed of the draws.
      shares: each item's share of the training positives (its in-batch rate), indexed
        by item_id, as the records' candidate_prob; needed by the logQ correction.
      features: the feature specification of the candidate columns (built-ins if None).

    Returns:
      A dataset of {"raw": candidate features, "draw_prob": [num] float32 = 1 / size, and
      with `shares` "candidate_prob": [num] float32}; `TwoTowerModel.preprocess_negatives`
      turns an element into what the training step scores.

    Raises:
      ValueError: `num` < 1, an empty catalog, or `shares` missing catalog items.
    """
    if int(num) < 1:
        raise ValueError(f"catalog negatives per batch must be >= 1, got {num}")
    if len(catalog) == 0:
        raise ValueError("cannot draw negatives from an empty catalog")
    columns = {k: tf.constant(v) for k, v in catalog_features(catalog, features).items()}
    share = None
    if shares is not None:
        values = shares.reindex(catalog["item_id"].to_numpy())
        if values.isna().any():
            missing = values.index[values.isna()][:3].tolist()
            raise ValueError(f"shares has no value for catalog items such as {missing}")
        share = tf.constant(values.to_numpy(np.float32))
    size = len(catalog)
    draw_prob = tf.fill([int(num)], tf.constant(1.0 / size, tf.float32))

    def pick(draws: tf.Tensor) -> Dict[str, Any]:
        rows = tf.math.floormod(draws, size)
        out = {"raw": {k: tf.gather(v, rows) for k, v in columns.items()},
               "draw_prob": draw_prob}
        if share is not None:
            out["candidate_prob"] = tf.gather(share, rows)
        return out

    return tf.data.Dataset.random(seed=seed).batch(int(num)).map(pick)


def negatives_dataset(catalog: pd.DataFrame, model: TwoTowerModel, num: int, seed: int,
                      shares: Optional[pd.Series] = None) -> tf.data.Dataset:
    """`raw_negatives_dataset` preprocessed by the model in tf.data (parallel to the step).

    Returns:
      A dataset of {"candidate_inputs", "item_key", "item_id", "draw_prob" and with
      `shares` "candidate_prob"} (see `TwoTowerModel.preprocess_negatives`).
    """
    return (raw_negatives_dataset(catalog, num, seed, shares, model.features)
            .map(model.preprocess_negatives, num_parallel_calls=tf.data.AUTOTUNE))


def with_negatives(train: tf.data.Dataset, negatives: tf.data.Dataset,
                   batches: Optional[int] = None) -> tf.data.Dataset:
    """Training batches with a batch of sampled negatives each (under `NEGATIVES`).

    Args:
      train / negatives: the training batches and `negatives_dataset`.
      batches: batches per pass over `train` when known. Keras then knows the epoch
        length: with an unknown one it runs one more step that finds no data, which
        counts in `optimizer.iterations` (the steps accounted) without an update.

    Returns:
      The training batches, each with the key `NEGATIVES` added.
    """
    out = tf.data.Dataset.zip((train, negatives)).map(lambda batch, neg: {**batch,
                                                                          NEGATIVES: neg})
    if batches is not None:
        out = out.apply(tf.data.experimental.assert_cardinality(batches))
    return out.prefetch(tf.data.AUTOTUNE)
