"""A word bag query encoder: the cheapest student of a BERT query tower.

A short query costs a BERT encoder six transformer blocks; a bag of word vectors costs
one table gather and a mean. Each word starts as the teacher's vector of that word
alone (its word pieces in context), so a one-word query is the teacher's from the first
step; distillation (`tfrec.search.distill`, `layers=0`) teaches the bag how words combine.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (ops of the preprocessor SavedModel)

from tfrec.features.quantize import QuantizedTable, gather_rows, lookup_table, table_key
from tfrec.models.text_match import _load_preprocessor
from tfrec.text.embedding import mean_pool
from tfrec.text.hub_export import ENCODER_KIND, read_export_info, vocab_path
from tfrec.text.vocab import read_vocab, special_ids

__all__ = ["WordBagEncoder", "max_word_pieces", "multi_piece_words", "teacher_word_vectors"]


def max_word_pieces(vocab_size: int) -> int:
    """Pieces a word key can hold: keys pack piece ids base (V + 1) into an int64."""
    return max(1, int(62 // math.log2(vocab_size + 1)))


class WordBagEncoder(tf.keras.layers.Layer):
    """[B] query strings -> [B, H] mean of the query's word vectors (not normalised).

    A word (as the BERT tokenizer splits words) of one piece reads that piece's row; a
    word of several pieces reads its own row when it is one of the `words` known ones
    (keyed by its piece ids), else the mean of its pieces' rows. Same surface as
    `tfrec.search.model.QueryEncoder` (handles, `seq_length`, adapters), so the
    two-tower, saving and export take either.

    Args:
      encoder: the BERT encoder export whose vocabulary and width the bag copies (a
        tfrec text export, e.g. the imported MiniLM); its weights are not used.
      preprocessor: the matching preprocessor (its `tokenize` splits queries).
      seq_length: the teacher's packed length; a query keeps its first
        `seq_length - 2` words.
      words: rows for multi-piece words (their keys are set with `set_words`).

    Raises:
      ValueError: seq_length < 3 or words < 0.
      FileNotFoundError: `encoder` is not a tfrec text export with a vocabulary.
    """

    def __init__(self, encoder: str, preprocessor: str, seq_length: int = 16,
                 words: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(seq_length, int) or seq_length < 3:
            raise ValueError(f"seq_length must be an integer >= 3, got {seq_length!r}")
        if not isinstance(words, int) or words < 0:
            raise ValueError(f"words must be an integer >= 0, got {words!r}")
        info = read_export_info(encoder, ENCODER_KIND)
        self.vocab_size = len(read_vocab(vocab_path(encoder)))
        self.dim = int(info["config"]["hidden_size"])
        self.max_word_pieces = max_word_pieces(self.vocab_size)
        self.encoder_handle, self.preprocessor_handle = encoder, preprocessor
        self.seq_length, self.words = seq_length, words
        # Kept as an attribute: an export then tracks the tokenizer's vocabulary table.
        self._preprocessor = _load_preprocessor(preprocessor)
        self.tokenize = hub.KerasLayer(self._preprocessor.tokenize, name="tokenize")
        self.pieces = self.add_weight(name="pieces", shape=[self.vocab_size, self.dim],
                                      initializer="zeros", trainable=True)
        self.word_vectors = self.add_weight(name="word_vectors", shape=[max(words, 1), self.dim],
                                            initializer="zeros", trainable=True)
        # Sorted keys (searchsorted finds a word's row; -1 rows match nothing).
        self.word_keys = self.add_weight(name="word_keys", shape=[max(words, 1)],
                                         dtype=tf.int64, trainable=False,
                                         initializer=tf.keras.initializers.Constant(-1))

    @property
    def adapters(self) -> int:
        return 0

    def merge_adapters(self) -> int:
        return 0

    def key_of(self, pieces: Sequence[int]) -> int:
        """The int64 key of a word's piece ids (as `call` computes it in the graph)."""
        return sum((int(p) + 1) * (self.vocab_size + 1) ** j for j, p in enumerate(pieces))

    def set_words(self, words: Sequence[Tuple[int, ...]], vectors: np.ndarray) -> None:
        """Sets the multi-piece words (piece-id tuples of 2..max_word_pieces) and rows.

        Raises:
          ValueError: more words than rows, a bad length, or mismatched vectors.
        """
        if len(words) > self.words or len(vectors) != len(words):
            raise ValueError(f"{len(words)} words / {len(vectors)} vectors for "
                             f"{self.words} rows")
        if any(not 2 <= len(w) <= self.max_word_pieces for w in words):
            raise ValueError(f"words must have 2..{self.max_word_pieces} pieces")
        keys = np.full([max(self.words, 1)], -1, np.int64)
        table = np.zeros([max(self.words, 1), self.dim], np.float32)
        order = np.argsort([self.key_of(w) for w in words], kind="stable")
        keys[:len(words)] = [self.key_of(words[i]) for i in order]
        if len(words):
            table[:len(words)] = np.asarray(vectors, np.float32)[order]
        # Unused rows sort after every real key.
        keys[len(words):] = np.iinfo(np.int64).max
        self.word_keys.assign(keys)
        self.word_vectors.assign(table)

    def start_from(self, teacher: tf.keras.layers.Layer,
                   words: Sequence[Tuple[int, ...]] = ()) -> None:
        """Sets every piece's row and the multi-piece `words`' rows to the teacher BERT
        encoder's output for that piece or word alone (`teacher_word_vectors`)."""
        special = special_ids(read_vocab(vocab_path(self.encoder_handle)))
        self.pieces.assign(teacher_word_vectors(
            teacher, [(i,) for i in range(self.vocab_size)], special.cls, special.sep))
        self.set_words(words, teacher_word_vectors(teacher, words, special.cls, special.sep))

    def stored_tables(self, precision: str) -> Dict[int, QuantizedTable]:
        """The piece and word tables in `precision` ("int8" / "bfloat16"), keyed by
        `table_key`: graphs traced inside `quantized_tables(<them>)` read these copies."""
        return {table_key(t): QuantizedTable(t.numpy(), precision, name=f"{name}_{precision}")
                for name, t in (("pieces", self.pieces), ("word_vectors", self.word_vectors))}

    def serving_state(self) -> List[tf.Module]:
        """What an export with `stored_tables` tracks instead of this layer: the tokenizer
        (its vocabulary table) and the word keys."""
        return [self._preprocessor, self.tokenize, self.word_keys]

    def call(self, queries: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        pieces = tf.cast(self.tokenize(queries), tf.int64)[:, :self.seq_length - 2]
        # Row gathers' gradients are IndexedSlices: a step touches only the query's rows.
        piece_mean = tf.reduce_mean(tf.ragged.map_flat_values(
            lambda ids: gather_rows(lookup_table(self.pieces), ids), pieces), axis=2)
        count = pieces.row_lengths(axis=2).flat_values  # pieces per word
        short = pieces.to_tensor(default_value=-1, shape=[None, None, self.max_word_pieces])
        scale = tf.constant([(self.vocab_size + 1) ** j for j in range(self.max_word_pieces)],
                            tf.int64)
        keys = tf.reduce_sum(tf.where(short >= 0, (short + 1) * scale, 0), axis=-1)
        keys = tf.RaggedTensor.from_tensor(keys, lengths=pieces.row_lengths(axis=1)).flat_values
        slot = tf.minimum(tf.searchsorted(self.word_keys, keys, out_type=tf.int64),
                          tf.shape(self.word_keys, tf.int64)[0] - 1)
        known = tf.logical_and(tf.equal(tf.gather(self.word_keys, slot), keys),
                               tf.logical_and(count >= 2, count <= self.max_word_pieces))
        vectors = tf.where(known[:, tf.newaxis],
                           gather_rows(lookup_table(self.word_vectors), slot),
                           piece_mean.flat_values)
        words = piece_mean.with_flat_values(vectors)  # [B, (W), H]
        mask = tf.ones_like(words.flat_values[:, :1])
        total = tf.reduce_sum(words, axis=1)
        n = tf.reduce_sum(words.with_flat_values(mask), axis=1)
        return total / tf.maximum(n, 1e-9)

    def get_config(self):
        return {**super().get_config(), "encoder": self.encoder_handle,
                "preprocessor": self.preprocessor_handle, "seq_length": self.seq_length,
                "words": self.words}


def multi_piece_words(tokenize, texts: Iterable[str], max_pieces: int, limit: int,
                      batch_size: int = 2048) -> List[Tuple[int, ...]]:
    """The `limit` most frequent words of 2..max_pieces pieces in `texts` (piece-id
    tuples; ties in first-seen order), as `tokenize` (a BERT preprocessor's) splits them."""
    texts = list(texts)
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(texts), batch_size):
        ragged = tokenize(tf.constant(texts[start:start + batch_size]))
        for word in ragged.merge_dims(0, 1).to_list():
            if 2 <= len(word) <= max_pieces:
                counts[tuple(int(p) for p in word)] += 1
    return [w for w, _ in counts.most_common(limit)]


