"""Sentence embeddings from TF-Hub-format encoders: masked mean pooling + L2 norm.

Sentence-transformers models such as all-MiniLM-L6-v2 were trained with this pooling
(not the [CLS] pooler), so cosine similarity of these vectors is what they rank by.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (registers the ops the preprocessor SavedModel uses)

from tfrec.data.io import atomic_write

log = logging.getLogger(__name__)

KEY_DTYPE = "U40"  # hex SHA-1 of a text: TextVectorCache keys


def mean_pool(sequence_output: tf.Tensor, input_mask: tf.Tensor) -> tf.Tensor:
    """Average of the token vectors where `input_mask` is 1: [B, L, H] -> [B, H]."""
    mask = tf.cast(input_mask, sequence_output.dtype)[:, :, tf.newaxis]
    total = tf.reduce_sum(sequence_output * mask, axis=1)
    count = tf.maximum(tf.reduce_sum(mask, axis=1), tf.constant(1e-9, sequence_output.dtype))
    return total / count


def trim_padding(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Drops padding columns beyond the longest row: masked keys make them exact no-ops.

    With batches of similar lengths, a title of 12 tokens no longer pays for 64.
    """
    longest = tf.reduce_max(tf.reduce_sum(inputs["input_mask"], axis=1))
    length = tf.maximum(longest, 2)  # also safe for an empty batch
    return {k: v[:, :length] for k, v in inputs.items()}


def sentence_embeddings(sequence_output: tf.Tensor, input_mask: tf.Tensor) -> tf.Tensor:
    """Masked mean pooling then L2 normalisation (the sentence-transformers recipe)."""
    return tf.math.l2_normalize(mean_pool(sequence_output, input_mask), axis=-1)


Handle = Union[str, Any]  # an export path, or the object hub.load() returned for it


def sentence_embedding_model(encoder: Handle, preprocessor: Handle,
                             seq_length: Optional[int] = None,
                             trainable: bool = False, trim: bool = True) -> tf.keras.Model:
    """Keras model: [B] raw strings -> [B, H] unit-norm sentence embeddings.

    Uses only the TF Hub interface (`tokenize`, `bert_pack_inputs`, the encoder's
    `__call__`), so any TF-Hub-format BERT encoder/preprocessor pair works.

    Args:
      encoder: exported encoder (path or loaded object).
      preprocessor: matching preprocessor (path or loaded object).
      seq_length: packed length (default: the preprocessor's own).
      trainable: fine-tune the encoder weights when the model is trained.
      trim: cut each batch to its longest text (exact; needs an encoder that takes any
        sequence length, as TF-Hub BERT encoders do).
    """
    if seq_length is not None and seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 ([CLS] and [SEP]), got {seq_length}")
    if isinstance(preprocessor, str):
        preprocessor = hub.load(preprocessor)
    sentences = tf.keras.layers.Input(shape=(), dtype=tf.string, name="sentences")
    if seq_length is None:
        inputs = hub.KerasLayer(preprocessor, name="preprocessor")(sentences)
    else:
        tokens = hub.KerasLayer(preprocessor.tokenize, name="tokenize")(sentences)
        inputs = hub.KerasLayer(preprocessor.bert_pack_inputs, name="bert_pack_inputs",
                                arguments={"seq_length": seq_length})([tokens])
    if trim:
        inputs = tf.keras.layers.Lambda(trim_padding, name="trim_padding")(inputs)
    outputs = hub.KerasLayer(encoder, trainable=trainable, name="encoder")(inputs)
    embeddings = tf.keras.layers.Lambda(
        lambda t: sentence_embeddings(t[0], t[1]), name="mean_pool_l2")(
            [outputs["sequence_output"], inputs["input_mask"]])
    return tf.keras.Model(sentences, embeddings, name="sentence_encoder")


