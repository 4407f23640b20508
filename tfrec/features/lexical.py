"""BM25 of raw query strings against a fixed catalog, computed inside the TensorFlow graph.

Lexical scores then ship in the same SavedModel as the learned ones: stock TF Serving runs
it with core ops plus TF Text's case folding (no py_function) and no Python-side index.

Layout: the vocabulary is kept sorted by 63-bit FarmHash fingerprint, so a token is looked
up with `tf.searchsorted` and confirmed by string equality; postings are CSR arrays
(term -> documents), and a batch touches only the postings of its own query terms. All
state is plain non-trainable variables, so checkpoints, `save_weights`/`load_weights` and
`tf.saved_model.save` carry the whole index.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.features.analyzers import check_bm25
from tfrec.features.bm25 import BM25Scorer, expand_ranges
from tfrec.features.tokenize import check_analyzer, text_tokens

__all__ = ["LexicalIndex", "lexical_tokens"]

_HASH_BUCKETS = 2**63 - 1  # to_hash_bucket_fast returns fingerprints in [0, 2**63 - 2]
_SENTINEL = np.int64(2**63 - 1)  # fingerprint of the sentinel term, above any real one


def lexical_tokens(text: tf.Tensor, analyzer: str = "plain") -> tf.RaggedTensor:
    """[B] strings -> ragged tokens, as `bm25_tokenize` splits them (any script)."""
    return text_tokens(text, analyzer)


class LexicalIndex(tf.keras.layers.Layer):
    """BM25 (+ query-term coverage) of raw query strings against a stored catalog.

    Scores match `tfrec.features.bm25.BM25Scorer` (float32 instead of float64): both
    tokenise with `tfrec.features.tokenize` (NFKC case-folded words of any script, CJK
    characters and their bigrams), a query term repeated r times adds its weight r
    times, unknown terms add nothing. An empty query, or one with only unknown tokens,
    scores 0 everywhere. Invalid UTF-8 bytes (impossible in a Python str) act as
    separators, like U+FFFD would.

    Serialization: `get_config()` holds k1, b, the analyzer and the index sizes, not the
    texts (41k titles do not belong in a model JSON). `from_config` (or `texts=None` with
    the sizes) builds an empty index of the right shapes that scores 0 everywhere until
    `load_weights` or a checkpoint restore fills it. Weights round-trip through the TF
    checkpoint format (the `save_weights` default), `model.save` (SavedModel or
    `.keras`) and `tf.saved_model.save`; legacy `.h5` weight files cannot hold the string
    vocabulary variable.

    Args:
      texts: one document per catalog row (score column i = texts[i]); None builds an
        empty placeholder of the sizes below.
      k1: term-frequency saturation, >= 0.
      b: document-length normalisation in [0, 1].
      num_docs, num_terms, num_postings: sizes of the placeholder when texts is None
        (as written by get_config); must be omitted when texts is given.
      analyzer: how titles and queries become terms (`tfrec.features.tokenize.ANALYZERS`;
        "light" also splits letter/digit runs and folds plural suffixes).
    """

    def __init__(self, texts: Optional[Sequence[str]] = None, k1: float = 1.2,
                 b: float = 0.75, num_docs: Optional[int] = None,
                 num_terms: Optional[int] = None, num_postings: Optional[int] = None,
                 analyzer: str = "plain", **kwargs: Any):
        super().__init__(**kwargs)
        self.analyzer = check_analyzer(analyzer)
        check_bm25(k1, b)
        sizes = (num_docs, num_terms, num_postings)
        if texts is not None:
            if any(s is not None for s in sizes):
                raise ValueError("pass either texts or the placeholder sizes (num_docs, "
                                 "num_terms, num_postings), not both")
            arrays = _build_index(texts, k1, b, self.analyzer)
        else:
            arrays = _placeholder(*(0 if s is None else s for s in sizes))
        self.k1, self.b = float(k1), float(b)
        terms, fingerprints, indptr, postings, weights, self._num_docs = arrays
        self._num_terms = len(terms) - 1  # without the sentinel
        # Variables (not constants): they travel with checkpoints and SavedModels without
        # being baked into the graph. Term 0..V-1 sorted by fingerprint, then the sentinel.
        self.terms = tf.Variable(terms, trainable=False, dtype=tf.string, name="terms")
        self.fingerprints = tf.Variable(fingerprints, trainable=False, dtype=tf.int64,
                                        name="term_fingerprints")
        self.indptr = tf.Variable(indptr, trainable=False, dtype=tf.int64, name="indptr")
        # Postings double as the binary term x doc presence matrix: every BM25 weight is
        # > 0 (idf > 0, tf >= 1), so presence is exactly the weights' sparsity pattern.
        self.postings = tf.Variable(postings, trainable=False, dtype=tf.int32,
                                    name="postings")
        self.bm25_weights = tf.Variable(weights, trainable=False, dtype=tf.float32,
                                    name="bm25_weights")

    @property
    def num_docs(self) -> int:
        """Catalog rows, i.e. score columns."""
        return self._num_docs

    @property
    def num_terms(self) -> int:
        """Distinct tokens of the catalog."""
        return self._num_terms

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(k1=self.k1, b=self.b, analyzer=self.analyzer, num_docs=self._num_docs,
                      num_terms=self._num_terms,
                      num_postings=int(self.postings.shape[0]))
        return config

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([tf.TensorShape(input_shape)[0], self._num_docs])

    def tokenize(self, queries: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings -> ragged [B, None] tokens, as `bm25_tokenize` would split them."""
        return lexical_tokens(_check_queries(queries), self.analyzer)

    def call(self, queries: tf.Tensor) -> tf.Tensor:
        """[B] tf.string -> [B, num_docs] float32 BM25 scores."""
        return self._accumulate(queries, with_coverage=False)[0]

    def scores_and_coverage(self, queries: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """BM25 [B, N] and coverage [B, N] of raw queries.

        coverage = (# distinct query tokens present in the document) /
        max(1, # distinct query tokens, unknown ones included).

        Args:
          queries: [B] tf.string.
        """
        return self._accumulate(queries, with_coverage=True)[:2]

    def scores_coverage_and_terms(self, queries: tf.Tensor
                                  ) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`scores_and_coverage` plus [B] float32 distinct tokens of each query, unknown
        ones included (coverage's denominator), from the same tokenisation.

        Args:
          queries: [B] tf.string.
        """
        return self._accumulate(queries, with_coverage=True)

    def document_terms(self) -> np.ndarray:
        """[num_docs] float32: distinct catalog tokens of each document (the postings are
        one per distinct (term, document) pair)."""
        return np.bincount(self.postings.numpy(), minlength=self._num_docs).astype(np.float32)

    def _accumulate(self, queries: tf.Tensor, with_coverage: bool
                    ) -> Tuple[tf.Tensor, Optional[tf.Tensor], Optional[tf.Tensor]]:
        tokens = self.tokenize(queries)
        batch = tf.shape(tokens.row_splits, out_type=tf.int64)[0] - 1
        flat, rows = tokens.flat_values, tokens.value_rowids()
        # Distinct (query, token) pairs with their multiplicity: postings are read once
        # per distinct term; a repeated term's weight is scaled by its count.
        keys = tf.strings.join([tf.strings.as_string(rows), flat], separator=" ")
        unique_keys, slot = tf.unique(keys, out_idx=tf.int64)
        num_unique = tf.size(unique_keys, out_type=tf.int64)
        first = tf.math.unsorted_segment_min(
            tf.range(tf.size(flat, out_type=tf.int64)), slot, num_unique)
        distinct_rows, distinct_tokens = tf.gather(rows, first), tf.gather(flat, first)
        repeats = tf.math.unsorted_segment_sum(tf.ones_like(slot, tf.float32), slot, num_unique)

        # Vocabulary lookup: lower bound on the sorted fingerprints, then an exact string
        # check (a fingerprint collision with an unknown token cannot match). The sentinel
        # fingerprint is above every real one, so the position is always a valid index.
        fingerprint = tf.strings.to_hash_bucket_fast(distinct_tokens, _HASH_BUCKETS)
        term = tf.searchsorted(self.fingerprints, fingerprint, out_type=tf.int64)
        known = tf.logical_and(tf.equal(tf.gather(self.fingerprints, term), fingerprint),
                               tf.equal(tf.gather(self.terms, term), distinct_tokens))
        term, query_row = tf.boolean_mask(term, known), tf.boolean_mask(distinct_rows, known)
        repeats = tf.boolean_mask(repeats, known)

        # Expand each known term to its postings (CSR slice indptr[t]:indptr[t+1]).
        start = tf.gather(self.indptr, term)
        slots = tf.ragged.range(start, tf.gather(self.indptr, term + 1))
        posting = slots.flat_values
        # Each posting's term slot; a gather by it is tf.repeat without repeat's ~20 ops.
        owner = slots.value_rowids()
        posting_row = tf.gather(query_row, owner)
        docs = tf.cast(tf.gather(self.postings, posting), tf.int64)
        cell = posting_row * self._num_docs + docs  # flat index into [B, N]
        size = batch * self._num_docs
        values = tf.gather(self.bm25_weights, posting) * tf.gather(repeats, owner)
        shape = tf.stack([batch, tf.constant(self._num_docs, tf.int64)])  # [-1, 0] is ambiguous
        scores = tf.reshape(tf.math.unsorted_segment_sum(values, cell, size), shape)
        if not with_coverage:
            return scores, None, None
        matched = tf.math.unsorted_segment_sum(tf.ones_like(values), cell, size)
        per_query = tf.math.unsorted_segment_sum(
            tf.ones_like(distinct_rows, tf.float32), distinct_rows, batch)
        coverage = tf.reshape(matched, shape) / tf.maximum(per_query, 1.0)[:, None]
        return scores, coverage, per_query


def _check_queries(queries: Any) -> tf.Tensor:
    """Queries as a [B] string tensor, or a ValueError saying what is wrong."""
    if isinstance(queries, str):
        raise ValueError("queries must be a batch of strings ([B]); wrap a single query in [ ]")
    if isinstance(queries, tf.RaggedTensor) or isinstance(queries, tf.SparseTensor):
        raise ValueError(f"queries must be a dense [B] tf.string tensor, got "
                         f"{type(queries).__name__}")
    queries = tf.convert_to_tensor(queries)
    if queries.dtype != tf.string:
        raise ValueError(f"LexicalIndex expects raw query strings (tf.string), got "
                         f"{queries.dtype.name}; pass the query text, not token ids")
    if queries.shape.rank is not None and queries.shape.rank != 1:
        raise ValueError(f"queries must have shape [B], got {queries.shape}; reshape a "
                         f"[B, 1] feature with tf.reshape(queries, [-1])")
    return tf.ensure_shape(queries, [None])


def _fingerprints(terms: np.ndarray) -> np.ndarray:
    """The in-graph fingerprint of each term, computed by the same TF kernel."""
    if len(terms) == 0:
        return np.zeros(0, np.int64)
    return tf.strings.to_hash_bucket_fast(terms.astype(object), _HASH_BUCKETS).numpy()


def _build_index(texts: Sequence[str], k1: float, b: float, analyzer: str) -> tuple:
    """BM25Scorer's CSR weights, re-ordered by term fingerprint, plus the sentinel."""
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of document strings, got a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: the index needs at least one document")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{row}] is {type(text).__name__} ({text!r}), not str; "
                             "replace missing texts with '' before indexing")
    if len(texts) >= 2**31:
        raise ValueError(f"{len(texts)} documents do not fit int32 postings")
    bm25 = BM25Scorer(k1=k1, b=b, analyzer=analyzer).fit([str(i) for i in range(len(texts))],
                                                          texts)
    vocab = np.asarray(list(bm25.vocab_), dtype=object)  # code order (dict keeps it)
    fingerprints = _fingerprints(vocab)
    order = np.argsort(fingerprints, kind="stable")
    fingerprints = fingerprints[order]
    if len(fingerprints) > 1 and (np.diff(fingerprints) == 0).any():
        clash = vocab[order][1:][np.diff(fingerprints) == 0][0]
        raise ValueError(f"two catalog terms share a 63-bit fingerprint (one is {clash!r}); "
                         "rename or drop one of them")
    lengths = np.diff(bm25.indptr_)[order]
    slots = expand_ranges(bm25.indptr_[:-1][order], lengths)
    indptr = np.concatenate([[0], np.cumsum(lengths), [lengths.sum()]]).astype(np.int64)
    return (np.append(vocab[order], "").astype(str).astype(object),
            np.append(fingerprints, _SENTINEL).astype(np.int64), indptr,
            bm25.postings_[slots].astype(np.int32), bm25.weights_[slots].astype(np.float32),
            len(texts))


def _placeholder(num_docs: int, num_terms: int, num_postings: int) -> tuple:
    """Index arrays of the given sizes that match no token (filled by load_weights)."""
    for name, value in (("num_docs", num_docs), ("num_terms", num_terms),
                        ("num_postings", num_postings)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    # Empty-string terms never equal a token, and all-sentinel fingerprints keep every
    # searchsorted position at 0, a valid index.
    return (np.full(num_terms + 1, "", dtype=object),
            np.full(num_terms + 1, _SENTINEL, dtype=np.int64),
            np.zeros(num_terms + 2, np.int64), np.zeros(num_postings, np.int32),
            np.zeros(num_postings, np.float32), int(num_docs))
