"""The top-k an export serves: exact, or an IVF index tuned and measured on real queries.

Exact top-k costs one pass over the catalog per query; at a million items that is the
latency budget. `export.index` picks exact or IVF (core TF ops, so stock TF Serving runs
it); `nprobe` is chosen as the smallest that reaches the target recall against exact
search on validation queries, and that recall goes into the model card.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.models.ivf import IvfIndex, IvfPlan, build_ivf, default_nlist

__all__ = ["INDEX_KINDS", "IndexChoice", "CatalogIndex", "IndexSearch", "choose_index",
           "index_recall", "exact_top_k", "wants_ivf"]

INDEX_KINDS = ("exact", "ivf", "auto")
NEG_INF = float("-inf")
NPROBE_SPEC = tf.TensorSpec([None], tf.int32, name="nprobe")
log = logging.getLogger(__name__)


@dataclass
class IndexChoice:
    """The index to build: `plan` None means exact top-k. `card` goes to the model card."""

    plan: Optional[IvfPlan]
    nprobe: int = 0
    card: Dict = field(default_factory=lambda: {"index": "exact"})


def wants_ivf(cfg: ExportConfig, num_items: int) -> bool:
    """Whether `cfg.index` asks for an IVF index over `num_items` items."""
    return cfg.index == "ivf" or (cfg.index == "auto" and num_items >= cfg.index_min_items)


def _check(cfg: ExportConfig) -> None:
    if cfg.index not in INDEX_KINDS:
        raise ValueError(f"export.index must be one of {', '.join(INDEX_KINDS)}, "
                         f"got {cfg.index!r}")
    for name in ("nlist", "nprobe", "index_min_items"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"export.{name} must be >= 0 (0: automatic), "
                             f"got {getattr(cfg, name)}")
    for name in ("index_target_recall", "index_recall_floor"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"export.{name} must be in [0, 1], got {getattr(cfg, name)}")


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int,
                chunk: int = 32) -> np.ndarray:
    """[Q, k] rows of the exact top-k by inner product (chunked over queries)."""
    table = tf.constant(embeddings, tf.float32)
    k = min(k, len(embeddings))
    out = [tf.math.top_k(tf.matmul(tf.constant(queries[i:i + chunk], tf.float32), table,
                                   transpose_b=True), k=k).indices.numpy()
           for i in range(0, len(queries), chunk)]
    return np.concatenate(out) if out else np.zeros([0, k], np.int64)


def _overlap(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    k = min(k, truth.shape[1])
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def index_recall(index: IvfIndex, embeddings: tf.Variable, queries: np.ndarray,
                 truth: np.ndarray, nprobe: int, chunk: int = 16) -> Dict[str, float]:
    """recall@10 / @100 of the index's top lists against exact top lists `truth`."""
    k = truth.shape[1]
    search = tf.function(lambda q, p: index.search(q, embeddings, k, p)[1])
    found = []
    for i in range(0, len(queries), chunk):
        q = tf.constant(queries[i:i + chunk], tf.float32)
        found.append(search(q, tf.fill([tf.shape(q)[0]], nprobe)).numpy())
    found = np.concatenate(found)
    return {f"recall@{c}": round(_overlap(found, truth, c), 4) for c in (10, 100) if c <= k}


