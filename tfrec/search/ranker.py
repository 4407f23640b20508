"""Re-ranker of retrieved search candidates: BERT vectors + lexical and retrieval signals.

Fast mode: the query is encoded once by the (fine-tuned) BERT query tower, product
vectors are stored, so a request costs one BERT pass however many candidates it has.
Their element-wise product, BM25, query-term coverage and both retrievers' scores and
ranks meet in a DCN-v2 cross layer; lexical and semantic evidence are combined per
candidate instead of by one global fusion weight.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.models.lists import masked_zscore

__all__ = ["FEATURES", "LEGACY_FEATURES", "SearchRanker", "candidate_features"]

# Columns of candidate_features, in order; new ones are appended, so a ranker trained on
# the first k columns reads them unchanged.
FEATURES = ("dense", "dense_z", "bm25_rel", "bm25_z", "coverage", "hybrid", "dense_rank",
            "bm25_rank", "bm25_hit", "category_prob", "category_share", "title_coverage",
            "query_terms", "title_terms")
LEGACY_FEATURES = 11  # the columns of search runs saved before title_coverage
_NEG = -1e9


def candidate_features(dense: tf.Tensor, bm25: tf.Tensor, coverage: tf.Tensor,
                       hybrid: tf.Tensor, dense_rank: tf.Tensor, bm25_rank: tf.Tensor,
                       valid: tf.Tensor, category_prob: Optional[tf.Tensor] = None,
                       title_coverage: Optional[tf.Tensor] = None,
                       query_terms: Optional[tf.Tensor] = None,
                       title_terms: Optional[tf.Tensor] = None) -> tf.Tensor:
    """[B, C, len(FEATURES)] float32 ranker inputs from per-candidate signals [B, C].

    Scores are made comparable across queries (z-scores and max-normalised BM25 within
    the list); ranks (0-based, in each retriever's own top list) become 1 / (1 + r / 10).

    Args:
      dense: two-tower cosine.
      bm25: BM25 score.
      coverage: share of the query's words in the title.
      hybrid: catalog-wide fused retrieval score.
      dense_rank: rank in the two-tower list (its list length if absent).
      bm25_rank: rank in the BM25 list (its list length if absent).
      valid: candidate slots that hold a product.
      category_prob: the query-category classifier's probability of the candidate's
        category (None: no classifier, both category columns 0).
      title_coverage: share of the title's distinct words in the query: "toilet" covers
        all of "Toilet" but a third of "toilet seat cover" (None: 0).
      query_terms: [B] distinct words of each query (None: 0); lets the ranker weigh
        lexical and dense evidence by how specific the query is.
      title_terms: [B, C] distinct words of each title (None: 0).
    """
    w = tf.cast(valid, tf.float32)
    zeros = tf.zeros_like(w)
    if category_prob is None:
        category_prob = zeros
    title_coverage = zeros if title_coverage is None else title_coverage
    query_terms = zeros if query_terms is None else tf.broadcast_to(
        tf.cast(query_terms, tf.float32)[:, tf.newaxis], tf.shape(w))
    title_terms = zeros if title_terms is None else title_terms
    category_prob = tf.cast(category_prob, tf.float32) * w
    # Share of the list's most likely category: "is this the category the query is about".
    share = tf.math.divide_no_nan(category_prob,
                                  tf.reduce_max(category_prob, axis=-1, keepdims=True))
    top_bm25 = tf.reduce_max(bm25 * w, axis=-1, keepdims=True)
    columns = [dense, masked_zscore(dense, valid), tf.math.divide_no_nan(bm25, top_bm25),
               masked_zscore(bm25, valid), coverage, hybrid,
               1.0 / (1.0 + tf.cast(dense_rank, tf.float32) / 10.0),
               1.0 / (1.0 + tf.cast(bm25_rank, tf.float32) / 10.0),
               tf.cast(bm25 > 0, tf.float32), category_prob, share, title_coverage,
               # Counts on a log scale near the other columns' range (1 word: 0.23).
               tf.math.log1p(query_terms) / 3.0,
               tf.math.log1p(tf.cast(title_terms, tf.float32)) / 3.0]
    return tf.stack([tf.cast(c, tf.float32) for c in columns], axis=-1) * w[..., tf.newaxis]


class SearchRanker(tf.keras.Model):
    """Scores [B, C] candidates from query/product vectors and `candidate_features`.

    Inputs (dict): query_vectors [B, H], product_vectors [B, C, H], features [B, C, F],
    valid [B, C] bool. Invalid slots get -1e9 so softmax losses and top-k ignore them.

    Args:
      interaction_dim: width of the learned projection of query * product.
      hidden: widths of the deep layers after the cross layer.
      dropout: dropout after the first deep layer.
    """

    def __init__(self, interaction_dim: int = 16, hidden: Sequence[int] = (64, 32),
                 dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if interaction_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"interaction_dim and hidden widths must be >= 1, got "
                             f"{interaction_dim}, {tuple(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.interaction = tf.keras.layers.Dense(interaction_dim, name="interaction")
        self.cross = tfrs.layers.dcn.Cross(name="cross")
        self.deep = [tf.keras.layers.Dense(h, activation="relu", name=f"deep_{i}")
                     for i, h in enumerate(hidden)]
        self.dropout = tf.keras.layers.Dropout(dropout)
        self.score = tf.keras.layers.Dense(1, name="score")

    def call(self, inputs: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        q = tf.cast(inputs["query_vectors"], tf.float32)[:, tf.newaxis, :]
        p = tf.cast(inputs["product_vectors"], tf.float32)
        x = tf.concat([tf.cast(inputs["features"], tf.float32), self.interaction(q * p)], -1)
        x = self.cross(x, x)
        for i, layer in enumerate(self.deep):
            x = layer(x)
            if i == 0:
                x = self.dropout(x, training=training)
        logits = tf.squeeze(self.score(x), axis=-1)
        return tf.where(tf.cast(inputs["valid"], tf.bool), logits, _NEG)
