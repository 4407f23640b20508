"""Two-tower retrieval model trained with an in-batch softmax (TFRS Retrieval task).

In-batch negatives over-penalise popular items, which appear as negatives more often;
the logQ correction subtracts log(sampling probability) from their logits to undo it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Mapping, Optional

import tfrec  # noqa: F401
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.config import ModelConfig
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.features.layers import TextEncoder
from tfrec.features.vocab import Vocabularies
from tfrec.models.index import CatalogTopK
from tfrec.models.sequence import HistoryEncoder
from tfrec.models.towers import CandidateTower, QueryTower

# Key of a batch already preprocessed by `TwoTowerModel.preprocess` (in tf.data).
PREPROCESSED = "candidate_inputs"
# Batch key of uniform catalog samples scored beside the in-batch candidates (training).
NEGATIVES = "catalog_negatives"


def item_key(item_id: tf.Tensor) -> tf.Tensor:
    """String item ids -> int64 keys for accidental-hit removal (collisions over 2^62
    buckets are negligible); the batch and the catalog draws must hash alike."""
    return tf.strings.to_hash_bucket_fast(item_id, 2 ** 62)


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Layers built inside get policy `name`; the global policy is restored after.

    Only the towers run in float16 under mixed precision; layers TFRS creates while
    computing the loss must see float32.
    """
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class TwoTowerModel(tfrs.Model):
    """Query tower and candidate tower scored by a dot product.

    Args:
      vocab: vocabularies learned from the training period.
      config: model hyper-parameters (temperature, logQ, hard negatives, ...).
      precision: dtype policy of the towers ("float32", "mixed_float16", ...). The
        towers' outputs, the scores and the loss stay float32 either way.
      features: the feature specification (built-in features only if None).
    """

    def __init__(self, vocab: Vocabularies, config: ModelConfig, precision: str = "float32",
                 features: Optional[FeatureSpec] = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.features = features or default_spec()
        self.vocab = vocab
        self.precision = precision
        with dtype_policy(precision):
            self.text = TextEncoder(vocab.text_tokens, config.text_embedding_dim,
                                    max_length=config.text_max_length,
                                    ngram_bins=config.char_ngram_bins, name="text")
            self.query_tower = QueryTower(vocab, config, self.text, self.features,
                                          name="query_tower")
            self.candidate_tower = CandidateTower(vocab, config, self.text, self.features,
                                                  name="candidate_tower")
        self.index = None
        metrics = None
        if config.factorized_topk_ks:
            self.index = CatalogTopK(vocab.catalog_items or vocab.items, config.embedding_dim,
                                     k=max(config.factorized_topk_ks), name="catalog_index")
            metrics = tfrs.metrics.FactorizedTopK(candidates=self.index,
                                                  ks=config.factorized_topk_ks)
        self.task = tfrs.tasks.Retrieval(
            metrics=metrics,
            temperature=config.temperature,
            num_hard_negatives=config.num_hard_negatives,
            remove_accidental_hits=config.remove_accidental_hits,
            name="retrieval")
        # The task returns a batch *sum*; logs show the per-example mean over the epoch.
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        # Variables now, through the raw-input path: a preprocessed batch reaches the layers
        # through methods, not `__call__`, which would create them in the wrong scopes.
        self.build_from_features()

    @property
    def metrics(self):
        return [self.loss_tracker] + [m for m in super().metrics if m is not self.loss_tracker]

    def _track(self, loss: tf.Tensor, features: Mapping[str, Any]) -> Dict[str, tf.Tensor]:
        n = tf.cast(tf.shape(tf.nest.flatten(features)[0])[0], tf.float32)
        self.loss_tracker.update_state(loss / tf.maximum(n, 1.0), sample_weight=n)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, features):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(features, training=True)
            total = loss + tf.reduce_sum(self.losses) if self.losses else loss
        # minimize() applies loss scaling when the optimizer is a LossScaleOptimizer.
        self.optimizer.minimize(total, self.trainable_variables, tape=tape)
        return self._track(loss, features)

    def test_step(self, features):
        return self._track(self.compute_loss(features, training=False), features)

    def call(self, features: Dict[str, tf.Tensor], training: Optional[bool] = None):
        return (self.query_tower(features, training=training),
                self.candidate_tower(features, training=training))

    def preprocess(self, features: Mapping[str, tf.Tensor]) -> Dict[str, Any]:
        """A raw batch -> what the training step consumes: integer ids, token ids, trigram
        buckets, scaled numbers. Map it over the tf.data pipeline so string work runs once
        per example in parallel with the step; serving runs the same layers in `call`.

        Ids for accidental-hit removal are int64 hashes of the item id (a B x B string
        comparison cost a sixth of the step; collisions over 2^62 buckets are negligible);
        factorized metrics match the index's string ids, so those pass through as strings.
        """
        out: Dict[str, Any] = {"query_inputs": self.query_tower.preprocess(features),
                               "candidate_inputs": self.candidate_tower.preprocess(features)}
        for name in ("weight", "candidate_prob"):
            if name in features:
                out[name] = features[name]
        if self.index is not None:
            out["item_id"] = features["item_id"]
        elif self.config.remove_accidental_hits:
            out["item_key"] = item_key(features["item_id"])
        return out

    def preprocess_negatives(self, negatives: Mapping[str, Any]) -> Dict[str, Any]:
        """Raw catalog draws ({"raw": candidate features, "draw_prob", "candidate_prob"})
        -> what `compute_loss` scores beside the batch: preprocessed candidate inputs and
        the ids of accidental-hit removal (see `tfrec.training.negatives`)."""
        raw = negatives["raw"]
        out = {k: v for k, v in negatives.items() if k != "raw"}
        out.update({PREPROCESSED: self.candidate_tower.preprocess(raw),
                    "item_key": item_key(raw["item_id"]),
                    "item_id": raw["item_id"]})
        return out

    def compute_loss(self, features: Mapping[str, Any], training: bool = False) -> tf.Tensor:
        negatives = features.get(NEGATIVES) if training else None
        if PREPROCESSED not in features:  # raw batch: preprocess inside the step
            features = self.preprocess(features)
        if negatives is not None and PREPROCESSED not in negatives:
            negatives = self.preprocess_negatives(negatives)
        query = self.query_tower.encode(features["query_inputs"], training=training)
        candidate = self.candidate_tower.encode(features[PREPROCESSED], training=training)
        sampling = features.get("candidate_prob") if self.config.logq_correction else None
        ids = features.get("item_id") if self.index is not None else features.get("item_key")
        if negatives is not None:
            candidate, sampling, ids = self._with_negatives(
                query, candidate, sampling, ids, negatives)
        loss = self.task(
            query, candidate,
            sample_weight=features.get("weight"),
            candidate_sampling_probability=sampling,
            candidate_ids=ids,
            # Top-k metrics over the catalog are costly; only evaluation pays for them.
            compute_metrics=not training)
        history = getattr(self.query_tower, "history", None)
        if training and self.config.history_next_item_weight > 0 and \
                isinstance(history, HistoryEncoder):
            # The task returns a batch sum: scale the mean auxiliary loss to match.
            n = tf.cast(tf.shape(query)[0], tf.float32)
            loss += self.config.history_next_item_weight * n * history.next_item_loss(
                features["query_inputs"]["history"], training=training)
        return loss

    def _with_negatives(self, query: tf.Tensor, candidate: tf.Tensor,
                        sampling: Optional[tf.Tensor], ids: Optional[tf.Tensor],
                        negatives: Mapping[str, Any]):
        """Appends uniform catalog samples to the in-batch candidates (mixed negatives).

        The logQ correction subtracts log(the column item's probability under the mixture):
        (rows x its share + draws / catalog size) / (rows + draws), for positives and draws
        alike, counted per replica (which sees a share of both). A probability, not a
        count: TFRS clips it to [1e-6, 1].

        Raises:
          ValueError: logQ correction on, and the draws carry no "candidate_prob".
        """
        sampled = self.candidate_tower.encode(negatives[PREPROCESSED], training=True)
        candidate = tf.concat([candidate, tf.cast(sampled, candidate.dtype)], 0)
        if sampling is not None:
            if "candidate_prob" not in negatives:
                raise ValueError("logQ correction with catalog negatives needs each draw's "
                                 "share (negatives_dataset(..., shares=...))")
            rows = tf.cast(tf.shape(query)[0], tf.float32)
            uniform = tf.reduce_sum(tf.cast(negatives["draw_prob"], tf.float32))
            shares = tf.concat([tf.cast(sampling, tf.float32),
                                tf.cast(negatives["candidate_prob"], tf.float32)], 0)
            draws = tf.cast(tf.shape(sampled)[0], tf.float32)
            sampling = (rows * shares + uniform) / (rows + draws)
        if ids is not None:
            key = "item_id" if self.index is not None else "item_key"
            ids = tf.concat([ids, negatives[key]], 0)
        return candidate, sampling, ids

    def build_from_features(self) -> None:
        """Creates all variables with one dummy batch (needed before restoring weights)."""
        self(self.features.dummy_batch(), training=False)
        if self.index is not None:
            self.index.create_variables()
