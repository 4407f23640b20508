"""Towers as numpy -> numpy embedding functions, for evaluation, export and serving.

Each tower declares its raw input signature (`input_specs`, from the feature
registry), so one traced graph serves every batch size.
"""

from __future__ import annotations

import weakref
from typing import Dict

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

_EMBED_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tower_fn(tower: tf.keras.Model):
    """Wraps a tower as a numpy -> numpy embedding function (inference mode).

    Traced once per tower with batch-agnostic specs and cached on the tower, so
    per-epoch evaluation does not retrace.

    Args:
      tower: a layer with an `input_specs` dict of TensorSpecs (QueryTower,
        CandidateTower).

    Returns:
      fn(features: dict of numpy arrays) -> [B, D] numpy embeddings.
    """
    if tower in _EMBED_FNS:
        return _EMBED_FNS[tower]
    specs = tower.input_specs

    @tf.function(input_signature=[specs])
    def call(features):
        return tower(features, training=False)

    def fn(features: Dict[str, np.ndarray]) -> np.ndarray:
        return call({k: tf.constant(features[k], dtype=s.dtype) for k, s in specs.items()}).numpy()

    fn.features = tower.features  # which catalog columns it reads (catalog_features)
    _EMBED_FNS[tower] = fn
    return fn
