"""Okapi BM25 in numpy: the tokenizer, the postings and the scores.

One implementation serves the evaluation baseline and the in-graph `LexicalIndex`
(which copies these postings into the SavedModel), so both score identically.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from tfrec.features.analyzers import check_bm25
from tfrec.features.tokenize import check_analyzer, tokenize


def bm25_tokenize(text: str, analyzer: str = "plain") -> List[str]:
    """Tokens of one text, as every tfrec text path splits them (`tfrec.features.tokenize`).

    "Wood-Deck 2x4" -> ["wood", "deck", "2x4"]; "无线耳机" -> 无 线 耳 机 无线 线耳 耳机;
    analyzer "light": "Wood-Decks 2x4" -> ["wood", "deck", "2", "x", "4"].
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    return tokenize([text], analyzer)[0]


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair, without a loop."""
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


class BM25Scorer:
    """Okapi BM25 scores of queries against indexed texts (numpy, CSR postings).

    score(q, d) = sum over query terms t of idf(t) * tf(t, d) * (k1 + 1) /
    (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)), with the non-negative idf
    log(1 + (N - df + 0.5) / (df + 0.5)). Postings are kept in CSR arrays and queries
    are scored in blocks with bincount, so no Python loop runs over documents.

    Args:
      k1: term-frequency saturation.
      b: document-length normalisation (0 = none, 1 = full).
      analyzer: how texts and queries become terms (`tfrec.features.tokenize.ANALYZERS`).
    """

    # Queries scored together: bounds the dense [queries, documents] block.
    _QUERY_BLOCK = 64

    def __init__(self, k1: float = 1.2, b: float = 0.75, analyzer: str = "plain") -> None:
        check_bm25(k1, b)
        self.k1, self.b = float(k1), float(b)
        self.analyzer = check_analyzer(analyzer)
        self.doc_ids_: Optional[np.ndarray] = None

    def fit(self, doc_ids: Sequence[str], texts: Sequence[str]) -> "BM25Scorer":
        """Indexes documents (e.g. product titles).

        Args:
          doc_ids: id of each document (unique).
          texts: text of each document, aligned with doc_ids.
        """
        doc_ids = np.asarray([str(d) for d in doc_ids], dtype=object)
        texts = list(texts)
        if len(doc_ids) != len(texts):
            raise ValueError(f"doc_ids has {len(doc_ids)} entries but texts has {len(texts)}")
        if len(doc_ids) == 0:
            raise ValueError("no documents to index")
        if len(set(doc_ids.tolist())) != len(doc_ids):
            raise ValueError("doc_ids must be unique")
        tokens = tokenize(texts, self.analyzer)
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.float64, count=len(tokens))
        flat = [w for doc in tokens for w in doc]
        doc_of = np.repeat(np.arange(len(tokens)), lengths.astype(np.int64))
        term_codes, vocab = pd.factorize(pd.Index(flat, dtype=object)) if flat else (
            np.zeros(0, np.int64), pd.Index([], dtype=object))
        num_terms = len(vocab)
        # (term, doc) pairs with their term frequency, sorted by term then doc.
        keys, tf = np.unique(term_codes.astype(np.int64) * len(tokens) + doc_of,
                             return_counts=True)
        term, doc = keys // len(tokens), keys % len(tokens)
        df = np.bincount(term, minlength=num_terms).astype(np.float64)
        n = float(len(tokens))
        avgdl = lengths.mean() if lengths.mean() > 0 else 1.0
        norm = self.k1 * (1.0 - self.b + self.b * lengths / avgdl)
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        self.weights_ = idf[term] * tf * (self.k1 + 1.0) / (tf + norm[doc])
        self.postings_ = doc
        self.indptr_ = np.concatenate([[0], np.cumsum(np.bincount(term, minlength=num_terms))])
        self.vocab_ = {w: i for i, w in enumerate(vocab)}
        self.idf_ = idf
        self.doc_ids_ = doc_ids
        self.doc_lengths_ = lengths
        return self

    def _check_fitted(self) -> None:
        if self.doc_ids_ is None:
            raise RuntimeError("BM25Scorer is not fitted; call fit() first")

    def _query_terms(self, tokens: Sequence[str]) -> np.ndarray:
        """Known term codes of a query's tokens, repeated terms counted once per occurrence."""
        return np.asarray([self.vocab_[w] for w in tokens if w in self.vocab_], dtype=np.int64)

    def score(self, queries: Sequence[str]) -> np.ndarray:
        """[queries, documents] BM25 scores (columns in fit order)."""
        self._check_fitted()
        if isinstance(queries, str):
            raise ValueError("queries must be a list of strings; wrap a single query in [ ]")
        queries = list(queries)
        num_docs = len(self.doc_ids_)
        terms = [self._query_terms(t) for t in tokenize(queries, self.analyzer)]
        lengths = np.fromiter((t.size for t in terms), dtype=np.int64, count=len(terms))
        codes = np.concatenate(terms) if terms else np.zeros(0, np.int64)
        starts, sizes = self.indptr_[codes], self.indptr_[codes + 1] - self.indptr_[codes]
        slots = expand_ranges(starts, sizes)
        rows = np.repeat(np.repeat(np.arange(len(queries)), lengths), sizes)
        scores = np.bincount(rows * num_docs + self.postings_[slots], weights=self.weights_[slots],
                             minlength=len(queries) * num_docs)
        return scores.reshape(len(queries), num_docs)
