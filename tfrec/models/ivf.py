"""Inverted-file (IVF) top-k in core TensorFlow ops: sub-linear retrieval in a SavedModel.

Exact top-k reads every catalog row per query. An IVF index clusters the catalog once
(spherical k-means), and a query scores only the members of the `nprobe` clusters whose
centroids match it best. Only core ops, so stock TF Serving loads it (ScaNN's it cannot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.features.quantize import catalog_rows

__all__ = ["IvfPlan", "IvfIndex", "build_ivf", "default_nlist", "train_centroids",
           "assign_lists"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class IvfPlan:
    """A clustered catalog: list j holds catalog rows `order[offsets[j]:offsets[j + 1]]`.

    Storing the catalog in `order` makes every list one contiguous block of rows.
    """

    centroids: np.ndarray  # [nlist, d] float32, unit norm
    order: np.ndarray  # [N] int64, catalog rows sorted by list
    offsets: np.ndarray  # [nlist + 1] int64

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def default_nlist(num_items: int) -> int:
    """About 4 * sqrt(N) lists (a few hundred items each at 1M), at least 1."""
    return max(1, min(num_items, int(round(4 * math.sqrt(num_items)))))


def _unit(x: tf.Tensor) -> tf.Tensor:
    return tf.math.l2_normalize(x, axis=-1)


@tf.function(reduce_retracing=True)
def _nearest(vectors: tf.Tensor, centroids: tf.Tensor) -> tf.Tensor:
    return tf.argmax(tf.matmul(vectors, centroids, transpose_b=True), axis=1,
                     output_type=tf.int64)


def assign_lists(vectors: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the best-matching (largest inner product) centroid of each vector.

    Chunked: a [N, nlist] score matrix at 1M x 4k would need 16 GB.
    """
    c = tf.constant(centroids, tf.float32)
    out = [(_nearest(tf.constant(vectors[i:i + chunk], tf.float32), c)).numpy()
           for i in range(0, len(vectors), chunk)]
    return np.concatenate(out) if out else np.zeros([0], np.int64)


def _lloyd_step(sample: np.ndarray, centroids: np.ndarray, chunk: int) -> np.ndarray:
    """One spherical k-means update; an emptied cluster keeps its centroid.

    Assignments go chunk by chunk: the whole [sample, nlist] score matrix is 4 GB at
    1M items (256k sampled vectors x 4,000 lists).
    """
    lists = assign_lists(sample, centroids, chunk=chunk)
    nlist = len(centroids)
    sums = tf.math.unsorted_segment_sum(sample, lists, nlist)
    counts = np.bincount(lists, minlength=nlist)
    return tf.where(counts[:, None] > 0, _unit(sums), centroids).numpy()


def train_centroids(vectors: np.ndarray, nlist: int, iterations: int = 10,
                    sample_per_list: int = 64, seed: int = 0,
                    chunk: int = 8192) -> np.ndarray:
    """Spherical k-means centroids over a seeded sample of the vectors.

    Args:
      vectors: [N, d] embeddings.
      nlist: number of clusters (1 <= nlist <= N).
      iterations: Lloyd iterations.
      sample_per_list: training sample size per cluster (the full set if smaller):
        bounds build time at millions of items.
      seed: sampling and initialisation seed (same seed, same index).
      chunk: sampled vectors assigned at a time (bounds memory, not the result).

    Returns:
      [nlist, d] float32 unit-norm centroids.

    Raises:
      ValueError: for nlist outside [1, N] or iterations < 0.
    """
    n = len(vectors)
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be between 1 and the number of vectors ({n}), "
                         f"got {nlist}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    rng = np.random.RandomState(seed)
    take = min(n, max(nlist, nlist * sample_per_list))
    sample = np.asarray(vectors)[np.sort(rng.choice(n, take, replace=False))]
    sample = _unit(tf.constant(sample, tf.float32)).numpy()
    centroids = sample[rng.choice(take, nlist, replace=False)]
    for _ in range(iterations):
        centroids = _lloyd_step(sample, centroids, chunk)
    return centroids.astype(np.float32)


def build_ivf(vectors: np.ndarray, nlist: Optional[int] = None, iterations: int = 10,
              seed: int = 0) -> IvfPlan:
    """Clusters `vectors` into `nlist` lists (default `default_nlist(N)`)."""
    nlist = default_nlist(len(vectors)) if nlist is None else int(nlist)
    centroids = train_centroids(vectors, nlist, iterations=iterations, seed=seed)
    lists = assign_lists(vectors, centroids)
    order = np.argsort(lists, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))])
    return IvfPlan(centroids=centroids, order=order, offsets=offsets.astype(np.int64))


