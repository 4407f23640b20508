"""Query-item text interaction features for rankers, from a TF-Hub-format BERT.

Lexical features miss synonyms ("couch" vs "sofa"); a pretrained sentence encoder
does not. "fast" stores item embeddings in the model and encodes each query once per
request; "cross" runs BERT over every (query, item text) pair: slower, more accurate.

Both load the encoder and preprocessor with `hub.load` / `hub.KerasLayer`, so a local
export (tfrec.text.hub_export, e.g. the converted MiniLM) or a TF Hub URL work alike.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (ops of the preprocessor SavedModel)

from tfrec.text.embedding import mean_pool, sentence_embeddings, trim_padding

__all__ = ["MODES", "TextMatch", "encoder_trainable_names"]

MODES = ("fast", "cross")
# Block index in encoder variable names: ours ("bert_encoder/layer_3/...") and TF Model
# Garden's TF Hub encoders ("transformer/layer_3/...").
_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")
_PREPROCESSORS: "weakref.WeakValueDictionary[Tuple[str, int], Any]" = (
    weakref.WeakValueDictionary())


def _load_preprocessor(handle: str) -> Any:
    """hub.load(handle), one copy per handle (and distribution strategy) while in use.

    A preprocessor holds no trainable state, so layers can share it; loading one takes
    about a second (many traced functions), which adds up over several layers.
    """
    key = (handle, id(tf.distribute.get_strategy()))
    loaded = _PREPROCESSORS.get(key)
    if loaded is None:
        loaded = hub.load(handle)
        _PREPROCESSORS[key] = loaded
    return loaded


def encoder_trainable_names(names: Sequence[str], top_layers: int,
                            include_pooler: bool) -> FrozenSet[str]:
    """Names of the encoder variables that fine-tune: the last `top_layers` blocks (+pooler).

    PEFT on a budget: the lower blocks hold general language knowledge and are the
    costliest to update, the top blocks adapt fastest to the ranking task.

    Args:
      names: variable names of the encoder (`trainable_variables` of the TF Hub object).
      top_layers: number of last transformer blocks to train; 0 = every variable.
      include_pooler: also train the [CLS] pooler (only useful where its output is used).

    Raises:
      ValueError: top_layers is negative or larger than the encoder's number of blocks,
        or the names carry no `layer_<i>/` block index to select by.
    """
    if top_layers < 0:
        raise ValueError(f"top_layers must be >= 0 (0 = fine-tune every layer), got {top_layers}")
    blocks = {name: int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    pooler = {name for name in names if "pooler" in name}
    if top_layers == 0:
        return frozenset(n for n in names if include_pooler or n not in pooler)
    if not blocks:
        raise ValueError("top_layers needs encoder variables named '.../layer_<i>/...' to find "
                         f"the transformer blocks; this encoder has e.g. {list(names)[:3]}; "
                         "use top_layers=0 to fine-tune all of it")
    num_layers = max(blocks.values()) + 1
    if top_layers > num_layers:
        raise ValueError(f"top_layers={top_layers} but the encoder has only {num_layers} "
                         "transformer layers")
    first = num_layers - top_layers
    keep = {n for n, i in blocks.items() if i >= first}
    return frozenset(keep | (pooler if include_pooler else set()))


class _EncoderLayer(hub.KerasLayer):
    """hub.KerasLayer whose trainable weights are limited to a named subset (PEFT).

    Keras models collect `trainable_weights` from their layers, so filtering here keeps
    the frozen variables out of gradients and optimizer slots.

    Args:
      handle: the object `hub.load` returned for the encoder.
      trainable: fine-tune (some of) the encoder.
      train_names: names of the variables that train when `trainable`.
    """

    def __init__(self, handle, trainable: bool, train_names: FrozenSet[str], **kwargs):
        self._train_names = train_names
        super().__init__(handle, trainable=trainable, **kwargs)

    @property
    def trainable_weights(self) -> List[tf.Variable]:
        return [w for w in super().trainable_weights if w.name in self._train_names]

    @property
    def non_trainable_weights(self) -> List[tf.Variable]:
        frozen = [w for w in super().trainable_weights if w.name not in self._train_names]
        return super().non_trainable_weights + frozen


def _scatter_rows(rows: tf.Tensor, values: tf.Tensor, num_rows: tf.Tensor) -> tf.Tensor:
    """Puts `values` [n, D] at `rows` of a zero [num_rows, D] tensor (differentiable)."""
    shape = tf.stack([tf.cast(num_rows, tf.int64), tf.shape(values, out_type=tf.int64)[1]])
    return tf.scatter_nd(rows[:, tf.newaxis], values, shape)


class TextMatch(tf.keras.layers.Layer):
    """Query-item text features [B, L, output_dim + 2] from a TF-Hub BERT encoder.

    Columns: `output_dim` learned projections (the trainable adapter), one similarity
    (fast: cosine of query and item embeddings; cross: cosine of the query's and the
    item's contextual token means inside the pair), and has_query (0 for "" queries,
    whose similarity and, in fast mode, interaction vector are zero). Item rows outside
    [0, len(item_texts)) -- -1 pads -- have no text: zero vectors, similarity 0.

    The encoder runs in float32 whatever the global mixed-precision policy; the output
    is float32.

    Args:
      mode: "fast" (item embeddings precomputed and stored as a weight, query encoded
        once per request row) or "cross" (BERT over each (query, item text) pair).
      encoder: TF-Hub handle (local path or URL) of a BERT encoder (Reusable SavedModel).
      preprocessor: handle of its preprocessor (`tokenize`, `bert_pack_inputs`).
      item_texts: one text per catalog row (e.g. titles), in catalog order.
      output_dim: width of the trainable projection.
      query_length: tokens of the packed query (fast mode).
      pair_length: tokens of the packed (query, item text) pair (cross mode).
      trainable: fine-tune the encoder (the projection always trains).
      top_layers: with `trainable`, train only the last N transformer blocks (+ the pooler
        in cross mode, where it is used); 0 = the whole encoder.
      embed_batch_size: texts per forward pass when embedding the items (fast mode).
      item_length: tokens of an item text when embedding it (fast mode).
      **kwargs: tf.keras.layers.Layer arguments (name, dtype).
    """

    def __init__(self, mode: str, encoder: str, preprocessor: str, item_texts: Sequence[str],
                 output_dim: int = 32, query_length: int = 24, pair_length: int = 48,
                 trainable: bool = False, top_layers: int = 0, embed_batch_size: int = 256,
                 item_length: int = 64, **kwargs):
        # `trainable` here means "fine-tune the encoder"; the layer itself stays trainable.
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown TextMatch mode {mode!r}; choose one of {MODES} "
                             "('fast': stored item embeddings, 'cross': BERT over pairs)")
        item_texts = [str(t) for t in item_texts]
        if not item_texts:
            raise ValueError("item_texts is empty: pass one text (e.g. title) per catalog row")
        for name, value, low in (("output_dim", output_dim, 1), ("query_length", query_length, 3),
                                 ("pair_length", pair_length, 5), ("item_length", item_length, 3),
                                 ("embed_batch_size", embed_batch_size, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if top_layers and not trainable:
            raise ValueError(f"top_layers={top_layers} selects which encoder layers fine-tune; "
                             "it needs trainable=True (or set top_layers=0)")
        self.mode = mode
        self.encoder_handle, self.preprocessor_handle = encoder, preprocessor
        self.output_dim, self.top_layers = int(output_dim), int(top_layers)
        self.query_length, self.pair_length = int(query_length), int(pair_length)
        self.item_length, self.embed_batch_size = int(item_length), int(embed_batch_size)
        self.fine_tune = bool(trainable)

        encoder_object = hub.load(encoder)
        # Kept untracked (the KerasLayer owns it): `set_item_texts` embeds new items.
        self._encoder_ref = weakref.ref(encoder_object)
        names = [v.name for v in getattr(encoder_object, "trainable_variables", [])]
        train_names = encoder_trainable_names(names, self.top_layers,
                                              include_pooler=(mode == "cross"))
        self._preprocessor = _load_preprocessor(preprocessor)
        self.encoder = _EncoderLayer(encoder_object, trainable=self.fine_tune,
                                     train_names=train_names, dtype="float32", name="encoder")
        self.tokenize = hub.KerasLayer(self._preprocessor.tokenize, name="tokenize")
        length = query_length if mode == "fast" else pair_length
        self.pack = hub.KerasLayer(self._preprocessor.bert_pack_inputs, name="bert_pack_inputs",
                                   arguments={"seq_length": int(length)})
        self.projection = tf.keras.layers.Dense(output_dim, dtype=self.dtype_policy,
                                                name="projection")
        self._set_items(item_texts, self._embed_items(encoder_object, item_texts)
                        if mode == "fast" else None)

    def _set_items(self, texts: List[str], vectors: Optional[np.ndarray]) -> None:
        """Stores the item table: embeddings (fast) or texts (cross), one row per item."""
        self.num_items = len(texts)
        self._item_texts_config = np.asarray(texts, dtype=object)  # get_config only
        if self.mode == "fast":
            old = getattr(self, "item_embeddings", None)
            if old is not None:  # a new catalog: drop the old table from the layer's weights
                self._non_trainable_weights = [w for w in self._non_trainable_weights
                                               if w is not old]
            self.item_embeddings = self.add_weight(
                f"item_embeddings_{len(texts)}" if old is not None else "item_embeddings",
                shape=vectors.shape, dtype=tf.float32, trainable=False,
                initializer="zeros", experimental_autocast=False)
            self.item_embeddings.assign(vectors)
        else:
            # A constant table: saved in SavedModels, not a Keras weight (string weights
            # would break weight histograms); rows outside the catalog look up "".
            self.item_texts = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.range(self.num_items, dtype=tf.int64), tf.constant(texts)),
                default_value="")

    def set_item_texts(self, item_texts: Sequence[str]) -> int:
        """Points the layer at another catalog (one text per row, in its order).

        Serving a grown or changed catalog needs no retraining: in fast mode only texts
        not in the current table are embedded, the others keep their stored vectors.

        Args:
          item_texts: one text (e.g. title) per row of the new catalog.

        Returns:
          How many texts were embedded (0 in cross mode).

        Raises:
          ValueError: `item_texts` is empty.
        """
        texts = [str(t) for t in item_texts]
        if not texts:
            raise ValueError("item_texts is empty: pass one text (e.g. title) per catalog row")
        if self.mode != "fast":
            self._set_items(texts, None)
            return 0
        stored = self.item_embeddings.numpy()
        row_of = {t: i for i, t in enumerate(self._item_texts_config.tolist())}
        new = sorted({t for t in texts if t not in row_of})
        if new:
            encoder_object = self._encoder_ref()
            fresh = dict(zip(new, self._embed_items(encoder_object, new)))
        vectors = np.stack([stored[row_of[t]] if t in row_of else fresh[t] for t in texts])
        self._set_items(texts, vectors.astype(np.float32))
        return len(new)

    @property
    def output_size(self) -> int:
        """Width of the features `call` returns."""
        return self.output_dim + 2

    def _embed_items(self, encoder_object, texts: List[str]) -> np.ndarray:
        """Unit sentence embeddings [N, H] of `texts`, batched in inference mode.

        Texts are batched by length so each batch is trimmed to its longest text.
        """
        pre = self._preprocessor

        def embed(batch: tf.Tensor) -> tf.Tensor:  # eager: the SavedModel parts are graphs
            inputs = trim_padding(pre.bert_pack_inputs([pre.tokenize(batch)],
                                                       seq_length=self.item_length))
            out = encoder_object(inputs, training=False)
            return sentence_embeddings(tf.cast(out["sequence_output"], tf.float32),
                                       inputs["input_mask"])

        order = np.argsort([len(t) for t in texts], kind="stable")
        vectors = None
        for start in range(0, len(texts), self.embed_batch_size):
            rows = order[start:start + self.embed_batch_size]
            part = embed(tf.constant([texts[i] for i in rows])).numpy()
            if vectors is None:
                vectors = np.zeros([len(texts), part.shape[1]], np.float32)
            vectors[rows] = part
        return vectors

    def _encode(self, segments: List[tf.RaggedTensor], training: Optional[bool]
                ) -> Dict[str, tf.Tensor]:
        """Packed segments through the encoder (float32): outputs plus the packed inputs."""
        inputs = trim_padding(self.pack(segments))
        outputs = self.encoder(inputs, training=training)
        return {"sequence_output": tf.cast(outputs["sequence_output"], tf.float32),
                "pooled_output": tf.cast(outputs["pooled_output"], tf.float32), **inputs}

    def call(self, query: tf.Tensor, item_index: tf.Tensor,
             training: Optional[bool] = None) -> tf.Tensor:
        """Features [B, L, output_size] float32 of each request's query and its items.

        Args:
          query: [B] strings; "" = no query (recommendation).
          item_index: [B, L] int rows into item_texts; -1 (any row outside) = no text.
          training: Keras training flag (dropout in a fine-tuned encoder).
        """
        query = tf.reshape(tf.convert_to_tensor(query, tf.string), [-1])
        item_index = tf.cast(item_index, tf.int64)
        has_query = tf.strings.length(tf.strings.strip(query)) > 0  # [B]
        known = tf.logical_and(item_index >= 0, item_index < self.num_items)  # [B, L]
        if self.mode == "fast":
            projected, similarity = self._fast(query, has_query, item_index, known, training)
        else:
            projected, similarity = self._cross(query, has_query, item_index, known, training)
        shape = tf.shape(item_index)
        has_query = tf.broadcast_to(tf.cast(has_query, tf.float32)[:, tf.newaxis, tf.newaxis],
                                    [shape[0], shape[1], 1])
        return tf.concat([tf.cast(projected, tf.float32), similarity, has_query], axis=-1)

    def _fast(self, query, has_query, item_index, known, training):
        rows = tf.where(has_query)[:, 0]
        encoded = self._encode([self.tokenize(tf.gather(query, rows))], training)
        q = _scatter_rows(rows, sentence_embeddings(encoded["sequence_output"],
                                                    encoded["input_mask"]), tf.size(query))
        items = tf.gather(self.item_embeddings, tf.where(known, item_index, 0))
        items *= tf.cast(known, tf.float32)[:, :, tf.newaxis]
        product = q[:, tf.newaxis, :] * items  # [B, L, H]
        cosine = tf.reduce_sum(product, axis=-1, keepdims=True)  # unit or zero vectors
        return self.projection(product), cosine

    def _cross(self, query, has_query, item_index, known, training):
        shape = tf.shape(item_index, out_type=tf.int64)
        flat_index = tf.reshape(item_index, [-1])
        pairs = tf.where(tf.reshape(known, [-1]))[:, 0]  # only pairs with item text
        request = pairs // shape[1]
        texts = self.item_texts.lookup(tf.gather(flat_index, pairs))
        encoded = self._encode([self.tokenize(tf.gather(query, request)),
                                self.tokenize(texts)], training)
        sequence, mask = encoded["sequence_output"], encoded["input_mask"]
        pooled = tf.concat([sentence_embeddings(sequence, mask), encoded["pooled_output"]], -1)
        # Query and item halves of the pair, each averaged over its own contextual tokens.
        second = mask * encoded["input_type_ids"]
        halves = [tf.math.l2_normalize(mean_pool(sequence, m), axis=-1)
                  for m in (mask - second, second)]
        similarity = tf.reduce_sum(halves[0] * halves[1], axis=-1, keepdims=True)
        similarity *= tf.cast(tf.gather(has_query, request), tf.float32)[:, tf.newaxis]
        total = shape[0] * shape[1]
        projected = self.projection(_scatter_rows(pairs, pooled, total))
        similarity = _scatter_rows(pairs, similarity, total)
        return (tf.reshape(projected, tf.concat([shape, [self.output_dim]], 0)),
                tf.reshape(similarity, tf.concat([shape, [1]], 0)))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(list(input_shape[:2]) + [self.output_size])

    def get_config(self) -> Dict[str, object]:
        config = super().get_config()
        config.update(mode=self.mode, encoder=self.encoder_handle,
                      preprocessor=self.preprocessor_handle,
                      item_texts=self._item_texts_config.tolist(), output_dim=self.output_dim,
                      query_length=self.query_length, pair_length=self.pair_length,
                      trainable=self.fine_tune, top_layers=self.top_layers,
                      embed_batch_size=self.embed_batch_size, item_length=self.item_length)
        return config
