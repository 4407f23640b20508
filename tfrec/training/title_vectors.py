"""Stored BERT title vectors of the candidate tower (`model.title_encoder`).

The tower stores one frozen vector per item; they are computed here, from a catalog,
when a run starts and again at export for the catalog being served, so new items get
theirs without retraining (each title is embedded once: an on-disk cache per title).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from tfrec.config import ModelConfig
from tfrec.text.embedding import cached_sentence_vectors


def title_vectors(config: ModelConfig, item_ids: Sequence[str], catalog: pd.DataFrame
                  ) -> np.ndarray:
    """[N, H] frozen title embeddings of `item_ids` ("" for items not in `catalog`).

    Raises:
      ValueError: model.title_encoder is not set.
    """
    if not config.title_encoder:
        raise ValueError("model.title_encoder is empty: set it to a TF-Hub BERT encoder "
                         "(e.g. work/text/minilm/encoder after `tfrec text import-minilm`)")
    titles = (catalog.drop_duplicates("item_id").set_index("item_id")["title"]
              .reindex([str(i) for i in item_ids]).fillna("").astype(str).tolist())
    return cached_sentence_vectors(titles, config.title_encoder, config.title_preprocessor,
                                   config.title_vector_length,
                                   cache_dir=config.title_vector_cache or None, what="titles",
                                   precision=config.title_vector_precision)


def use_catalog_title_vectors(model, catalog: pd.DataFrame) -> bool:
    """Gives a two-tower model's candidate tower the title vectors of `catalog`'s items.

    Returns:
      False (nothing done) when the model stores no title vectors.
    """
    layer = getattr(model.candidate_tower, "title_vectors", None)
    if layer is None:
        return False
    ids = catalog["item_id"].astype(str).drop_duplicates().tolist()
    layer.set_vectors(ids, title_vectors(model.config, ids, catalog))
    return True