def choose_index(embeddings: np.ndarray, queries: Optional[np.ndarray], cfg: ExportConfig,
                 query_source: str = "validation users", seed: int = 0) -> IndexChoice:
    """Exact or IVF for this catalog; for IVF, the plan and a measured nprobe.

    Args:
      embeddings: [N, d] catalog embeddings (catalog row order).
      queries: [Q, d] query embeddings to measure recall on (None: a seeded sample of
        the catalog's own embeddings stands in, and the card says so).
      cfg: export settings (index, nlist, nprobe, target recall, floor).
      query_source: what `queries` are, for the card.
      seed: k-means seed.

    Returns:
      An IndexChoice; its card has the build time and recall vs exact search.

    Raises:
      ValueError: for bad settings (unknown index, negative sizes, recall outside [0, 1],
        nprobe > nlist).
    """
    _check(cfg)
    n = len(embeddings)
    if not wants_ivf(cfg, n):
        return IndexChoice(plan=None)
    nlist = cfg.nlist or default_nlist(n)
    if n < 2 * nlist:
        log.info("catalog of %d items is too small for %d IVF lists: exact top-k", n, nlist)
        return IndexChoice(plan=None, card={"index": "exact", "note": (
            f"ivf asked for, but {n} items < 2 x nlist ({nlist}): exact top-k")})
    if cfg.nprobe > nlist:
        raise ValueError(f"export.nprobe ({cfg.nprobe}) must be <= nlist ({nlist})")
    start = time.perf_counter()
    plan = build_ivf(embeddings, nlist, seed=seed)
    build_seconds = time.perf_counter() - start
    if queries is None or len(queries) == 0:
        rng = np.random.RandomState(seed)
        queries = embeddings[rng.choice(n, min(n, 1000), replace=False)]
        query_source = "catalog items (no validation queries)"
    ordered = tf.constant(embeddings[plan.order], tf.float32)
    truth = exact_top_k(queries, embeddings[plan.order], 100)
    ladder = {}
    candidates = [cfg.nprobe] if cfg.nprobe else [min(nlist, 2 ** i) for i in range(64)
                                                  if 2 ** (i - 1) < nlist]
    index = IvfIndex(plan, nprobe=1)
    for nprobe in candidates:
        ladder[nprobe] = index_recall(index, ordered, queries, truth, nprobe)
        if ladder[nprobe]["recall@100"] >= cfg.index_target_recall:
            break
    nprobe = max(ladder)
    recall = ladder[nprobe]
    if recall["recall@100"] < cfg.index_recall_floor:
        log.warning("IVF index recall@100 vs exact is %.3f at nprobe %d, below the floor "
                    "%.2f: raise export.nprobe or use export.index=exact",
                    recall["recall@100"], nprobe, cfg.index_recall_floor)
    sizes = plan.sizes
    card = {"index": "ivf", "nlist": nlist, "nprobe": nprobe,
            "build_seconds": round(build_seconds, 2),
            "list_sizes": {"min": int(sizes.min()), "mean": round(float(sizes.mean()), 1),
                           "max": int(sizes.max())},
            "recall_vs_exact": {**recall, "queries": int(len(queries)),
                                "source": query_source},
            "recall_by_nprobe": {str(p): r["recall@100"] for p, r in ladder.items()},
            "recall_floor": cfg.index_recall_floor,
            "below_floor": recall["recall@100"] < cfg.index_recall_floor}
    log.info("IVF index: %d lists, nprobe %d, recall@100 vs exact %.3f (%d %s), built in "
             "%.1f s", nlist, nprobe, recall["recall@100"], len(queries), query_source,
             build_seconds)
    return IndexChoice(plan=plan, nprobe=nprobe, card=card)


def in_index_order(choice: IndexChoice, *arrays):
    """Catalog arrays (or dicts of arrays) re-ordered so each IVF list is contiguous."""
    if choice.plan is None:
        return arrays if len(arrays) > 1 else arrays[0]
    order = choice.plan.order

    def reorder(a):
        if isinstance(a, dict):
            return {k: np.asarray(v)[order] for k, v in a.items()}
        return None if a is None else np.asarray(a)[order]

    out = tuple(reorder(a) for a in arrays)
    return out if len(out) > 1 else out[0]