class SentenceEncoder:
    """Batches texts through `sentence_embedding_model` in inference mode.

    Texts are batched by length and each batch is cut to its longest text (`trim`), so
    short titles do not pay for the packed length; rows come back in input order.

    Args:
      encoder: exported encoder (path or loaded object).
      preprocessor: matching preprocessor (path or loaded object).
      seq_length: packed length (default: the preprocessor's own).
      batch_size: texts per forward pass.
      trim: batch by length and drop padding columns (False: input order, full length).
      progress_seconds: log texts/s and the time left this often (0: never).
    """

    def __init__(self, encoder: Handle, preprocessor: Handle,
                 seq_length: Optional[int] = None, batch_size: int = 64,
                 trim: bool = True, progress_seconds: float = 10.0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.trim = trim
        self.progress_seconds = progress_seconds
        self.model = sentence_embedding_model(encoder, preprocessor, seq_length,
                                              trim=trim and seq_length is not None)
        self._embed = tf.function(
            lambda s: self.model(s, training=False),
            input_signature=[tf.TensorSpec([None], tf.string)])

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.model.output_shape[-1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, H] float32 unit vectors (rows in input order)."""
        texts = [str(t) for t in texts]
        vectors = np.zeros([len(texts), self.dim], np.float32)
        order = (np.argsort([len(t) for t in texts], kind="stable") if self.trim
                 else np.arange(len(texts)))
        start = last = time.perf_counter()
        for i in range(0, len(texts), self.batch_size):
            rows = order[i:i + self.batch_size]
            vectors[rows] = self._embed(tf.constant([texts[r] for r in rows])).numpy()
            now = time.perf_counter()
            if self.progress_seconds and now - last >= self.progress_seconds:
                last, done = now, i + len(rows)
                rate = done / (now - start)
                log.info("embedded %d/%d texts (%.0f/s, %.0fs left)", done, len(texts),
                         rate, (len(texts) - done) / rate)
        return vectors

    def throughput(self, texts: Sequence[str], repeats: int = 3) -> Dict[str, float]:
        """Sentences per second over `texts` (best of `repeats`, after one warm-up pass)."""
        self.encode(texts[:self.batch_size])
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            self.encode(texts)
            best = min(best, time.perf_counter() - start)
        return {"sentences": len(texts), "seconds": best,
                "sentences_per_second": len(texts) / best}


class TextVectorCache:
    """Vectors of texts on disk, one row per distinct text (keyed by a content hash).

    A catalog that gains or edits a few products re-embeds only those: every other
    text's vector is read back. One cache directory serves one encoder setting (`key`).

    Args:
      directory: where the cache lives (created when first written).
      key: what the vectors depend on besides the text (encoder path, length, ...).
    """

    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.prefix = os.path.join(directory, "text_vectors_" + hashlib.sha1(
            key.encode("utf-8")).hexdigest()[:16])
        self.embedded = 0  # texts the last `vectors` call had to embed

    @staticmethod
    def text_key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def _load(self):
        keys, vectors = self.prefix + ".keys.npy", self.prefix + ".vectors.npy"
        if not (os.path.exists(keys) and os.path.exists(vectors)):
            return np.zeros([0], KEY_DTYPE), None
        return np.load(keys), np.load(vectors)  # plain arrays: no pickle from a cache dir

    def vectors(self, texts: Sequence[str],
                embed: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        """[N, H] vectors of `texts`; `embed` is called on the texts the cache lacks.

        Args:
          texts: the texts, in the order wanted.
          embed: texts -> [n, H] vectors (e.g. `SentenceEncoder.encode`).
        """
        texts = [str(t) for t in texts]
        keys, stored = self._load()
        row = {k: i for i, k in enumerate(keys)}
        wanted = [self.text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in wanted if k not in row))
        first = {k: t for k, t in zip(wanted, texts)}
        self.embedded = len(missing)
        if missing:
            fresh = np.asarray(embed([first[k] for k in missing]), np.float32)
            stored = fresh if stored is None else np.concatenate([stored, fresh], axis=0)
            keys = np.concatenate([keys, np.asarray(missing, KEY_DTYPE)])
            row.update({k: len(keys) - len(missing) + i for i, k in enumerate(missing)})
            # Vectors first: a crash between the two leaves keys that index old rows only.
            atomic_write(self.prefix + ".vectors.npy", lambda p: _save(p, stored))
            atomic_write(self.prefix + ".keys.npy", lambda p: _save(p, keys))
        if stored is None:
            return np.zeros([0, 0], np.float32)
        return stored[[row[k] for k in wanted]]


def _save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array, allow_pickle=False)