class IvfIndex(tf.Module):
    """Top-k over catalog rows stored in IVF order (see `IvfPlan.order`).

    The embeddings are not held here: the caller keeps one catalog-sized table, in list
    order, and passes it to `search`, so the export carries no second copy.

    Args:
      plan: the clustering, built over the same embeddings.
      nprobe: lists scored when a request does not say (1 <= nprobe <= nlist).
      catalog_rows: the embeddings stay in catalog order and rows come back as catalog
        rows, through the list members kept here (N int64). For callers whose other
        catalog tables are row-aligned (search's BM25 postings); gathers are scattered.

    Raises:
      ValueError: for nprobe outside [1, nlist].
    """

    def __init__(self, plan: IvfPlan, nprobe: int, catalog_rows: bool = False,
                 name: str = "ivf_index"):
        super().__init__(name=name)
        if not 1 <= int(nprobe) <= plan.nlist:
            raise ValueError(f"nprobe must be between 1 and nlist ({plan.nlist}), "
                             f"got {nprobe}")
        self.nlist = plan.nlist
        self.nprobe = int(nprobe)
        self.centroids = tf.Variable(plan.centroids, trainable=False, name="centroids")
        self.starts = tf.Variable(plan.offsets[:-1], trainable=False, name="list_starts")
        self.sizes = tf.Variable(plan.sizes, trainable=False, name="list_sizes")
        self.members = (tf.Variable(plan.order, trainable=False, name="list_members")
                        if catalog_rows else None)

    def check_nprobe(self, nprobe: tf.Tensor) -> list:
        """In-graph checks (InvalidArgumentError, INVALID_ARGUMENT over gRPC)."""
        message = f"nprobe must be between 1 and {self.nlist} (the index's lists)"
        return [tf.debugging.assert_greater_equal(nprobe, 1, message=message),
                tf.debugging.assert_less_equal(nprobe, self.nlist, message=message)]

    def candidates(self, queries: tf.Tensor, nprobe: tf.Tensor) -> tf.RaggedTensor:
        """[B, (M)] rows of the `nprobe[b]` best lists of each query (IVF order, or
        catalog rows with `catalog_rows`)."""
        probe = tf.reduce_max(nprobe)
        lists = tf.math.top_k(tf.matmul(queries, self.centroids, transpose_b=True),
                              k=probe).indices  # [B, P]
        keep = tf.range(probe)[tf.newaxis, :] < nprobe[:, tf.newaxis]
        sizes = tf.where(keep, tf.gather(self.sizes, lists), tf.constant(0, tf.int64))
        starts = tf.gather(self.starts, lists)
        ranges = tf.ragged.range(tf.reshape(starts, [-1]), tf.reshape(starts + sizes, [-1]))
        rows = ranges.flat_values
        if self.members is not None:
            rows = tf.gather(self.members, rows)
        return tf.RaggedTensor.from_row_lengths(rows, tf.reduce_sum(sizes, axis=1))

    def search(self, queries: tf.Tensor, embeddings: tf.Variable, k: tf.Tensor,
               nprobe: Optional[tf.Tensor] = None, eligible: Optional[tf.Variable] = None,
               keep: Optional[Callable[[tf.Tensor], tf.Tensor]] = None
               ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Top-k catalog rows among the probed lists, scored exactly.

        Args:
          queries: [B, d] query embeddings.
          embeddings: [N, d] catalog embeddings in IVF order (a variable or a
            `QuantizedTable`).
          k: scalar number of results.
          nprobe: [B] lists per query (default: the configured nprobe).
          eligible: optional [N] bool; ineligible rows never come back.
          keep: optional per-query filter, rows [B, M] (>= 0) -> bool [B, M]; rows it
            rejects never come back.

        Returns:
          scores [B, k] (-inf past the candidates) and rows [B, k] int64 (-1 there).
        """
        queries = tf.cast(queries, tf.float32)
        if nprobe is None:
            nprobe = tf.fill([tf.shape(queries)[0]], self.nprobe)
        cand = self.candidates(queries, tf.cast(nprobe, tf.int32))
        rows = cand.to_tensor(default_value=-1)  # [B, M]
        vectors = tf.cast(catalog_rows(embeddings, tf.maximum(rows, 0)), tf.float32)
        scores = tf.linalg.matvec(vectors, queries)  # [B, M]
        valid = rows >= 0
        if eligible is not None:
            valid = tf.logical_and(valid, tf.gather(eligible, tf.maximum(rows, 0)))
        if keep is not None:
            valid = tf.logical_and(valid, keep(tf.maximum(rows, 0)))
        scores = tf.where(valid, scores, NEG_INF)
        # top_k needs at least k columns: pad with never-chosen slots.
        short = tf.maximum(k - tf.shape(scores)[1], 0)
        scores = tf.pad(scores, [[0, 0], [0, short]], constant_values=NEG_INF)
        rows = tf.pad(rows, [[0, 0], [0, short]], constant_values=-1)
        values, top = tf.math.top_k(scores, k=k)
        top_rows = tf.gather(rows, top, batch_dims=1)
        return values, tf.where(values > NEG_INF, top_rows, tf.constant(-1, tf.int64))
