"""Multi-task ranker over lists of candidates: DCN-v2 crosses and click/purchase heads.

Retrieval narrows the catalog with separate towers; the ranker sees each (request,
candidate) pair jointly, so explicit feature crosses (user x brand, query x title) and
several objectives (click, purchase) can shape the final order.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.config import RankingConfig
from tfrec.features.attributes import ItemAttributes
from tfrec.features.catalog import CatalogLookup
from tfrec.features.layers import (HourEmbedding, IdEmbedding, PooledSequenceEmbedding,
                                   PriceFeatures, SequenceAttributeEmbedding, TextEncoder)
from tfrec.features.vocab import Vocabularies
from tfrec.models.encoder_rate import minimize
from tfrec.models.lists import masked_zscore
from tfrec.models.losses import get_loss
from tfrec.models.target_attention import TargetAttention

TASKS = ("click", "purchase", "relevance")
# A teacher ranker's combined scores [B, L] of the training lists (distillation input).
TEACHER_SCORE = "teacher_score"
TEXT_MODES = ("bow", "fast", "cross")
NUMERIC_FEATURES = 14  # popularity x3, retrieval score x2, trend z-score, affinity x8
SHARE_FLOOR = 0.02  # log(share + floor) keeps unseen categories finite
# The ranker's inputs (`RankingModel.scoring_inputs`) in the order the crosses read them;
# numeric, the optional extra attributes, text and target_history (ranking.target_attention
# only) follow the first ten.
INPUT_ORDER = ("user", "history_items", "history_categories", "history_brands", "device",
               "hour", "item", "category", "brand", "price", "numeric", "attributes", "text",
               "target_history", "retrieval")
# The inputs that depend on the candidate (and query) only, not on the shopper.
# (target_history depends on both: it is recomputed whenever the history changes.)
CANDIDATE_INPUTS = ("item", "category", "brand", "price", "attributes", "text")
# The candidate pieces target attention matches against each history position's item,
# category and brand embeddings (same sizes, in the same order).
TARGET_MATCH = ("item", "category", "brand")
# How target attention weighs history positions (tfrec.models.target_attention): sigmoid
# (DIN's unnormalised weights, over the real position count) or softmax.
TARGET_NORMALIZATION = "sigmoid"
TARGET_UNITS = (32,)
# Which standardised numeric features (`RankingModel._numeric`) say what.
NUMERIC_GROUPS = {"popularity": (0, 1, 2, 5), "retrieval": (3, 4), "category": (6, 7),
                  "brand": (8, 9), "price": (10, 11, 12, 13)}


def _flat(x: tf.Tensor) -> tf.Tensor:
    return tf.reshape(x, [-1])


class RankingModel(tf.keras.Model):
    """Scores every candidate of a request; returns per-task logits [batch, list_size].

    Inputs (a dict): request features user_id [B], history [B, H], device [B], hour [B],
    query [B] (may be ""); candidates item_id [B, L] ("" pads); optional retrieval_score
    [B, L] (the two-tower score) and, in training only, position [B, L].

    Args:
      vocab: vocabularies learned from the training period.
      config: ranking hyper-parameters.
      catalog: the catalog lookup (candidate features come from it, in the model, with
        the declared extra columns of its feature specification).
      text_match: BERT query-item features (`tfrec.models.text_match.TextMatch`) for the
        "fast"/"cross" text modes; None with the "bow" mode.
      precision: dtype policy of the crosses, deep layers and heads ("float32",
        "mixed_float16" on GPUs, ...); features and logits stay float32.
    """

    def __init__(self, vocab: Vocabularies, config: RankingConfig, catalog: CatalogLookup,
                 text_match: Optional[tf.keras.layers.Layer] = None,
                 precision: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if config.text_mode not in TEXT_MODES:
            raise ValueError(f"ranking.text_mode must be one of {TEXT_MODES}, "
                             f"got {config.text_mode!r}")
        if (config.text_mode == "bow") != (text_match is None):
            raise ValueError(f"text_mode {config.text_mode!r} needs "
                             + ("no text_match" if config.text_mode == "bow"
                                else "a TextMatch layer (see tfrec.models.text_match)"))
        self.config = config
        self.vocab = vocab
        self.catalog = catalog
        self.text_match = text_match
        if not config.distill_weight >= 0 or not config.distill_temperature > 0:
            raise ValueError("ranking.distill_weight must be >= 0 and distill_temperature > 0, "
                             f"got {config.distill_weight} and {config.distill_temperature}")
        if not isinstance(config.target_attention, bool):
            raise ValueError(f"ranking.target_attention must be true or false, "
                             f"got {config.target_attention!r}")
        # A fine-tuned encoder's own optimizer (tfrec.models.encoder_rate); None: one rate.
        self.encoder_optimizer: Optional[tf.keras.optimizers.Optimizer] = None
        self.features = features = catalog.features
        dim = config.id_embedding_dim
        self.user = IdEmbedding(vocab.users, dim, dropout=config.id_dropout, name="user")
        self.recent_items = PooledSequenceEmbedding(
            IdEmbedding(vocab.items, dim, mask_padding=True, name="history_items"),
            name="history")
        self.history_categories = SequenceAttributeEmbedding(
            vocab.catalog_items, vocab.catalog_categories, vocab.categories,
            features["category"].dim, name="history_categories")
        self.history_brands = SequenceAttributeEmbedding(
            vocab.catalog_items, vocab.catalog_brands, vocab.brands, features["brand"].dim,
            name="history_brands")
        self.device = IdEmbedding(vocab.devices, features["device"].dim, name="device")
        self.hour = HourEmbedding(features["hour"].dim, name="hour")
        self.item = IdEmbedding(vocab.items, dim, dropout=config.id_dropout, name="item")
        self.category = IdEmbedding(vocab.categories, features["category"].dim, name="category")
        self.brand = IdEmbedding(vocab.brands, features["brand"].dim, name="brand")
        # Each candidate's own summary of the history (DIN); None when off, so rankers
        # without it keep exactly their weights and checkpoints.
        self.target_attention = (TargetAttention(TARGET_UNITS, TARGET_NORMALIZATION,
                                                 name="target_attention")
                                 if config.target_attention else None)
        self.price = PriceFeatures(vocab.price_boundaries, vocab.log_price_mean,
                                   vocab.log_price_std, features["price"].dim, name="price")
        self.attributes = ItemAttributes(features, vocab, name="attributes")
        if text_match is None:
            self.text = TextEncoder(vocab.text_tokens, config.text_embedding_dim, name="text")
        # Compute dtype of the crosses and deep layers (float16 under mixed precision).
        self.dense_dtype = tf.keras.mixed_precision.Policy(precision).compute_dtype
        self.crosses = [tfrs.layers.dcn.Cross(dtype=precision, name=f"cross_{i}")
                        for i in range(config.cross_layers)]
        self.deep = tf.keras.Sequential(
            [tf.keras.layers.Dense(u, activation="relu", dtype=precision)
             for u in config.deep_units], name="deep")
        self.tasks = tuple(t for t in TASKS if self.task_weight(t) > 0)
        if not self.tasks:
            raise ValueError("every task weight is 0: set ranking.click_weight, "
                             "purchase_weight or relevance_weight > 0")
        # Zero-initialised heads plus the retrieval score on each logit: an untrained ranker
        # reproduces the retrieval order exactly and training only learns corrections,
        # instead of first having to undo random noise on top of it.
        self.heads = {task: tf.keras.layers.Dense(1, kernel_initializer="zeros", dtype=precision,
                                                  name=f"{task}_head") for task in self.tasks}
        # Wide part: a linear score of the standardised numeric features per task. A few
        # thousand lists teach monotone effects (category share, price fit, popularity)
        # reliably to a linear term; the crosses and deep layers learn the rest.
        self.wide = {task: tf.keras.layers.Dense(1, kernel_initializer="zeros", use_bias=False,
                                                 dtype=precision, name=f"{task}_wide")
                     for task in self.tasks}
        # Standardisation of the numeric features, set from training lists by
        # `adapt_numeric` and saved with the weights (serving uses the same scaling).
        self.numeric_mean = self.add_weight(name="numeric_mean", shape=(NUMERIC_FEATURES,),
                                            initializer="zeros", trainable=False)
        self.numeric_std = self.add_weight(name="numeric_std", shape=(NUMERIC_FEATURES,),
                                           initializer="ones", trainable=False)
        self.retrieval_scale = {
            task: self.add_weight(name=f"{task}_retrieval_scale", shape=(), trainable=True,
                                  initializer=tf.keras.initializers.Constant(
                                      config.retrieval_score_scale
                                      if config.use_retrieval_score else 0.0))
            for task in self.tasks}
        # Position bias as a shallow tower added to the click logit in training only:
        # clicks at the top are partly position, and serving has no position yet.
        self.position_bias = tf.keras.layers.Embedding(config.list_size + 1, 1,
                                                       name="position_bias")
        # Per-list losses averaged here: Keras' AUTO reduction is refused under
        # tf.distribute strategies outside compile().
        self.list_loss = (None if config.loss == "pointwise" else get_loss(config.loss))
        if self.list_loss is not None:
            self.list_loss.reduction = tf.keras.losses.Reduction.NONE
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    def use_catalog(self, catalog: pd.DataFrame,
                    statistics: Optional[pd.DataFrame] = None) -> int:
        """Serves another catalog (grown, changed, a different shop's) without retraining.

        Candidates are scored from their content (title, category, brand, price, extra
        columns); ids the ranker never saw share the item embedding's OOV row.

        Args:
          catalog: the new catalog (same columns as the training one).
          statistics: its popularity features (`catalog_statistics`); zeros if None.

        Returns:
          How many item texts the BERT text features had to embed (0 in bow mode).

        Raises:
          ValueError / SchemaError: the catalog is empty, has duplicated ids or lacks a
            column the ranker reads.
        """
        lookup = CatalogLookup(catalog, statistics, self.features, name="catalog")
        lookup(tf.constant([""]))  # builds its tables
        self.catalog = lookup
        if self.text_match is None:
            return 0
        return self.text_match.set_item_texts(catalog["title"].astype(str).tolist())

    def task_weight(self, task: str) -> float:
        return float(getattr(self.config, f"{task}_weight"))

    def _request(self, f: Dict[str, tf.Tensor], training: Optional[bool]
                 ) -> Dict[str, tf.Tensor]:
        """Request features by name, [B, d] each (in the order the crosses see them)."""
        return {
            "user": self.user(f["user_id"], training=training),
            "history_items": self.recent_items(f["history"], training=training),
            "history_categories": self.history_categories(f["history"]),
            "history_brands": self.history_brands(f["history"]),
            "device": self.device(f["device"]), "hour": self.hour(f["hour"]),
        }

    def _affinity(self, history: tf.Tensor, item: Dict[str, tf.Tensor]) -> tf.Tensor:
        """How the candidate fits the user's recent items: [B, L, 8].

        Shares of recent items in the candidate's category and brand (plain and log: taste
        is multiplicative), and the distance of the candidate's category-relative price
        from the user's usual one (plain, squared and in units of the user's own spread):
        price fit is quadratic, which a dot product of tower embeddings expresses poorly.
        """
        past = self.catalog(history)  # [B, H]
        valid = tf.cast(past["row"] >= 0, tf.float32)  # [B, H]
        count = tf.maximum(tf.reduce_sum(valid, axis=1, keepdims=True), 1.0)  # [B, 1]
        features = []
        for name in ("category", "brand"):
            same = tf.equal(item[name][:, :, tf.newaxis], past[name][:, tf.newaxis, :])
            share = tf.reduce_sum(tf.cast(same, tf.float32) * valid[:, tf.newaxis, :],
                                  axis=2) / count
            features += [share, tf.math.log(share + SHARE_FLOOR)]
        mean = tf.reduce_sum(past["relative_price"] * valid, axis=1, keepdims=True) / count
        var = tf.reduce_sum(tf.square(past["relative_price"] - mean) * valid, axis=1,
                            keepdims=True) / count
        has_history = tf.cast(tf.reduce_sum(valid, axis=1, keepdims=True) > 0, tf.float32)
        gap = (item["relative_price"] - mean) * has_history  # [B, L]
        scaled = gap * tf.math.rsqrt(var + 0.01)
        features += [gap, tf.square(gap), scaled, tf.square(scaled)]
        return tf.stack(features, axis=2)

    def _text(self, query: tf.Tensor, item: Dict[str, tf.Tensor], size: tf.Tensor,
              training: Optional[bool]) -> tf.Tensor:
        """Query-candidate text features, one row per candidate: [B*L, T]."""
        if self.text_match is not None:
            features = self.text_match(query, item["row"], training=training)
            return tf.reshape(features, [-1, self.text_match.output_size])
        q = tf.repeat(self.text(query), size, axis=0)
        title = self.text(_flat(item["title"]))
        match = tf.reduce_sum(tf.math.l2_normalize(q, 1) * tf.math.l2_normalize(title, 1),
                              axis=1, keepdims=True)
        has_query = tf.cast(tf.reduce_any(tf.not_equal(q, 0.0), axis=1, keepdims=True),
                            tf.float32)
        return tf.concat([title, q * title, match * has_query, has_query], axis=1)

    def _retrieval(self, f: Dict[str, tf.Tensor]) -> tf.Tensor:
        if self.config.use_retrieval_score and "retrieval_score" in f:
            return tf.cast(f["retrieval_score"], tf.float32)
        return tf.zeros(tf.shape(f["item_id"]), tf.float32)

    def _numeric(self, f: Dict[str, tf.Tensor], item: Dict[str, tf.Tensor]) -> tf.Tensor:
        """Unscaled numeric features of each candidate: [B, L, NUMERIC_FEATURES]."""
        valid = tf.not_equal(f["item_id"], "")
        retrieval = self._retrieval(f)
        return tf.concat([
            tf.stack([item["popularity"], item["recent_popularity"], item["age_days"],
                      retrieval, masked_zscore(retrieval, valid, epsilon=1e-6),
                      masked_zscore(item["recent_popularity"], valid, epsilon=1e-6)], axis=2),
            self._affinity(f["history"], item),
        ], axis=2)

    def adapt_numeric(self, f: Dict[str, np.ndarray], max_lists: int = 2048) -> None:
        """Sets the numeric features' standardisation from (a sample of) training lists.

        Args:
          f: training list arrays (as fed to the model).
          max_lists: lists used, evenly spaced over `f` (recommendation and search lists).
        """
        n = len(f["item_id"])
        if n == 0:
            raise ValueError("adapt_numeric: there are no training lists")
        rows = np.unique(np.linspace(0, n - 1, min(n, max_lists)).astype(np.int64))
        inputs = {k: tf.constant(v[rows]) for k, v in f.items()
                  if k in ("item_id", "history", "retrieval_score")}
        numeric = self._numeric(inputs, self.catalog(inputs["item_id"]))
        values = tf.boolean_mask(numeric, tf.not_equal(inputs["item_id"], ""))
        if int(tf.shape(values)[0]) == 0:
            raise ValueError("adapt_numeric: the training lists have no candidates")
        mean, var = tf.nn.moments(values, axes=[0])
        std = tf.sqrt(var)
        self.numeric_mean.assign(mean)
        # A feature constant in training (e.g. no item ages) is centred, not blown up.
        self.numeric_std.assign(tf.where(std < 1e-3, tf.ones_like(std), std))

    def scoring_inputs(self, f: Dict[str, tf.Tensor], training: Optional[bool] = None,
                       candidates: Optional[Dict[str, tf.Tensor]] = None
                       ) -> Dict[str, tf.Tensor]:
        """What the scoring layers read, by name: every piece one row per candidate.

        Split from `logits` so attributions (`tfrec.models.attribution`) can move each
        piece between a baseline and its value while the rest of the model stays fixed.

        Args:
          f: ranker inputs (as `call` takes them).
          training: Keras training flag.
          candidates: the `CANDIDATE_INPUTS` of an earlier call with the same items and
            query, reused instead of recomputed (requests that differ in history only).

        Returns:
          The `INPUT_ORDER` pieces [B*L, d] (request pieces repeated per candidate),
          "numeric" [B, L, NUMERIC_FEATURES] (standardised, 0 for padding) and
          "retrieval" [B, L] (the two-tower score, 0 without it).
        """
        size = tf.shape(f["item_id"])[1]
        item = self.catalog(f["item_id"])  # [B, L] each
        valid = tf.cast(tf.not_equal(f["item_id"], ""), tf.float32)[:, :, tf.newaxis]
        out = {name: tf.repeat(value, size, axis=0)
               for name, value in self._request(f, training).items()}
        if candidates is None:
            candidates = {
                "item": self.item(_flat(f["item_id"]), training=training),
                "category": self.category(_flat(item["category"])),
                "brand": self.brand(_flat(item["brand"])),
                "price": self.price(_flat(item["price"])),
                "text": self._text(f["query"], item, size, training),
            }
            attributes = self._attributes(item)
            if attributes:
                candidates["attributes"] = attributes[0]
        out.update(candidates)
        if self.target_attention is not None:
            out["target_history"] = self._target_history(f, candidates, training)
        out["numeric"] = (self._numeric(f, item) - self.numeric_mean) / self.numeric_std * valid
        out["retrieval"] = self._retrieval(f)
        return out

    def _target_history(self, f: Dict[str, tf.Tensor], candidates: Dict[str, tf.Tensor],
                        training: Optional[bool]) -> tf.Tensor:
        """Target attention of each candidate over the history positions: [B*L, D].

        A history position is its item id, category and brand embeddings (the tables of
        the pooled history pieces); a candidate, its item, category and brand pieces.
        """
        history = f["history"]
        catalog_rows = self.history_categories.preprocess(history)  # same rows for both
        positions = tf.concat([
            self.recent_items.id_embedding(history, training=training),
            self.history_categories.rows(catalog_rows),
            self.history_brands.rows(catalog_rows)], axis=2)  # [B, H, D]
        batch, size = tf.shape(f["item_id"])[0], tf.shape(f["item_id"])[1]
        target = tf.concat([candidates[name] for name in TARGET_MATCH], axis=1)  # [B*L, D]
        target = tf.reshape(target, [batch, size, target.shape[-1]])
        attended = self.target_attention(positions, target, tf.not_equal(history, ""))
        return tf.reshape(attended, [batch * size, attended.shape[-1]])

    def logits(self, x: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """Per-task logits [B, L] from `scoring_inputs` (no training-only position bias)."""
        numeric, retrieval = x["numeric"], x["retrieval"]
        batch, size = tf.shape(retrieval)[0], tf.shape(retrieval)[1]
        pieces = [x[name] for name in INPUT_ORDER[:10]]
        pieces.append(tf.reshape(numeric, [-1, NUMERIC_FEATURES]))
        pieces += [x["attributes"]] if "attributes" in x else []
        pieces.append(x["text"])
        pieces += [x["target_history"]] if "target_history" in x else []
        x0 = tf.concat(pieces, axis=1)
        # Keras casts only a layer's first input to its compute dtype (float16 when mixed).
        x0 = tf.cast(x0, self.dense_dtype)
        h = x0
        for cross in self.crosses:
            h = cross(x0, h)
        hidden = self.deep(h)
        return {task: tf.reshape(tf.cast(head(hidden), tf.float32), [batch, size])
                + tf.squeeze(tf.cast(self.wide[task](numeric), tf.float32), -1)
                + self.retrieval_scale[task] * retrieval
                for task, head in self.heads.items()}

    def call(self, f: Dict[str, tf.Tensor], training: Optional[bool] = None
             ) -> Dict[str, tf.Tensor]:
        logits = self.logits(self.scoring_inputs(f, training))
        if self._uses_position(f, training) and "click" in logits:
            logits["click"] += self._position_term(f)
        return logits

    def _uses_position(self, f: Dict[str, tf.Tensor], training: Optional[bool]) -> bool:
        return bool(training and self.config.position_debias and "position" in f)

    def _position_term(self, f: Dict[str, tf.Tensor]) -> tf.Tensor:
        """The training-only position tower's share of the click logit [B, L]."""
        position = tf.clip_by_value(tf.cast(f["position"], tf.int32) + 1, 0,
                                    self.config.list_size)
        return tf.squeeze(self.position_bias(position), -1)

    def _attributes(self, item: Dict[str, tf.Tensor]) -> list:
        """Declared extra catalog columns of each candidate: [] or [[B*L, A]]."""
        extra = self.attributes({name: _flat(item[name]) for name in self.attributes.names})
        return [] if extra is None else [tf.cast(extra, tf.float32)]

    def score(self, logits: Dict[str, tf.Tensor]) -> tf.Tensor:
        """One ranking score from the heads, weighted by the task weights."""
        return tf.add_n([self.task_weight(t) * logits[t] for t in self.tasks])

    def distill_loss(self, f: Dict[str, tf.Tensor], logits: Dict[str, tf.Tensor]
                     ) -> tf.Tensor:
        """Mean over lists of KL(teacher || this ranker) of the softmax over each list's
        real candidates of the combined scores at `distill_temperature`, times T squared
        (so the gradients keep their size as T changes).

        Args:
          f: lists with TEACHER_SCORE [B, L] (the teacher's `score`) and item_id.
          logits: this ranker's serving logits (no position tower) for `f`.
        """
        t = float(self.config.distill_temperature)
        valid = tf.not_equal(f["item_id"], "")
        log_student = tf.nn.log_softmax(tf.where(valid, self.score(logits) / t, -1e9))
        log_teacher = tf.nn.log_softmax(
            tf.where(valid, tf.cast(f[TEACHER_SCORE], tf.float32) / t, -1e9))
        kl = tf.where(valid, tf.exp(log_teacher) * (log_teacher - log_student), 0.0)
        return tf.reduce_mean(tf.reduce_sum(kl, axis=1)) * t * t

    def compute_loss_for(self, f: Dict[str, tf.Tensor], training: bool) -> tf.Tensor:
        logits = self(f, training=training)
        total = 0.0
        if TEACHER_SCORE in f and self.config.distill_weight > 0:
            serving = dict(logits)  # what serving scores: without the position tower
            if self._uses_position(f, training) and "click" in logits:
                serving["click"] = logits["click"] - self._position_term(f)
            total += self.config.distill_weight * self.distill_loss(f, serving)
        for task in self.tasks:
            labels = tf.cast(f[task], tf.float32)
            if self.list_loss is None:
                valid = tf.cast(labels >= 0, tf.float32)
                target = tf.clip_by_value(labels, 0.0, 1.0)  # graded labels: scale to [0, 1] first
                bce = tf.nn.sigmoid_cross_entropy_with_logits(target, logits[task])
                loss = tf.math.divide_no_nan(tf.reduce_sum(bce * valid), tf.reduce_sum(valid))
            else:
                loss = tf.reduce_mean(self.list_loss(labels, logits[task]))
            total += self.task_weight(task) * loss
        return total

    @property
    def metrics(self):
        return [self.loss_tracker]

    @property
    def encoder_variables(self) -> List[tf.Variable]:
        """The BERT encoder's variables that fine-tune (empty in bow mode or frozen)."""
        if self.text_match is None:
            return []
        return list(self.text_match.encoder.trainable_weights)

    def train_step(self, f):
        with tf.GradientTape() as tape:
            loss = self.compute_loss_for(f, training=True)
            total = loss + tf.reduce_sum(self.losses) if self.losses else loss
            # A per-replica mean: gradients are summed over replicas, so divide by their
            # number to keep the global-batch mean (same step size on 1 or N devices).
            total = total / tf.distribute.get_strategy().num_replicas_in_sync
        minimize(tape, total, self.trainable_variables, self.optimizer,
                 self.encoder_variables, self.encoder_optimizer)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, f):
        self.loss_tracker.update_state(self.compute_loss_for(f, training=False))
        return {"loss": self.loss_tracker.result()}
