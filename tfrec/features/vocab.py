"""Vocabularies and statistics learned from training data.

They are computed once (Keras `adapt` for text), stored as JSON beside the checkpoint,
and passed to the preprocessing layers at construction, so a model rebuilt in another
process (export, evaluation) has exactly the lookups it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import tfrec  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.schema import DEVICES
from tfrec.features.tokenize import token_vocabulary

VOCAB_FILE = "vocab.json"


@dataclass
class Vocabularies:
    """Everything the preprocessing layers need, learned from the training period.

    Args:
      users: user ids seen in training (others map to the OOV bucket).
      items: item ids seen in training; cold-start items fall back to content features.
      categories: full category paths ("department>leaf").
      departments: first level of the category path.
      brands: brand names.
      devices: device names.
      text_tokens: word vocabulary adapted on titles, descriptions and queries.
      price_boundaries: bucket edges of price (quantiles of the catalog).
      log_price_mean / log_price_std: normalisation of log1p(price).
      catalog_items / catalog_categories / catalog_brands: attributes of every catalog
        item (aligned), so history items contribute their category and brand.
      attributes: vocabulary of each declared extra categorical catalog column.
      numeric_stats: [mean, std] of each declared extra numeric catalog column.
    """

    users: List[str] = field(default_factory=list)
    items: List[str] = field(default_factory=list)
    categories: List[str] = field(default_factory=list)
    departments: List[str] = field(default_factory=list)
    brands: List[str] = field(default_factory=list)
    devices: List[str] = field(default_factory=lambda: list(DEVICES))
    text_tokens: List[str] = field(default_factory=list)
    price_boundaries: List[float] = field(default_factory=list)
    log_price_mean: float = 0.0
    log_price_std: float = 1.0
    catalog_items: List[str] = field(default_factory=list)
    catalog_categories: List[str] = field(default_factory=list)
    catalog_brands: List[str] = field(default_factory=list)
    attributes: Dict[str, List[str]] = field(default_factory=dict)
    numeric_stats: Dict[str, List[float]] = field(default_factory=dict)

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCAB_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str) -> "Vocabularies":
        path = os.path.join(directory, VOCAB_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no {VOCAB_FILE} in {directory!r}: is this a tfrec training run directory?")
        with open(path) as f:
            raw = json.load(f)
        return cls(**raw)

    def sizes(self) -> Dict[str, int]:
        return {k: len(v) for k, v in dataclasses.asdict(self).items() if isinstance(v, list)}


def department_of(categories: Sequence[str]) -> List[str]:
    return [c.split(">", 1)[0] for c in categories]


def build_vocabularies(train_examples: pd.DataFrame, catalog: pd.DataFrame,
                       text_max_tokens: int, price_buckets: int,
                       features: Optional[FeatureSpec] = None,
                       users: Optional[List[str]] = None,
                       items: Optional[List[str]] = None) -> Vocabularies:
    """Learns vocabularies from training examples and the catalog.

    Ids come from the training period only, so validation/test users and items that
    appear later exercise the OOV path exactly as they would in production.

    Args:
      train_examples: retrieval examples of the training period.
      catalog: the catalog table (content vocabularies: brands, categories, text).
      text_max_tokens: size cap of the word vocabulary.
      price_buckets: number of price quantile buckets.
      features: the feature specification (extra catalog columns); built-ins if None.
      users, items: id vocabularies written by data preparation (`read_vocab`: most
        frequent first, min-count applied); counted from `train_examples` if None.
    """
    if len(train_examples) == 0:
        raise ValueError("no training examples: the training period has no positive events")
    users = list(users) if users is not None else _by_frequency(train_examples["user_id"])
    items = list(items) if items is not None else _by_frequency(train_examples["item_id"])
    categories = sorted(set(catalog["category"].astype(str)))
    departments = sorted(set(department_of(categories)))
    brands = sorted(set(catalog["brand"].astype(str)))

    # Text vocabulary: the tokens the model's TextEncoder splits (any script).
    texts = [str(t) for t in np.concatenate([
        catalog["title"].astype(str).to_numpy(),
        catalog["description"].astype(str).to_numpy() if "description" in catalog else [],
        train_examples["query"].astype(str).to_numpy(),
    ])]
    # TextVectorization counted padding and unknown in max_tokens; so does this cap.
    tokens = token_vocabulary(texts, max_tokens=max(text_max_tokens - 2, 0))

    prices = catalog["price"].astype(np.float64).to_numpy()
    qs = np.linspace(0, 1, price_buckets + 1)[1:-1]
    boundaries = sorted(set(np.round(np.quantile(prices, qs), 4).tolist()))
    log_prices = np.log1p(prices)
    attributes, numeric_stats = extra_vocabularies(catalog, features or default_spec())
    return Vocabularies(
        users=users, items=items, categories=categories, departments=departments,
        brands=brands, text_tokens=tokens, price_boundaries=boundaries,
        log_price_mean=float(log_prices.mean()),
        log_price_std=float(log_prices.std() or 1.0),
        catalog_items=catalog["item_id"].astype(str).tolist(),
        catalog_categories=catalog["category"].astype(str).tolist(),
        catalog_brands=catalog["brand"].astype(str).tolist(),
        attributes=attributes, numeric_stats=numeric_stats)


def extra_vocabularies(catalog: pd.DataFrame, features: FeatureSpec
                       ) -> Tuple[Dict[str, List[str]], Dict[str, List[float]]]:
    """Vocabularies of extra categorical columns and [mean, std] of extra numeric ones.

    Learned on the whole catalog (content, not behaviour), like brands and categories.
    """
    catalog = features.check_catalog(catalog)
    attributes, stats = {}, {}
    for f in features.extras:
        if f.kind == "categorical":
            attributes[f.name] = sorted(set(catalog[f.name].astype(str)) - {""})
        else:
            values = catalog[f.name].to_numpy(np.float64)
            stats[f.name] = [float(values.mean()), float(values.std() or 1.0)]
    return attributes, stats


def _by_frequency(values: pd.Series) -> List[str]:
    """Distinct values, most frequent first, ties by value (as prepared vocabularies)."""
    counts = values.astype(str).value_counts()
    counts = counts[counts.index != ""]
    order = np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))
    return counts.index[order].tolist()
