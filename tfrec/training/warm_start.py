"""Warm start: a new run begins from a previous run's weights, on newer data.

A shop retrains as users, items and words arrive. Starting from yesterday's weights keeps
what was learned; only the rows of new ids start from scratch. Vocabularies therefore
grow by appending (an old id keeps its row) and weights are copied row-prefix-wise.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Sequence

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.features.layers import IdEmbedding
from tfrec.features.vocab import Vocabularies

log = logging.getLogger(__name__)

__all__ = ["append_new", "grow_vocabularies", "transfer_weights"]

_ID_LISTS = ("users", "items", "categories", "departments", "brands", "devices", "text_tokens")


def append_new(old: Sequence[str], new: Sequence[str]) -> List[str]:
    """`old` then the values of `new` it lacks, in `new`'s order."""
    seen = set(old)
    return list(old) + [v for v in new if v not in seen]


def grow_vocabularies(old: Vocabularies, new: Vocabularies) -> Vocabularies:
    """The vocabularies of a warm-started run: `old` ids keep their index, new ones follow.

    Lookup tables map an id to its position, so appending keeps every trained embedding
    row valid. Numeric scalings (price buckets and z-scores) stay those of `old`: the
    trained weights expect them. Catalog attribute tables come from `new` (today's
    catalog; they are lookups, not weights).

    Args:
      old: vocabularies of the run warm-started from.
      new: vocabularies learned from the new data.
    """
    grown = {name: append_new(getattr(old, name), getattr(new, name)) for name in _ID_LISTS}
    attributes = {name: append_new(old.attributes.get(name, []), values)
                  for name, values in new.attributes.items()}
    numeric = {name: old.numeric_stats.get(name, stats)
               for name, stats in new.numeric_stats.items()}
    return dataclasses.replace(new, **grown, attributes=attributes, numeric_stats=numeric,
                               price_boundaries=list(old.price_boundaries),
                               log_price_mean=old.log_price_mean,
                               log_price_std=old.log_price_std)


def transfer_weights(source: tf.keras.Model, target: tf.keras.Model) -> Dict[str, int]:
    """Copies `source`'s trainable weights into `target` (built from the same config).

    Same-shape weights are copied; a weight whose first dimension grew (an embedding
    table of a grown vocabulary) gets the source rows in its first rows; its new rows
    start as the source's OOV row for id tables (`IdEmbedding`), else keep their fresh
    initialisation. Non-trainable weights (catalog tables, statistics) are
    rebuilt from the new data, never copied.

    Returns:
      {"copied": n, "grown": n, "new_rows": rows added over all grown tables}.

    Raises:
      ValueError: the models differ in structure (another config): the message names the
        first mismatching weight.
    """
    # New ids start as the OOV bucket (what the model did for them until now), not noise.
    oov_rows = {id(layer.embedding.embeddings): layer.oov_row for layer in target.submodules
                if isinstance(layer, IdEmbedding) and layer.oov_row is not None
                and layer.embedding.built}
    src, dst = source.trainable_weights, target.trainable_weights
    if len(src) != len(dst):
        raise ValueError(f"cannot warm-start: the previous run has {len(src)} trainable "
                         f"weights, this one {len(dst)}; the model config differs (keep "
                         "model and features as in the previous run, or train from scratch)")
    copied = grown = new_rows = 0
    for a, b in zip(src, dst):
        old, new = a.shape.as_list(), b.shape.as_list()
        if old == new:
            b.assign(a)
            copied += 1
        elif len(old) == len(new) and old[1:] == new[1:] and new[0] > old[0]:
            value, trained = b.numpy(), a.numpy()
            value[:old[0]] = trained
            if id(b) in oov_rows:
                value[old[0]:] = trained[oov_rows[id(b)]]
            b.assign(value)
            grown += 1
            new_rows += new[0] - old[0]
        else:
            raise ValueError(f"cannot warm-start: weight {b.name} has shape {new}, the "
                             f"previous run's {old}; the model config differs (keep model and "
                             "features as in the previous run, or train from scratch)")
    log.info("warm start: %d weights copied, %d tables grown by %d rows", copied, grown,
             new_rows)
    return {"copied": copied, "grown": grown, "new_rows": new_rows}
