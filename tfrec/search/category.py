"""Query -> product category: which part of the catalog a query is about.

A shopper typing "cordless drill" wants tools, not the drill bits' packaging or a
drill-shaped toy: the category a query points to is a signal neither BM25 nor cosine
carries. A small classifier over the query tower's vector (BERT, fine-tuned on the
search log by the two-tower) predicts it; its probabilities become ranker features and,
optionally, a filter on retrieval.

Categories come from the catalog's `category` column. A catalog without one (Home
Depot's) can use title-derived departments: spherical k-means clusters of the frozen
title embeddings, whose centroids are kept so any new product is assigned the same way
(opt-in: on Home Depot's validation queries they did not help the ranker).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.models.ivf import assign_lists, train_centroids
from tfrec.training.keep_best import KeepBestEpoch

__all__ = ["CATEGORY_SOURCES", "CatalogCategories", "QueryCategoryHead", "catalog_categories",
           "category_targets", "train_category_head", "category_accuracy", "prior_accuracy"]

CATEGORY_SOURCES = ("auto", "catalog", "clusters", "off")


@dataclasses.dataclass
class CatalogCategories:
    """Category index per catalog row and how it was derived.

    Attributes:
      rows: [N] int32 category index per catalog row, -1 = none (unknown category).
      names: category names; cluster departments are named by their most common title
        words, e.g. "dept03 (faucet, kitchen)".
      source: "catalog" (the table's category column) or "clusters" (title k-means).
      centroids: [C, H] cluster centroids (source "clusters"), else None.
    """

    rows: np.ndarray
    names: List[str]
    source: str
    centroids: Optional[np.ndarray] = None

    def for_products(self, products: pd.DataFrame, vectors: np.ndarray) -> np.ndarray:
        """[N'] category index of another product table's rows (-1 for unknown names).

        Args:
          products: table with a `category` column (source "catalog").
          vectors: [N', H] title vectors of its rows (source "clusters").
        """
        if self.source == "clusters":
            return assign_lists(np.asarray(vectors, np.float32), self.centroids).astype(np.int32)
        index = {name: i for i, name in enumerate(self.names)}
        column = products["category"] if "category" in products else pd.Series(
            [""] * len(products))
        return np.asarray([index.get(str(c), -1) for c in column], np.int32)


def _department_names(rows: np.ndarray, titles: Sequence[str], count: int) -> List[str]:
    """Readable names of cluster departments: their two most typical title words."""
    from tfrec.features.tokenize import tokenize

    tokens = tokenize([str(t) for t in titles])
    overall: Dict[str, int] = {}
    per: List[Dict[str, int]] = [dict() for _ in range(count)]
    for row, words in zip(rows, tokens):
        for w in set(words):
            overall[w] = overall.get(w, 0) + 1
            per[row][w] = per[row].get(w, 0) + 1
    total = max(1, len(titles))
    names = []
    for c in range(count):
        size = max(1, int((rows == c).sum()))
        # Lift over the catalog, among words in at least a fifth of the cluster.
        typical = sorted((w for w, n in per[c].items() if n >= 0.2 * size and not w.isdigit()),
                         key=lambda w: (-per[c][w] / size / (overall[w] / total), w))[:2]
        names.append(f"dept{c:02d}" + (f" ({', '.join(typical)})" if typical else ""))
    return names


def catalog_categories(catalog: pd.DataFrame, vectors: np.ndarray, source: str = "auto",
                       clusters: int = 32, seed: int = 0) -> Optional[CatalogCategories]:
    """The categories of a search catalog's rows, or None when `source` is "off".

    Args:
      catalog: DataFrame(product_id, title[, category]) in catalog row order.
      vectors: [N, H] frozen title vectors (for "clusters").
      source: "catalog" (needs a non-empty category column), "clusters", "off", or
        "auto" (the column when the catalog has one, else none).
      clusters: number of title departments for "clusters".
      seed: k-means seed.

    Raises:
      ValueError: unknown source, "catalog" without categories, or clusters < 2.
    """
    if source not in CATEGORY_SOURCES:
        raise ValueError(f"query_category must be one of {', '.join(CATEGORY_SOURCES)}, "
                         f"got {source!r}")
    if source == "off":
        return None
    column = (catalog["category"].fillna("").astype(str).str.strip()
              if "category" in catalog else pd.Series([""] * len(catalog)))
    has_column = bool((column != "").any())
    if source == "catalog" and not has_column:
        raise ValueError("query_category='catalog' needs a catalog with a non-empty "
                         "'category' column; use 'clusters' (title departments) or 'off'")
    if source == "auto" and not has_column:
        return None
    if source == "catalog" or source == "auto":
        names = sorted(set(column) - {""})
        index = {name: i for i, name in enumerate(names)}
        rows = np.asarray([index.get(c, -1) for c in column], np.int32)
        return CatalogCategories(rows, names, "catalog")
    if clusters < 2:
        raise ValueError(f"category_clusters must be >= 2, got {clusters}")
    count = min(int(clusters), len(catalog))
    centroids = train_centroids(np.asarray(vectors, np.float32), count, iterations=15,
                                seed=seed)
    rows = assign_lists(np.asarray(vectors, np.float32), centroids).astype(np.int32)
    names = _department_names(rows, catalog["title"].tolist(), count)
    return CatalogCategories(rows, names, "clusters", centroids)


def category_targets(judgments: pd.DataFrame, row_of: Dict[str, int],
                     product_category: np.ndarray, num_categories: int,
                     queries: Sequence[str]) -> np.ndarray:
    """[Q, C] category distribution of each query's relevant products (rows sum to 1).

    Each judged product adds its gain (relevance - 1) to its category; a query whose
    products have no gain or no known category gets an all-zero row (no label).
    """
    position = {q: i for i, q in enumerate(queries)}
    out = np.zeros([len(queries), num_categories], np.float32)
    for q, p, rel in zip(judgments["query"], judgments["product_id"], judgments["relevance"]):
        i = position.get(q)
        c = product_category[row_of[p]] if i is not None else -1
        if c >= 0 and rel > 1:
            out[i, c] += float(rel) - 1.0
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


class QueryCategoryHead(tf.keras.layers.Layer):
    """[B, H] query vectors -> [B, C] category logits (one hidden layer).

    Args:
      num_categories: C, >= 2.
      hidden: width of the hidden layer.
      dropout: dropout on the hidden layer in training.
    """

    def __init__(self, num_categories: int, hidden: int = 128, dropout: float = 0.2,
                 **kwargs):
        super().__init__(**kwargs)
        if num_categories < 2:
            raise ValueError(f"a category classifier needs >= 2 categories, got "
                             f"{num_categories}")
        if hidden < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"hidden must be >= 1 and dropout in [0, 1), got {hidden}, "
                             f"{dropout}")
        self.num_categories, self.hidden, self.rate = int(num_categories), int(hidden), dropout
        self.hidden_layer = tf.keras.layers.Dense(self.hidden, activation="relu", name="hidden")
        self.dropout = tf.keras.layers.Dropout(dropout)
        self.logits = tf.keras.layers.Dense(self.num_categories, name="logits")

    def build(self, input_shape):
        self.hidden_layer.build(input_shape)
        self.logits.build(tuple(input_shape[:-1]) + (self.hidden,))
        super().build(input_shape)

    def call(self, vectors: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        x = self.dropout(self.hidden_layer(tf.cast(vectors, tf.float32)), training=training)
        return self.logits(x)

    def get_config(self):
        return {**super().get_config(), "num_categories": self.num_categories,
                "hidden": self.hidden, "dropout": self.rate}


def category_accuracy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Share of labelled queries whose most probable category holds their largest target
    share (NaN without labelled queries)."""
    labelled = targets.sum(axis=1) > 0
    if not labelled.any():
        return float("nan")
    pick = np.argmax(logits[labelled], axis=1)
    best = targets[labelled].max(axis=1)
    return float(np.mean(targets[labelled][np.arange(len(pick)), pick] >= best - 1e-6))


def prior_accuracy(train_targets: np.ndarray, targets: np.ndarray) -> float:
    """`category_accuracy` of always answering the most common training category."""
    logits = np.zeros([len(targets), train_targets.shape[1]], np.float32)
    logits[:, np.argmax(train_targets.sum(axis=0))] = 1.0
    return category_accuracy(logits, targets)


def train_category_head(train_vectors: np.ndarray, train_targets: np.ndarray,
                        val_vectors: np.ndarray, val_targets: np.ndarray,
                        epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                        seed: int = 0) -> Dict[str, object]:
    """Fits a QueryCategoryHead on labelled query vectors; keeps the epoch with the best
    validation accuracy (the last one without validation labels).

    Args:
      train_vectors, val_vectors: [Q, H] query vectors (the query tower's output).
      train_targets, val_targets: [Q, C] `category_targets` (all-zero rows are ignored).

    Returns:
      {"head": trained QueryCategoryHead, "val_accuracy", "prior_accuracy" (always the most
      common training category), "epoch"}.

    Raises:
      ValueError: no labelled training query, or shapes that disagree.
    """
    keep = train_targets.sum(axis=1) > 0
    if not keep.any():
        raise ValueError("no training query has a relevant product with a known category; "
                         "set query_category to 'off' or give the catalog categories")
    if train_vectors.shape[0] != train_targets.shape[0] or (
            val_vectors.shape[0] != val_targets.shape[0]):
        raise ValueError("query vectors and category targets differ in length")
    x, y = train_vectors[keep].astype(np.float32), train_targets[keep]
    tf.random.set_seed(seed)
    head = QueryCategoryHead(y.shape[1])
    model = tf.keras.Sequential([head])
    model.compile(optimizer=tf.keras.optimizers.Adam(lr),
                  loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True))
    model.build((None, x.shape[1]))
    has_val = bool((val_targets.sum(axis=1) > 0).any())
    val_x = tf.constant(val_vectors, tf.float32)

    def val_accuracy() -> float:  # NaN without labels: the last epoch is kept
        return category_accuracy(head(val_x).numpy(), val_targets) if has_val else math.nan

    keep = KeepBestEpoch(score_fn=val_accuracy, log_key="val_accuracy", patience=5,
                         nan_is_better=not has_val)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    model.fit(x[order], y[order], batch_size=batch_size, epochs=epochs, shuffle=True,
              verbose=0, callbacks=[keep])
    return {"head": head, "val_accuracy": keep.tracker.best if has_val else math.nan,
            "prior_accuracy": prior_accuracy(y, val_targets),
            "epoch": (keep.tracker.epoch or 0) + 1}