class CatalogIndex(tf.Module):
    """Top-k catalog rows for query embeddings, exact or IVF, with rows masked out.

    Args:
      embeddings: [N, d] catalog embeddings, already `in_index_order`.
      choice: from `choose_index`.
    """

    def __init__(self, embeddings: np.ndarray, choice: IndexChoice):
        super().__init__(name="catalog_index")
        self.num_items = len(embeddings)
        self.item_embeddings = tf.Variable(np.asarray(embeddings, np.float32), trainable=False,
                                           name="item_embeddings")
        self.ivf = IvfIndex(choice.plan, choice.nprobe) if choice.plan is not None else None

    @property
    def is_ivf(self) -> bool:
        return self.ivf is not None

    def check_nprobe(self, nprobe: tf.Tensor) -> list:
        return self.ivf.check_nprobe(nprobe) if self.ivf is not None else []

    def top_k(self, queries: tf.Tensor, width: tf.Tensor, blocked: Optional[tf.Tensor] = None,
              eligible: Optional[tf.Variable] = None, nprobe: Optional[tf.Tensor] = None
              ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Best `width` rows per query, never a blocked or ineligible one.

        Args:
          queries: [B, d].
          width: scalar results per query.
          blocked: [B, X] int64 catalog rows to leave out (-1 pads).
          eligible: [N] bool (False rows never come back).
          nprobe: [B] IVF lists per query (ignored by exact search).

        Returns:
          scores [B, width] (-inf past the results) and rows [B, width] (-1 there).
        """
        if self.ivf is None:
            scores = tf.matmul(queries, self.item_embeddings, transpose_b=True)  # [B, N]
            if eligible is not None:
                scores = tf.where(eligible[tf.newaxis, :], scores, NEG_INF)
            if blocked is not None:
                batch = tf.broadcast_to(tf.range(tf.shape(blocked)[0], dtype=tf.int64)[:, None],
                                        tf.shape(blocked))
                mask = blocked >= 0
                coords = tf.stack([tf.boolean_mask(batch, mask), tf.boolean_mask(blocked, mask)],
                                  axis=1)
                scores = tf.tensor_scatter_nd_update(
                    scores, coords, tf.fill([tf.shape(coords)[0]], NEG_INF))
            values, rows = tf.math.top_k(scores, k=width)
            rows = tf.cast(rows, tf.int64)
            return values, tf.where(values > NEG_INF, rows, tf.constant(-1, tf.int64))
        if blocked is None:
            return self.ivf.search(queries, self.item_embeddings, width, nprobe, eligible)
        # Fetch enough that dropping every blocked row still leaves `width`.
        extra = tf.shape(blocked)[1]
        values, rows = self.ivf.search(queries, self.item_embeddings, width + extra, nprobe,
                                       eligible)
        hit = tf.reduce_any(tf.logical_and(
            tf.equal(rows[:, :, tf.newaxis], blocked[:, tf.newaxis, :]),
            blocked[:, tf.newaxis, :] >= 0), axis=2)
        values = tf.where(hit, NEG_INF, values)
        values, top = tf.math.top_k(values, k=width)
        rows = tf.gather(rows, top, batch_dims=1)
        return values, tf.where(values > NEG_INF, rows, tf.constant(-1, tf.int64))


class IndexSearch:
    """Offline top-k through the index an export would serve (`retrieve_with_scores`).

    Evaluation must measure what is served: with an IVF export, the lists come from the
    IVF index, built (and nprobe tuned) as the export builds it. The index is built on
    first use and rebuilt only when the catalog embeddings change.

    Args:
      cfg: export settings (index, nlist, nprobe, target recall).
      tune_queries: [Q, d] validation query embeddings nprobe is tuned on.
    """

    def __init__(self, cfg: ExportConfig, tune_queries: Optional[np.ndarray] = None):
        _check(cfg)
        self.cfg, self.tune_queries = cfg, tune_queries
        self._embeddings: Optional[np.ndarray] = None
        self.card: Dict = {}

    def _build(self, embeddings: np.ndarray) -> None:
        choice = choose_index(embeddings, self.tune_queries, self.cfg)
        self.card = choice.card
        self._order = (choice.plan.order if choice.plan is not None
                       else np.arange(len(embeddings), dtype=np.int64))
        self._position = np.empty_like(self._order)
        self._position[self._order] = np.arange(len(self._order))
        self._index = CatalogIndex(embeddings[self._order], choice)
        self._top_k = tf.function(
            lambda q, k, blocked: self._index.top_k(q, k, blocked=blocked),
            input_signature=[tf.TensorSpec([None, embeddings.shape[1]], tf.float32),
                             tf.TensorSpec([], tf.int32),
                             tf.TensorSpec([None, None], tf.int64)])
        self._embeddings = embeddings

    def __call__(self, queries: np.ndarray, embeddings: np.ndarray, k: int,
                 excluded: Optional[Sequence[Sequence[int]]] = None, chunk: int = 256
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """Catalog rows [U, k] (-1 past the results) and scores of each query's top-k.

        Args:
          queries: [U, d] query embeddings.
          embeddings: [N, d] catalog embeddings (catalog row order).
          k: results per query.
          excluded: per query, catalog rows never to return.
          chunk: queries per call.
        """
        if self._embeddings is None or not (
                self._embeddings.shape == embeddings.shape
                and np.array_equal(self._embeddings, embeddings)):
            self._build(np.asarray(embeddings, np.float32))
        rows_out, scores_out = [], []
        for start in range(0, len(queries), chunk):
            q = np.asarray(queries[start:start + chunk], np.float32)
            lists = excluded[start:start + chunk] if excluded is not None else [[]] * len(q)
            width = max([1] + [len(r) for r in lists])
            blocked = np.full([len(q), width], -1, np.int64)
            for i, r in enumerate(lists):
                blocked[i, :len(r)] = self._position[np.asarray(list(r), np.int64)]
            values, rows = self._top_k(tf.constant(q), tf.constant(k, tf.int32),
                                       tf.constant(blocked))
            rows = rows.numpy()
            rows_out.append(np.where(rows >= 0, self._order[np.maximum(rows, 0)], -1))
            scores_out.append(values.numpy())
        return np.concatenate(rows_out), np.concatenate(scores_out)
