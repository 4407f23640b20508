"""Query -> product two-tower for catalog search, on a TF-Hub-format BERT.

The query tower fine-tunes BERT (queries are short, so this is cheap); the product tower
keeps the pretrained title embeddings frozen and learns a residual on top from title
words and the product id, so a product never seen in training still gets a vector from
its title. Every learned residual starts at zero: the untrained model is zero-shot
BERT cosine search, and training can only move it from there.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (ops of the preprocessor SavedModel)

from tfrec.features.analyzers import check_analyzer
from tfrec.features.tokenize import text_tokens, token_vocabulary, tokenize
from tfrec.models.encoder_rate import minimize
from tfrec.search.config import SearchConfig
from tfrec.search.word_bag import WordBagEncoder
from tfrec.models.text_match import _EncoderLayer, _load_preprocessor, encoder_trainable_names
from tfrec.text.embedding import mean_pool, trim_padding
from tfrec.text.hub_export import load_keras_encoder
from tfrec.text.lora import add_lora, lora_layers, merge_lora

__all__ = ["QueryEncoder", "SearchTwoTower", "word_vocabulary",
           "catalog_word_ids", "query_encoder_of"]

# Words kept per title by the product tower's bag of words (titles are ~15 words).
MAX_TITLE_WORDS = 32


def word_vocabulary(texts: Sequence[str], min_count: int = 2,
                    analyzer: str = "plain") -> List[str]:
    """Words (terms of `analyzer`) seen at least `min_count` times, most frequent first
    (ties alphabetical)."""
    return token_vocabulary([str(t) for t in texts], min_count=min_count, analyzer=analyzer)


def catalog_word_ids(titles: Sequence[str], vocabulary: Sequence[str],
                     max_words: int = MAX_TITLE_WORDS, analyzer: str = "plain") -> np.ndarray:
    """[N, max_words] int32 word ids per title: 1 + vocabulary index, 0 = pad/unknown.

    `analyzer` must be the one the vocabulary and the query tower use.
    """
    index = {w: i + 1 for i, w in enumerate(vocabulary)}
    out = np.zeros([len(titles), max_words], np.int32)
    for row, words in enumerate(tokenize([str(t) for t in titles], analyzer)):
        ids = [index[w] for w in words if w in index][:max_words]
        out[row, :len(ids)] = ids
    return out


class QueryEncoder(tf.keras.layers.Layer):
    """[B] query strings -> [B, H] mean-pooled BERT token vectors (not normalised).

    Args:
      encoder: TF-Hub handle of a BERT encoder (local path or URL).
      preprocessor: handle of its preprocessor (`tokenize`, `bert_pack_inputs`).
      seq_length: packed query length (queries are short; longer ones are truncated).
      trainable: fine-tune the encoder.
      top_layers: with `trainable`, only the last N transformer blocks (0 = all); with
        LoRA, the blocks that get adapters.
      lora_rank: > 0 trains low-rank adapters (`tfrec.text.lora`) instead of the
        encoder's weights; needs a tfrec-format encoder export (e.g. the converted MiniLM).
      lora_alpha / lora_targets: adapter scale numerator and adapted projections.

    Raises:
      ValueError: bad seq_length, or LoRA without `trainable`.
    """

    def __init__(self, encoder: str, preprocessor: str, seq_length: int = 16,
                 trainable: bool = True, top_layers: int = 0, lora_rank: int = 0,
                 lora_alpha: float = 16.0, lora_targets: Sequence[str] = ("query", "value"),
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(seq_length, int) or seq_length < 3:
            raise ValueError(f"seq_length must be an integer >= 3, got {seq_length!r}")
        if lora_rank and not trainable:
            raise ValueError("lora_rank > 0 trains adapters inside the encoder: it needs "
                             "fine_tune=True (or set lora_rank=0)")
        self.encoder_handle, self.preprocessor_handle = encoder, preprocessor
        self.seq_length, self.fine_tune, self.top_layers = seq_length, bool(trainable), top_layers
        self._preprocessor = _load_preprocessor(preprocessor)
        if lora_rank:
            self.encoder, _ = load_keras_encoder(encoder)
            add_lora(self.encoder, int(lora_rank), float(lora_alpha), tuple(lora_targets),
                     top_layers=int(top_layers))
        else:
            encoder_object = hub.load(encoder)
            names = [v.name for v in getattr(encoder_object, "trainable_variables", [])]
            train_names = encoder_trainable_names(names, int(top_layers), include_pooler=False)
            self.encoder = _EncoderLayer(encoder_object, trainable=self.fine_tune,
                                         train_names=train_names, dtype="float32",
                                         name="encoder")
        self.tokenize = hub.KerasLayer(self._preprocessor.tokenize, name="tokenize")
        self.pack = hub.KerasLayer(self._preprocessor.bert_pack_inputs, name="bert_pack_inputs",
                                   arguments={"seq_length": int(seq_length)})

    @property
    def adapters(self) -> int:
        """LoRA adapters in the encoder (0: weights fine-tune directly, or frozen)."""
        return len(lora_layers(self.encoder))

    def merge_adapters(self) -> int:
        """Folds the LoRA updates into the encoder's weights (graphs traced afterwards,
        e.g. exports, run the plain encoder); returns the adapters merged."""
        return merge_lora(self.encoder)

    def call(self, queries: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        inputs = trim_padding(self.pack([self.tokenize(queries)]))
        outputs = self.encoder(inputs, training=training)
        return mean_pool(tf.cast(outputs["sequence_output"], tf.float32), inputs["input_mask"])


def query_encoder_of(cfg: SearchConfig) -> tf.keras.layers.Layer:
    """The query encoder a search run's config describes (training and reloads alike):
    a QueryEncoder, or a WordBagEncoder for `query_encoder: word_bag`."""
    if cfg.query_encoder == "word_bag":
        return WordBagEncoder(cfg.encoder, cfg.preprocessor, seq_length=cfg.query_length,
                              words=cfg.word_bag_words)
    tuned = cfg.fine_tune
    return QueryEncoder(cfg.encoder, cfg.preprocessor, seq_length=cfg.query_length,
                        trainable=tuned, top_layers=cfg.top_layers if tuned else 0,
                        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        lora_targets=cfg.lora_targets)


class SearchTwoTower(tf.keras.Model):
    """Query and product towers scored by a scaled cosine; graded multi-positive softmax.

    Training batches hold one query each with its judged products (`rows` [B, P], -1
    pads) and gains (`gains` [B, P], grade - 1). Each query's softmax runs over every
    judged product of the batch plus `negatives` products drawn uniformly from the
    catalog; its target spreads over its own products in proportion to their gains.
    The encoder gets its own (small) learning rate: `encoder_optimizer`.

    Args:
      query_encoder: QueryEncoder (BERT, fine-tuned or not) or WordBagEncoder.
      title_vectors: [N, H] frozen sentence embeddings of the catalog titles.
      title_words: [N, W] int word ids of the titles (catalog_word_ids).
      num_words: vocabulary size (ids 1..num_words; 0 = pad).
      product_ids: [N] catalog ids; `id_vocabulary` decides which get an id embedding.
      id_vocabulary: product ids with a learned embedding (e.g. those in training data).
      negatives: uniform catalog negatives per batch.
      id_dropout: probability of zeroing a product's id embedding in training, so the
        tower also learns to work from text alone (unseen products).
      temperature: initial softmax temperature (learned, as a log scale).
      negative_rows: catalog rows negatives are drawn from (default: all). Draw them
        from the products the training judgments cover, or the model learns "judged
        at all" as a product prior instead of query relevance.
      word_analyzer: terms of the word bag (`tfrec.features.analyzers`); the one
        `title_words` were built with, so query and title words meet.

    Raises:
      ValueError: mismatched shapes, bad settings or an unknown word_analyzer.
    """

    def __init__(self, query_encoder: tf.keras.layers.Layer, title_vectors: np.ndarray,
                 title_words: np.ndarray, num_words: int, product_ids: Sequence[str],
                 id_vocabulary: Sequence[str] = (), negatives: int = 2048,
                 id_dropout: float = 0.5, temperature: float = 0.05,
                 negative_rows: Optional[Sequence[int]] = None,
                 word_analyzer: str = "plain", **kwargs):
        super().__init__(**kwargs)
        self.word_analyzer = check_analyzer(word_analyzer, "word_analyzer")
        title_vectors = np.asarray(title_vectors, np.float32)
        if title_vectors.ndim != 2 or len(title_vectors) != len(product_ids):
            raise ValueError(f"title_vectors must be [num_products, dim] with one row per "
                             f"product id ({len(product_ids)}), got {title_vectors.shape}")
        if len(title_words) != len(product_ids):
            raise ValueError(f"title_words has {len(title_words)} rows for "
                             f"{len(product_ids)} products")
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {id_dropout}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        pool = np.arange(len(product_ids)) if negative_rows is None else np.unique(
            np.asarray(negative_rows, np.int64))
        if pool.size == 0 or pool.min() < 0 or pool.max() >= len(product_ids):
            raise ValueError("negative_rows must be a non-empty set of catalog rows in "
                             f"[0, {len(product_ids)})")
        self.negative_rows = tf.constant(pool.astype(np.int32))
        dim = title_vectors.shape[1]
        self.num_products, self.dim = len(product_ids), dim
        self.negatives, self.id_dropout = int(negatives), float(id_dropout)
        self.query_encoder = query_encoder
        self.encoder_optimizer: Optional[tf.keras.optimizers.Optimizer] = None
        self.title_vectors = tf.Variable(title_vectors, trainable=False, name="title_vectors")
        self.title_words = tf.Variable(np.asarray(title_words, np.int32), trainable=False,
                                       name="title_words")
        id_row = {p: i + 1 for i, p in enumerate(dict.fromkeys(str(x) for x in id_vocabulary))}
        self.id_index = tf.Variable(
            np.asarray([id_row.get(str(p), 0) for p in product_ids], np.int32),
            trainable=False, name="id_index")
        zeros = tf.keras.initializers.Zeros()
        # Word embeddings shared by both towers: a query word and the same title word
        # move together, so lexical matches the pretrained encoder misses can be learned.
        self.words = tf.keras.layers.Embedding(num_words + 1, dim, embeddings_initializer=zeros,
                                               name="words")
        self.ids = tf.keras.layers.Embedding(len(id_row) + 1, dim, embeddings_initializer=zeros,
                                             name="product_ids")
        self.query_adapter = tf.keras.layers.Dense(dim, kernel_initializer=zeros,
                                                   name="query_adapter")
        self.product_adapter = tf.keras.layers.Dense(dim, kernel_initializer=zeros,
                                                     name="product_adapter")
        # Weights exist from construction (not the first call): built inside a
        # tf.distribute scope, they are distributed like the rest of the model.
        for layer in (self.query_adapter, self.product_adapter):
            layer.build((None, dim))
        for layer in (self.words, self.ids):
            layer.build((None,))
        self.log_scale = tf.Variable(float(np.log(1.0 / temperature)), name="log_scale")
        self.word_lookup: Optional[tf.keras.layers.StringLookup] = None
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    def set_word_lookup(self, vocabulary: Sequence[str]) -> None:
        """Word -> id for query words (the vocabulary behind title_words)."""
        self.word_lookup = tf.keras.layers.StringLookup(
            vocabulary=list(vocabulary), num_oov_indices=1, name="word_lookup")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def _bag(self, ids: tf.Tensor) -> tf.Tensor:
        """Sum of word vectors of [B, W] ids (0 = pad, zero vector)."""
        vectors = self.words(ids) * tf.cast(ids > 0, tf.float32)[..., tf.newaxis]
        return tf.reduce_sum(vectors, axis=-2)

    def query_vectors(self, queries: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """[B] query strings -> [B, H] unit vectors."""
        queries = tf.reshape(tf.convert_to_tensor(queries, tf.string), [-1])
        base = tf.math.l2_normalize(self.query_encoder(queries, training=training), axis=-1)
        words = self.word_lookup(text_tokens(queries, self.word_analyzer))  # OOV, pad -> 0
        words = words.to_tensor(default_value=0, shape=[None, MAX_TITLE_WORDS])
        return tf.math.l2_normalize(base + self.query_adapter(base) + self._bag(words), axis=-1)

    def product_vectors(self, rows: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        """[...] catalog rows -> [..., H] unit vectors."""
        rows = tf.cast(rows, tf.int32)
        base = tf.gather(self.title_vectors, rows)
        ids = self.ids(tf.gather(self.id_index, rows))
        if training and self.id_dropout > 0:
            keep = tf.random.uniform(tf.shape(rows)) >= self.id_dropout
            ids *= tf.cast(keep, tf.float32)[..., tf.newaxis]
        out = base + self.product_adapter(base) + self._bag(tf.gather(self.title_words, rows))
        return tf.math.l2_normalize(out + ids, axis=-1)

    def catalog_vectors(self, batch_size: int = 8192) -> tf.Tensor:
        """[N, H] unit vectors of every catalog product (inference mode)."""
        parts = [self.product_vectors(tf.range(s, min(s + batch_size, self.num_products)))
                 for s in range(0, self.num_products, batch_size)]
        return tf.concat(parts, axis=0)

    def call(self, inputs: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        """Scaled cosine [B, L] of `query` [B] against catalog `rows` [B, L]."""
        q = self.query_vectors(inputs["query"], training=training)
        p = self.product_vectors(tf.maximum(inputs["rows"], 0), training=training)
        return tf.exp(self.log_scale) * tf.einsum("bh,blh->bl", q, p)

    def _loss(self, batch: Dict[str, tf.Tensor], training: bool) -> tf.Tensor:
        rows, gains = tf.cast(batch["rows"], tf.int32), tf.cast(batch["gains"], tf.float32)
        valid = rows >= 0
        gains = tf.where(valid, tf.maximum(gains, 0.0), 0.0)
        candidates = tf.boolean_mask(rows, valid)
        if self.negatives:
            picks = tf.random.uniform([self.negatives], 0, tf.size(self.negative_rows), tf.int32)
            sampled = tf.gather(self.negative_rows, picks)
            candidates = tf.concat([candidates, sampled], axis=0)
        q = self.query_vectors(batch["query"], training=training)  # [B, H]
        p = self.product_vectors(candidates, training=training)  # [C, H]
        logits = tf.exp(self.log_scale) * tf.matmul(q, p, transpose_b=True)  # [B, C]
        # Target mass of candidate c for query b: the gain b gave that product, if any.
        same = tf.cast(tf.equal(rows[:, :, tf.newaxis], candidates[tf.newaxis, tf.newaxis, :]),
                       tf.float32)  # [B, P, C]
        target = tf.reduce_sum(same * gains[:, :, tf.newaxis], axis=1)  # [B, C]
        total = tf.reduce_sum(target, axis=1)
        has = total > 0
        target = tf.math.divide_no_nan(target, total[:, tf.newaxis])
        losses = tf.nn.softmax_cross_entropy_with_logits(target, logits)
        return tf.math.divide_no_nan(tf.reduce_sum(tf.where(has, losses, 0.0)),
                                     tf.reduce_sum(tf.cast(has, tf.float32)))

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self._loss(batch, training=True)
            # Replica gradients are summed: each replica's share keeps the global mean.
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        minimize(tape, scaled, self.trainable_variables, self.optimizer,
                 self.query_encoder.trainable_variables, self.encoder_optimizer)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, batch):
        self.loss_tracker.update_state(self._loss(batch, training=False))
        return {"loss": self.loss_tracker.result()}
