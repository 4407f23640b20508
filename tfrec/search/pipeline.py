"""Catalog search in TF ops: two-tower + BM25 retrieval, union of candidates, re-ranking.

One object serves training (ranker lists), evaluation (full-catalog metrics of every
stage) and export (the SavedModel signature), so what is measured is what is served.
Two retrievers with different failure modes (BERT misses part numbers, BM25 misses
synonyms and typos) feed the ranker: the union of their top lists.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.features.lexical import LexicalIndex
from tfrec.features.quantize import catalog_rows, dense_reads, table_scores
from tfrec.features.speller import Speller
from tfrec.models.catalog_index import IndexChoice
from tfrec.models.ivf import IvfIndex
from tfrec.models.lists import masked_zscore
from tfrec.search.category import QueryCategoryHead
from tfrec.search.config import (SearchConfig, check_feedback, check_feedback_pool,
                                 check_hybrid_weights)
from tfrec.search.feedback import feedback_centroid, feedback_query, feedback_scores
from tfrec.search.model import SearchTwoTower
from tfrec.search.ranker import FEATURES, LEGACY_FEATURES, SearchRanker, candidate_features

__all__ = ["SearchPipeline", "MAX_QUERY_CHARS", "fuse_hybrid"]

# Longer queries are cut before tokenising: bounds the cost of junk input.
MAX_QUERY_CHARS = 512


def fuse_hybrid(dense_z: tf.Tensor, bm25_z: tf.Tensor, weight: float) -> tf.Tensor:
    """The hybrid score from catalog-z-scored dense and BM25 scores (`weight`: BM25's
    share), for serving and for choosing the weight alike."""
    return (1.0 - weight) * dense_z + weight * bm25_z


class SearchPipeline(tf.Module):
    """Query strings -> ranked catalog rows with per-stage scores.

    Args:
      two_tower: trained (or zero-shot) SearchTwoTower; its product vectors are stored
        here (`refresh_product_vectors` after training it).
      lexical: LexicalIndex over the same catalog rows (titles).
      ranker: SearchRanker (None: rank by the hybrid score).
      product_ids: [N] catalog ids.
      titles: [N] titles.
      candidates: products each retriever contributes (the ranker sees up to twice this).
      hybrid_weight: weight of the catalog-z-scored BM25 in the fused retrieval score
        (1 - weight for the two-tower cosine).
      speller: corrects words the catalog never uses; the corrections are added to the
        query BM25 scores (None: BM25 sees the query as typed).
      dense_corrections: the query tower (and the category classifier, which reads its
        vector) also reads the query with its corrections appended.
      refresh: fill the product vectors now; False when trained weights are restored
        next (one pass over the catalog instead of two, minutes at 1M products).
      ranker_features: how many leading `FEATURES` columns the ranker reads
        (`LEGACY_FEATURES` for a run saved before the later columns existed).
      feedback_weight, feedback_keep, feedback_top: past the ranker's first
        `feedback_keep` results, order by ranker z-score + weight x cosine to the
        centroid of the `feedback_top` best hybrid candidates (`feedback_scores`;
        0 = the ranker's order throughout).
      feedback_extra: products the feedback query (the query vector moved to that
        centroid) retrieves beyond both lists, appended to every list (0: none).
      feedback_pool: where the feedback query looks for them: 0, a second pass over the
        whole catalog (or the index); N > `candidates`, only the first dense pass's top N
        (no second pass; the moved query stays close to the first).

    A query-category classifier is attached after training with `set_query_categories`,
    an IVF index over the final product vectors with `set_index`, a first pass on their
    principal components with `set_coarse`.
    """

    def __init__(self, two_tower: SearchTwoTower, lexical: LexicalIndex,
                 ranker: Optional[SearchRanker], product_ids: Sequence[str],
                 titles: Sequence[str], candidates: int = 100, hybrid_weight: float = 0.2,
                 speller: Optional[Speller] = None, dense_corrections: bool = True,
                 refresh: bool = True, ranker_features: int = len(FEATURES),
                 feedback_weight: float = 0.0, feedback_keep: int = 20,
                 feedback_top: int = 10, feedback_extra: int = 0, feedback_pool: int = 0,
                 name: str = "search_pipeline"):
        super().__init__(name=name)
        if lexical.num_docs != two_tower.num_products or len(product_ids) != lexical.num_docs:
            raise ValueError(f"catalog sizes differ: two-tower {two_tower.num_products}, "
                             f"lexical index {lexical.num_docs}, ids {len(product_ids)}")
        if len(titles) != len(product_ids):
            raise ValueError(f"{len(titles)} titles for {len(product_ids)} product ids")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        check_hybrid_weights([hybrid_weight], "hybrid_weight")
        check_feedback([feedback_weight], feedback_keep, feedback_top, extras=[feedback_extra],
                       pool=feedback_pool, candidates=candidates)
        if not LEGACY_FEATURES <= ranker_features <= len(FEATURES):
            raise ValueError(f"ranker_features must be in [{LEGACY_FEATURES}, {len(FEATURES)}], "
                             f"got {ranker_features}")
        self.ranker_features = int(ranker_features)
        self.two_tower, self.lexical, self.ranker = two_tower, lexical, ranker
        self.speller = speller
        self.num_products = len(product_ids)
        self.candidates = int(min(candidates, self.num_products))
        self.hybrid_weight = float(hybrid_weight)
        self.feedback_weight = float(feedback_weight)
        self.feedback_keep, self.feedback_top = int(feedback_keep), int(feedback_top)
        self.feedback_extra = int(feedback_extra)
        self.feedback_pool = int(feedback_pool)
        # Variables, not constants: a million titles stay out of the serving graph proto.
        self.product_ids = tf.Variable(np.asarray(product_ids, dtype=object), trainable=False,
                                       dtype=tf.string, name="product_ids")
        self.titles = tf.Variable(np.asarray(titles, dtype=object), trainable=False,
                                  dtype=tf.string, name="titles")
        self.product_vectors = tf.Variable(
            tf.zeros([self.num_products, two_tower.title_vectors.shape[1]]), trainable=False,
            name="product_vectors")
        # Whether dense_mean / dense_cov describe the current product vectors: index tuning
        # sets several coarse widths or IVF plans on one table, each needing the moments.
        self._moments_current = False
        self.title_terms = tf.Variable(lexical.document_terms(), trainable=False,
                                       name="title_terms")
        self.dense_corrections = bool(dense_corrections)
        self.category_head: Optional[QueryCategoryHead] = None
        self.category_filter = 0.0
        self.ivf: Optional[IvfIndex] = None
        self.index_card: Dict = {"index": "exact"}
        self.coarse_dims, self.coarse_shortlist = 0, 0
        if refresh:
            self.refresh_product_vectors()

    def set_query_categories(self, head: Optional[QueryCategoryHead],
                             product_categories: Sequence[int], names: Sequence[str],
                             category_filter: float = 0.0) -> None:
        """Attaches a query -> category classifier (None detaches it).

        Args:
          head: classifier over the two-tower's query vectors.
          product_categories: [N] category index per catalog row (-1 = unknown).
          names: category names (index order).
          category_filter: 0 = off; else retrieval keeps only products whose category's
            probability is at least this share of the query's most probable category's
            (products of unknown category are always kept).

        Raises:
          ValueError: sizes that disagree, or a filter outside [0, 1].
        """
        if head is None:
            self.category_head = None
            return
        rows = np.asarray(product_categories, np.int32)
        if rows.shape != (self.num_products,):
            raise ValueError(f"product_categories must have one entry per catalog row "
                             f"({self.num_products}), got shape {rows.shape}")
        if len(names) != head.num_categories or rows.max(initial=-1) >= len(names):
            raise ValueError(f"{len(names)} category names for a classifier of "
                             f"{head.num_categories} categories (largest index "
                             f"{rows.max(initial=-1)})")
        if not 0.0 <= category_filter <= 1.0:
            raise ValueError(f"category_filter must be in [0, 1], got {category_filter}")
        self.category_head = head
        self.category_filter = float(category_filter)
        self.product_categories = tf.Variable(rows, trainable=False, name="product_categories")
        self.category_names = tf.Variable(np.asarray(list(names), dtype=object),
                                          trainable=False, dtype=tf.string,
                                          name="category_names")

    def category_probs(self, query_vectors: tf.Tensor) -> tf.Tensor:
        """[B, C] category probabilities of queries given their two-tower vectors."""
        return tf.nn.softmax(self.category_head(query_vectors, training=False), axis=-1)

    def _product_category_probs(self, probs: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """[B, L] probability of each candidate row's category (0 for unknown ones)."""
        categories = tf.gather(self.product_categories, tf.maximum(rows, 0))
        picked = tf.gather(probs, tf.maximum(categories, 0), batch_dims=1)
        return tf.where(categories >= 0, picked, 0.0)

    def set_index(self, choice: Optional[IndexChoice]) -> None:
        """Dense retrieval through an IVF index over the current product vectors (None, or
        a choice without a plan: exact top-k over every product).

        The hybrid score z-scores the dense cosine over the whole catalog; with an index
        that z-score comes from the catalog's mean vector and covariance (q.m and q'Cq),
        which are exact and cost [H, H] instead of a [B, N] matmul per query batch.

        Raises:
          ValueError: a plan over a different number of products.
        """
        self.index_card = dict(choice.card) if choice is not None else {"index": "exact"}
        if choice is None or choice.plan is None:
            self.ivf = None
            return
        if len(choice.plan.order) != self.num_products:
            raise ValueError(f"the IVF plan covers {len(choice.plan.order)} products, the "
                             f"pipeline has {self.num_products}")
        if self.coarse_dims:
            raise ValueError("set_coarse(0) before an IVF index: the first pass is one or "
                             "the other")
        self.ivf = IvfIndex(choice.plan, choice.nprobe, catalog_rows=True)
        self._set_moments()

    def _set_moments(self) -> np.ndarray:
        """Stores the product vectors' mean and covariance (the dense z-score without a
        [B, N] pass), once per product table; returns the covariance."""
        if self._moments_current:
            return self.dense_cov.numpy()
        mean, cov = _moments(self.product_vectors)
        self.dense_mean = tf.Variable(mean, trainable=False, name="dense_mean")
        self.dense_cov = tf.Variable(cov, trainable=False, name="dense_cov")
        self._moments_current = True
        return cov

    def set_coarse(self, dims: int, shortlist: int = SearchConfig.coarse_shortlist) -> None:
        """Dense retrieval in two steps: every product scored on the `dims` leading
        principal components of the product vectors, then the best `shortlist` of those
        re-scored with the whole vectors (0 dims: one exact pass).

        The catalog pass reads dims / H of the table (memory-bound at batch 1); ranking
        by the leading components keeps what separates products. The hybrid's catalog
        z-score stays exact (from the mean and covariance, as with an IVF index).

        Raises:
          ValueError: dims outside [0, H), a shortlist below `candidates`, or an IVF
            index set.
        """
        width = int(self.product_vectors.shape[1])
        if isinstance(dims, bool) or not isinstance(dims, int) or not 0 <= dims < width:
            raise ValueError(f"coarse dims must be an integer in [0, {width}) (the product "
                             f"vectors' width; 0: off), got {dims!r}")
        if dims and self.ivf is not None:
            raise ValueError("the pipeline has an IVF index; set_index(None) before a "
                             "coarse first pass")
        if dims and (isinstance(shortlist, bool) or not isinstance(shortlist, int)
                     or shortlist < self.candidates):
            raise ValueError(f"the coarse shortlist must be an integer >= candidates "
                             f"({self.candidates}), got {shortlist!r}")
        self.coarse_dims = int(dims)
        self.coarse_shortlist = int(min(shortlist, self.num_products)) if dims else 0
        if self.ivf is None:  # an IVF index keeps its card
            self.index_card = {"index": "exact"}
        if dims:
            self._project()
            self.index_card["coarse"] = {"dims": self.coarse_dims,
                                         "shortlist": self.coarse_shortlist}

    def _project(self, chunk: int = 65536) -> None:
        """Fills the coarse basis [H, dims] (top eigenvectors of the covariance) and the
        catalog's centred coordinates on it [N, dims], a chunk at a time."""
        cov = self._set_moments()
        _, eigenvectors = np.linalg.eigh(cov.astype(np.float64))
        basis = eigenvectors[:, ::-1][:, :self.coarse_dims].astype(np.float32)
        mean = self.dense_mean.numpy()
        parts = [(self.product_vectors[s:s + chunk].numpy() - mean) @ basis
                 for s in range(0, self.num_products, chunk)]
        self.coarse_basis = tf.Variable(basis, trainable=False, name="coarse_basis")
        self.coarse_vectors = tf.Variable(np.concatenate(parts), trainable=False,
                                          name="coarse_vectors")

    def refresh_product_vectors(self, batch_size: int = 8192) -> None:
        """Re-embeds the catalog with the two-tower's current weights, a slice at a time
        (no second catalog-sized copy).

        Raises:
          ValueError: with an IVF index set (it was built on the old vectors).
        """
        if self.ivf is not None:
            raise ValueError("the IVF index was built on the current product vectors; "
                             "set_index(None) before refreshing them, then index again")
        self._moments_current = False
        for start in range(0, self.num_products, batch_size):
            rows = tf.range(start, min(start + batch_size, self.num_products))
            # scatter_update, not a slice assign: distributed (mirrored) variables take it.
            self.product_vectors.scatter_update(tf.IndexedSlices(
                self.two_tower.product_vectors(rows, training=False), rows))
        dense_reads(self.product_vectors)  # else every exact top-k copies the table
        if self.coarse_dims:
            self._project()  # the components of the new vectors

    @staticmethod
    def clean_queries(queries: tf.Tensor) -> tf.Tensor:
        """[B] strings: stripped, valid UTF-8, at most MAX_QUERY_CHARS characters.

        The text is first cut to 4 * MAX_QUERY_CHARS bytes (a UTF-8 character has at most
        4), so a 100 KB query costs what a normal one does; a character cut in half there
        lies past the first MAX_QUERY_CHARS characters. Invalid UTF-8 bytes are dropped
        (the character-based cut would otherwise fail on them).
        """
        queries = tf.strings.strip(tf.reshape(tf.convert_to_tensor(queries, tf.string), [-1]))
        queries = tf.strings.substr(queries, 0, 4 * MAX_QUERY_CHARS, unit="BYTE")
        queries = tf.strings.unicode_transcode(queries, "UTF-8", "UTF-8", errors="ignore")
        return tf.strings.substr(queries, 0, MAX_QUERY_CHARS, unit="UTF8_CHAR")

    def corrections(self, queries: tf.Tensor) -> tf.Tensor:
        """[B] corrected words of each query, space-joined ("" if none or no speller)."""
        return self._corrections(self.clean_queries(queries))

    def _corrections(self, cleaned: tf.Tensor) -> tf.Tensor:
        """`corrections` of queries already cleaned (`clean_queries`)."""
        if self.speller is None:
            return tf.fill(tf.shape(cleaned), "")
        return self.speller.corrections(cleaned)

    def read_queries(self, queries: tf.Tensor) -> Dict[str, tf.Tensor]:
        """How the pipeline reads [B] raw queries: {"lexical": cleaned query + corrections
        (what BM25 scores), "dense": what the query tower reads, "corrections"}."""
        queries = self.clean_queries(queries)
        corrections = self._corrections(queries)
        # The typed words stay: a wrong correction costs precision, not the match.
        lexical = tf.where(tf.equal(corrections, ""), queries,
                           tf.strings.join([queries, corrections], separator=" "))
        return {"lexical": lexical, "dense": lexical if self.dense_corrections else queries,
                "corrections": corrections}

    def query_vectors(self, queries: tf.Tensor) -> tf.Tensor:
        """[B, H] query tower vectors of raw queries, read as `search` reads them."""
        return self.two_tower.query_vectors(self.read_queries(queries)["dense"],
                                            training=False)

    def catalog_scores(self, queries: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Every product's dense, bm25, coverage and hybrid score [B, N], the catalog
        z-scores the hybrid fuses (dense_z, bm25_z), query_vectors and corrections."""
        read = self.read_queries(queries)
        q = self.two_tower.query_vectors(read["dense"], training=False)
        dense = table_scores(self.product_vectors, q)
        bm25, coverage = self.lexical.scores_and_coverage(read["lexical"])
        dense_z, bm25_z = masked_zscore(dense), masked_zscore(bm25)
        return {"query_vectors": q, "dense": dense, "bm25": bm25, "coverage": coverage,
                "dense_z": dense_z, "bm25_z": bm25_z, "hybrid": self._fuse(dense_z, bm25_z),
                "corrections": read["corrections"]}

    def _fuse(self, dense_z: tf.Tensor, bm25_z: tf.Tensor) -> tf.Tensor:
        return fuse_hybrid(dense_z, bm25_z, self.hybrid_weight)

    def _dense_top(self, q: tf.Tensor, keep, nprobe: Optional[tf.Tensor],
                   count: Optional[int] = None, pool: int = 0):
        """Each query's `count` (default `candidates`) best dense scores and rows (-1 /
        -inf past the products found), with fn(rows [B, M], their vectors [B, M, H]) ->
        their dense scores and catalog z-scores, [B, M] each; and with `pool` > 0 the
        same pass's best `pool` (scores, rows [B, P] in any order, their vectors
        [B, P, H] when the pass gathered them, else None), else None."""
        k = min(count or self.candidates, self.num_products)
        if self.coarse_dims and self.ivf is None:
            return self._coarse_top(q, keep, k, pool)
        width = max(k, min(pool, self.num_products))
        if self.ivf is None:
            dense = table_scores(self.product_vectors, q)  # [B, N]
            candidates = dense
            if keep is not None:
                candidates = tf.where(keep(tf.range(self.num_products)), dense, -1e9)
            top, rows = tf.math.top_k(candidates, width)
            z = masked_zscore(dense)

            def scores(r, vectors):
                return tf.gather(dense, r, batch_dims=1), tf.gather(z, r, batch_dims=1)
        else:
            top, rows = self.ivf.search(q, self.product_vectors, width, nprobe, keep=keep)
            rows, scores = tf.cast(rows, tf.int32), self._z_of_moments(q)
        return top[:, :k], rows[:, :k], scores, (top, rows, None) if pool else None

    def dense_rows(self, query_vectors: tf.Tensor, count: int) -> tf.Tensor:
        """[B, count] catalog rows of the dense retriever's list for query vectors, by the
        first pass set (exact, IVF at its own nprobe, or coarse; -1 past those found)."""
        return self._dense_top(query_vectors, None, None, count)[1]

    def _z_of_moments(self, q: tf.Tensor):
        """fn(rows, vectors) -> dense scores and their catalog z-scores from the stored
        moments (exact without scoring the catalog)."""
        mean = tf.linalg.matvec(q, self.dense_mean)[:, tf.newaxis]  # [B, 1]
        std = tf.sqrt(tf.reduce_sum(tf.matmul(q, self.dense_cov) * q, axis=1) + 1e-9)

        def scores(r, vectors):
            dense = tf.reduce_sum(vectors * q[:, tf.newaxis], -1)
            return dense, (dense - mean) / std[:, tf.newaxis]

        return scores

    def _coarse_top(self, q: tf.Tensor, keep, k: int, pool: int = 0):
        """`_dense_top` through the coarse pass (`set_coarse`): the shortlist's exact
        scores; the pool (best `pool` of the shortlist) keeps its gathered vectors."""
        coarse = table_scores(self.coarse_vectors, tf.matmul(q, self.coarse_basis))
        if keep is not None:
            coarse = tf.where(keep(tf.range(self.num_products)), coarse, -1e9)
        width = min(max(k, pool, self.coarse_shortlist), self.num_products)
        _, short = tf.math.top_k(coarse, width)
        vectors = catalog_rows(self.product_vectors, short)  # [B, S, H]
        exact = tf.reduce_sum(vectors * q[:, tf.newaxis], -1)
        if keep is not None:
            exact = tf.where(keep(short), exact, -1e9)
        top, order = tf.math.top_k(exact, k)
        longer = None
        if pool and min(pool, self.num_products) < width:
            best, picked = tf.math.top_k(exact, min(pool, self.num_products))
            longer = (best, tf.gather(short, picked, batch_dims=1),
                      tf.gather(vectors, picked, batch_dims=1))
        elif pool:
            longer = (exact, short, vectors)  # the whole shortlist, unsorted
        return top, tf.gather(short, order, batch_dims=1), self._z_of_moments(q), longer

    def retrieve(self, queries: tf.Tensor, nprobe: Optional[tf.Tensor] = None,
                 extra: Optional[int] = None) -> Dict[str, tf.Tensor]:
        """Union of the two-tower and BM25 top lists, [B, 2 * candidates + extra] with
        features.

        Slots of BM25 results already in the two-tower list, or scoring 0 (no query word
        in the title), are invalid (row -1). With an IVF index (`set_index`) the two-tower
        list comes from the `nprobe` [B] best lists (default: the index's own). The last
        `extra` slots (default `feedback_extra`) hold what the feedback query retrieves
        beyond both lists (`_feedback_rows`), among the first pass's top `feedback_pool`
        products when that is > 0.
        """
        extra = self.feedback_extra if extra is None else int(extra)
        read = self.read_queries(queries)
        q = self.two_tower.query_vectors(read["dense"], training=False)
        bm25, coverage, query_terms = self.lexical.scores_coverage_and_terms(read["lexical"])
        k = self.candidates
        probs, keep = None, None
        if self.category_head is not None:
            probs = self.category_probs(q)
            if self.category_filter > 0:
                keep = self._category_keep(probs)
        # With a feedback pool: one dense pass, longer (its best `feedback_pool` kept).
        dense_top, dense_rows, dense_of, pool = self._dense_top(
            q, keep, nprobe, pool=self.feedback_pool if extra > 0 else 0)
        bm25_all = bm25 if keep is None else tf.where(
            keep(tf.range(self.num_products)), bm25, -1e9)
        bm25_top, bm25_rows = tf.math.top_k(bm25_all, k)
        same = tf.logical_and(  # [B, k, k]; -1 (no product found) matches nothing
            tf.equal(dense_rows[:, :, tf.newaxis], bm25_rows[:, tf.newaxis, :]),
            dense_rows[:, :, tf.newaxis] >= 0)
        in_bm25 = tf.reduce_any(same, axis=2)
        in_dense = tf.reduce_any(same, axis=1)
        positions = tf.range(k)[tf.newaxis, :]
        rows = tf.concat([dense_rows, bm25_rows], axis=1)
        # Filtered-out products (-1e9) fill a dense list only when too few remain.
        valid = tf.concat([dense_top > -1e8, tf.logical_and(~in_dense, bm25_top > 0)], 1)
        dense_rank = tf.concat([tf.broadcast_to(positions, tf.shape(dense_rows)),
                                tf.fill(tf.shape(bm25_rows), k)], axis=1)
        bm25_pos = tf.where(in_bm25, tf.argmax(tf.cast(same, tf.int32), axis=2,
                                                output_type=tf.int32), k)
        bm25_rank = tf.concat([bm25_pos, tf.broadcast_to(positions, tf.shape(bm25_rows))], 1)
        bm25_z = masked_zscore(bm25)

        def scored(slots: tf.Tensor):
            """safe rows, vectors (gathered once: scores and ranker input), dense, hybrid."""
            safe = tf.maximum(slots, 0)
            vectors = catalog_rows(self.product_vectors, safe)
            dense, dense_z = dense_of(safe, vectors)
            return safe, vectors, dense, self._fuse(dense_z,
                                                    tf.gather(bm25_z, safe, batch_dims=1))

        safe, vectors, dense, hybrid = scored(rows)
        if extra > 0:
            more = self._feedback_rows(q, tf.where(valid, rows, -1), valid, hybrid, vectors,
                                       keep, nprobe, extra, pool)
            rows, safe, vectors, dense, hybrid = (
                tf.concat(pair, 1) for pair in zip((rows, safe, vectors, dense, hybrid),
                                                   (more, *scored(more))))
            absent = tf.fill(tf.shape(more), k)  # in neither retriever's top list
            valid = tf.concat([valid, more >= 0], 1)
            dense_rank = tf.concat([dense_rank, absent], 1)
            bm25_rank = tf.concat([bm25_rank, absent], 1)
        gathered = {"dense": dense, "bm25": tf.gather(bm25, safe, batch_dims=1),
                    "coverage": tf.gather(coverage, safe, batch_dims=1), "hybrid": hybrid}
        category = None
        if probs is not None:
            category = self._product_category_probs(probs, rows)
        title_terms = tf.gather(self.title_terms, safe)
        matched = gathered["coverage"] * tf.maximum(query_terms, 1.0)[:, tf.newaxis]
        features = candidate_features(
            gathered["dense"], gathered["bm25"], gathered["coverage"], gathered["hybrid"],
            dense_rank, bm25_rank, valid, category_prob=category,
            title_coverage=matched / tf.maximum(title_terms, 1.0), query_terms=query_terms,
            title_terms=title_terms)[..., :self.ranker_features]
        return {"rows": tf.where(valid, rows, -1), "valid": valid, "features": features,
                "query_vectors": q, "corrections": read["corrections"],
                "category_probs": probs,
                "product_vectors": vectors,
                **gathered}

    def _feedback_rows(self, q: tf.Tensor, rows: tf.Tensor, valid: tf.Tensor,
                       hybrid: tf.Tensor, vectors: tf.Tensor, keep,
                       nprobe: Optional[tf.Tensor], extra: int,
                       pool: Optional[Tuple[tf.Tensor, tf.Tensor, Optional[tf.Tensor]]] = None
                       ) -> tf.Tensor:
        """[B, extra] rows the feedback query ranks highest among products in neither
        list (-1 past those found), by the same exact or IVF search as the first list,
        or among the `pool` products only.

        Args:
          rows: [B, C] the union's rows, -1 in invalid slots.
          pool: the first dense pass's longer list (scores, rows [B, P], their vectors
            [B, P, H] or None: gathered here); None: search the catalog again.
        """
        fq = feedback_query(q, feedback_centroid(hybrid, vectors, valid, self.feedback_top))
        width = min(extra + 2 * self.candidates, self.num_products)  # the union is <= 2k
        if pool is None:
            top, found, _, _ = self._dense_top(fq, keep, nprobe, width)
        else:
            pool_top, pool_rows, pool_vectors = pool
            if pool_vectors is None:
                pool_vectors = catalog_rows(self.product_vectors, tf.maximum(pool_rows, 0))
            scores = tf.reduce_sum(pool_vectors * fq[:, tf.newaxis], axis=-1)
            scores = tf.where(tf.logical_and(pool_rows >= 0, pool_top > -1e8), scores, -1e9)
            top, order = tf.math.top_k(scores, tf.minimum(width, tf.shape(pool_rows)[1]))
            found = tf.gather(pool_rows, order, batch_dims=1)
        listed = tf.reduce_any(tf.equal(found[:, :, tf.newaxis], rows[:, tf.newaxis, :]), 2)
        new = tf.logical_and(tf.logical_and(found >= 0, top > -1e8), tf.logical_not(listed))
        # The first `extra` new rows in the feedback query's order.
        order = tf.argsort(tf.where(new, 0, 1), axis=1, stable=True)[:, :extra]
        picked = tf.gather(found, order, batch_dims=1)
        picked = tf.where(tf.gather(new, order, batch_dims=1), picked, -1)
        short = extra - tf.shape(picked)[1]  # a catalog smaller than the lists
        return tf.pad(picked, [[0, 0], [0, short]], constant_values=-1)

    def _category_keep(self, probs: tf.Tensor):
        """fn(rows) -> bool: whether each row's category is likely enough for its query
        (rows [N] -> [B, N], or [B, M] -> [B, M]; products of unknown category are kept)."""
        allowed = probs >= self.category_filter * tf.reduce_max(probs, axis=1, keepdims=True)
        allowed = tf.concat([allowed, tf.ones_like(allowed[:, :1])], axis=1)
        unknown = tf.shape(probs)[1]

        def keep(rows):
            categories = tf.gather(self.product_categories, rows)
            slots = tf.where(categories >= 0, categories, unknown)
            if rows.shape.rank == 1:
                return tf.gather(allowed, slots, axis=1)
            return tf.gather(allowed, slots, batch_dims=1)

        return keep

    @contextlib.contextmanager
    def feedback_settings(self, extra: Optional[int] = None, weight: Optional[float] = None,
                          pool: Optional[int] = None) -> Iterator[None]:
        """Runs the block with other feedback products / weight / pool (None: unchanged),
        then restores all three (also what the block set itself): the paired "without
        feedback" measurements of one pipeline."""
        saved = self.feedback_extra, self.feedback_weight, self.feedback_pool
        if extra is not None:
            self.feedback_extra = int(extra)
        if weight is not None:
            self.feedback_weight = float(weight)
        if pool is not None:
            check_feedback_pool(pool, self.candidates)
            self.feedback_pool = int(pool)
        try:
            yield
        finally:
            self.feedback_extra, self.feedback_weight, self.feedback_pool = saved

    @property
    def list_width(self) -> int:
        """Candidate slots `retrieve` returns per query: both lists + the feedback's."""
        return 2 * self.candidates + self.feedback_extra

    def ranker_inputs(self, retrieved: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        return {k: retrieved[k] for k in ("query_vectors", "product_vectors", "features",
                                          "valid")}

    def ranked_scores(self, retrieved: Dict[str, tf.Tensor],
                      feedback_weight: float) -> tf.Tensor:
        """[B, C] final scores of retrieved candidates: ranker logits, or with a feedback
        weight > 0 the ranker's head and the feedback-ordered tail (`feedback_scores`)."""
        return self.with_feedback(self.ranker(self.ranker_inputs(retrieved), training=False),
                                  retrieved, feedback_weight)

    def with_feedback(self, logits: tf.Tensor, retrieved: Dict[str, tf.Tensor],
                      feedback_weight: float) -> tf.Tensor:
        """The ranker's [B, C] `logits` of `retrieved` with the feedback at this weight
        (unchanged at 0): one ranker pass serves every weight tried."""
        if feedback_weight <= 0:
            return logits
        return feedback_scores(logits, retrieved["hybrid"], retrieved["product_vectors"],
                               retrieved["valid"], feedback_weight, self.feedback_keep,
                               self.feedback_top)

    def search(self, queries: tf.Tensor, num_results: int = 10,
               nprobe: Optional[tf.Tensor] = None) -> Dict[str, tf.Tensor]:
        """Top `num_results` products per query after re-ranking the retrieved union.

        Returns rows [B, n] (-1 past the valid candidates), product_ids, titles, scores
        (`ranked_scores`, or hybrid without a ranker) and the dense / bm25 / hybrid
        scores of the same products, corrected_words [B] (the speller's corrections,
        "" if none), query_category [B] and query_category_prob [B] (the classifier's most
        probable category; "" and 0 without one).
        """
        r = self.retrieve(queries, nprobe)
        if self.ranker is not None:
            scores = self.ranked_scores(r, self.feedback_weight)
        else:
            scores = tf.where(r["valid"], r["hybrid"], -1e9)
        n = tf.minimum(num_results, tf.shape(scores)[1])
        top, order = tf.math.top_k(scores, n)
        rows = tf.gather(r["rows"], order, batch_dims=1)
        found = rows >= 0
        safe = tf.maximum(rows, 0)
        out = {"rows": rows, "scores": tf.where(found, top, 0.0),
               "product_ids": tf.where(found, tf.gather(self.product_ids, safe), ""),
               "titles": tf.where(found, tf.gather(self.titles, safe), "")}
        for name in ("dense", "bm25", "hybrid"):
            out[f"{name}_scores"] = tf.where(found, tf.gather(r[name], order, batch_dims=1), 0.0)
        out["corrected_words"] = r["corrections"]
        if r["category_probs"] is None:
            out["query_category"] = tf.fill(tf.shape(r["corrections"]), "")
            out["query_category_prob"] = tf.zeros(tf.shape(r["corrections"]), tf.float32)
        else:
            out["query_category"] = tf.gather(self.category_names,
                                              tf.argmax(r["category_probs"], axis=1))
            out["query_category_prob"] = tf.reduce_max(r["category_probs"], axis=1)
        return out


def _moments(vectors: tf.Variable, chunk: int = 65536):
    """Mean [H] and covariance [H, H] (float32, summed in float64) of the rows of
    `vectors`, a chunk at a time."""
    n = int(vectors.shape[0])
    total, outer = 0.0, 0.0
    for start in range(0, n, chunk):
        part = vectors[start:start + chunk].numpy().astype(np.float64)
        total = total + part.sum(axis=0)
        outer = outer + part.T @ part
    mean = total / max(n, 1)
    cov = outer / max(n, 1) - np.outer(mean, mean)
    return mean.astype(np.float32), cov.astype(np.float32)