def teacher_word_vectors(encoder: tf.keras.layers.Layer, words: Sequence[Tuple[int, ...]],
                         cls_id: int, sep_id: int, batch_size: int = 1024) -> np.ndarray:
    """[len(words), H] the teacher encoder's mean-pooled output for `[CLS] word [SEP]`.

    The teacher's query vector of a one-word query, so the bag starts where the teacher
    is on single words.

    Args:
      encoder: a BERT encoder layer taking input_word_ids / input_mask / input_type_ids
        and returning `sequence_output` (the QueryEncoder's `encoder`).
      words: piece-id tuples (a single piece is a one-tuple).
      cls_id / sep_id: ids of the [CLS] and [SEP] tokens.
    """
    out: Optional[np.ndarray] = None
    by_length = collections.defaultdict(list)
    for i, w in enumerate(words):
        by_length[len(w)].append(i)
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            ids = np.asarray([[cls_id, *words[i], sep_id] for i in part], np.int32)
            inputs = {"input_word_ids": tf.constant(ids), "input_mask": tf.ones_like(ids),
                      "input_type_ids": tf.zeros_like(ids)}
            sequence = tf.cast(encoder(inputs, training=False)["sequence_output"], tf.float32)
            vectors = mean_pool(sequence, inputs["input_mask"]).numpy()
            if out is None:
                out = np.zeros([len(words), vectors.shape[1]], np.float32)
            out[part] = vectors
    return out if out is not None else np.zeros([0, 0], np.float32)
