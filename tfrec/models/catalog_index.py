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
from typing import Dict, Optional, Sequence, Set, Tuple

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.features.quantize import QuantizedTable, check_precision, table_scores
from tfrec.models.ivf import IvfIndex, IvfPlan, build_ivf, default_nlist

__all__ = ["INDEX_KINDS", "IndexChoice", "CatalogIndex", "IndexSearch", "TuningQueries",
           "check_index_settings", "choose_index", "exact_top_k", "recall_vs_exact",
           "topk_overlap", "wants_ivf"]

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


def check_index_settings(cfg: ExportConfig) -> None:
    """Raises a ValueError naming the first bad index setting of `cfg`."""
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
    if cfg.nlist and cfg.nprobe > cfg.nlist:
        raise ValueError(f"export.nprobe ({cfg.nprobe}) must be <= nlist ({cfg.nlist})")


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int,
                chunk: int = 32) -> np.ndarray:
    """[Q, k] rows of the exact top-k by inner product (chunked over queries)."""
    table = tf.constant(embeddings, tf.float32)
    k = min(k, len(embeddings))
    out = [tf.math.top_k(tf.matmul(tf.constant(queries[i:i + chunk], tf.float32), table,
                                   transpose_b=True), k=k).indices.numpy()
           for i in range(0, len(queries), chunk)]
    return np.concatenate(out) if out else np.zeros([0, k], np.int64)


@dataclass
class TuningQueries:
    """Real queries an IVF index is tuned and measured on, with what each leaves out.

    Served lists skip the user's history; evaluation skips every item seen before. The
    exclusions push the kept results deeper into the ranking, so recall against exact
    search is measured with them.
    """

    embeddings: np.ndarray  # [Q, d]
    exclude: Optional[Sequence[Set[str]]] = None  # item ids left out, per query
    source: str = "validation users"


def nprobe_ladder(nlist: int) -> list:
    """nprobe values tried in turn: x sqrt(2) steps (1, 2, 3, 4, 6, 8, 11, 16, ...) up to
    nlist; latency grows about linearly in nprobe, so a finer ladder saves up to 1.4x."""
    steps, value = [], 1.0
    while int(round(value)) < nlist:
        if not steps or int(round(value)) > steps[-1]:
            steps.append(int(round(value)))
        value *= 2 ** 0.5
    return steps + [nlist]


def topk_overlap(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-k (rows [Q, >= k], -1 ignored) in its found
    top-k: an index's recall@k against exact search."""
    k = min(k, truth.shape[1])
    hits = [len(set(f[:k]) & set(t[:k]) - {-1}) / max(1, len(set(t[:k]) - {-1}))
            for f, t in zip(found, truth)]
    return float(np.mean(hits))


def recall_vs_exact(found: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    """recall@10 and recall@100 of `found` against exact search's `truth` (rounded), as
    index cards record them; below 100 items, of the whole top (what top-100 returns)."""
    return {f"recall@{k}": round(topk_overlap(found, truth, k), 4) for k in (10, 100)}


def _positions(order: np.ndarray) -> np.ndarray:
    """Inverse of an index order: catalog row -> position in the index."""
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return position


def _padded_positions(rows: Sequence[Sequence[int]], position: np.ndarray) -> np.ndarray:
    """[Q, X] index positions of each query's catalog rows (-1 pads; X >= 1)."""
    out = np.full([len(rows), max([1] + [len(r) for r in rows])], -1, np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = position[np.asarray(list(r), np.int64)]
    return out


def _excluded_rows(tuning: TuningQueries, item_ids: Optional[Sequence[str]]) -> list:
    """Catalog rows of each tuning query's excluded items (none without ids)."""
    if tuning.exclude is None or item_ids is None:
        return [[] for _ in range(len(tuning.embeddings))]
    row_of = {item: i for i, item in enumerate(item_ids)}
    return [[row_of[i] for i in items if i in row_of] for items in tuning.exclude]


def _search(index: "CatalogIndex", queries: np.ndarray, blocked: np.ndarray, k: int,
            nprobe: Optional[int] = None, exact: bool = False, chunk: int = 16
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Scores and index positions [Q, k] of each query's top-k, a few queries at a time
    (an IVF step gathers [chunk, candidates, d]; exact scores [chunk, N])."""
    search = tf.function(lambda q, b: index.top_k(
        q, k, blocked=b, exact=exact,
        nprobe=None if nprobe is None else tf.fill([tf.shape(q)[0]], nprobe)),
        reduce_retracing=True)
    values, rows = [], []
    for i in range(0, len(queries), chunk):
        v, r = search(tf.constant(queries[i:i + chunk], tf.float32),
                      tf.constant(blocked[i:i + chunk]))
        values.append(v.numpy())
        rows.append(r.numpy())
    return np.concatenate(values), np.concatenate(rows)


def choose_index(embeddings: np.ndarray, tuning: Optional[TuningQueries], cfg: ExportConfig,
                 item_ids: Optional[Sequence[str]] = None, seed: int = 0) -> IndexChoice:
    """Exact or IVF for this catalog; for IVF, the plan and a measured nprobe.

    Args:
      embeddings: [N, d] catalog embeddings (catalog row order).
      tuning: real queries (and their excluded items) to measure recall on; None: a
        seeded sample of the catalog's own embeddings stands in, and the card says so.
      cfg: export settings (index, nlist, nprobe, target recall, floor).
      item_ids: [N] catalog ids (maps `tuning.exclude` to rows).
      seed: k-means seed.

    Returns:
      An IndexChoice; its card has the build time and recall vs exact search.

    Raises:
      ValueError: for bad settings (unknown index, negative sizes, recall outside [0, 1],
        nprobe > nlist).
    """
    check_index_settings(cfg)
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
    if tuning is None or len(tuning.embeddings) == 0:
        rng = np.random.RandomState(seed)
        tuning = TuningQueries(embeddings[rng.choice(n, min(n, 1000), replace=False)],
                               source="catalog items (no validation queries)")
    blocked = _padded_positions(_excluded_rows(tuning, item_ids), _positions(plan.order))
    index = CatalogIndex(embeddings[plan.order], IndexChoice(plan=plan, nprobe=1))
    truth = _search(index, tuning.embeddings, blocked, min(100, n), exact=True)[1]
    ladder = {}
    candidates = [cfg.nprobe] if cfg.nprobe else nprobe_ladder(nlist)
    for nprobe in candidates:
        found = _search(index, tuning.embeddings, blocked, truth.shape[1], nprobe)[1]
        ladder[nprobe] = recall_vs_exact(found, truth)
        if ladder[nprobe]["recall@100"] >= cfg.index_target_recall:
            break
    del index
    nprobe = max(ladder)
    recall = ladder[nprobe]
    if recall["recall@100"] < cfg.index_recall_floor:
        log.warning("IVF index recall@100 vs exact is %.3f at nprobe %d, below the floor "
                    "%.2f: raise export.nprobe or use export.index=exact",
                    recall["recall@100"], nprobe, cfg.index_recall_floor)
    sizes = plan.sizes
    excluding = tuning.exclude is not None and item_ids is not None
    card = {"index": "ivf", "nlist": nlist, "nprobe": nprobe,
            "build_seconds": round(build_seconds, 2),
            "list_sizes": {"min": int(sizes.min()), "mean": round(float(sizes.mean()), 1),
                           "max": int(sizes.max())},
            "recall_vs_exact": {**recall, "queries": int(len(tuning.embeddings)),
                                "source": tuning.source, "with_exclusions": excluding},
            "recall_by_nprobe": {str(p): r["recall@100"] for p, r in ladder.items()},
            "recall_floor": cfg.index_recall_floor,
            "below_floor": recall["recall@100"] < cfg.index_recall_floor}
    log.info("IVF index: %d lists, nprobe %d, recall@100 vs exact %.3f (%d %s), built in "
             "%.1f s", nlist, nprobe, recall["recall@100"], len(tuning.embeddings),
             tuning.source, build_seconds)
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
      precision: storage of the embeddings ("float32", "bfloat16", "int8" with a scale
        per row; `tfrec.features.quantize`); scores are float32 either way.
    """

    def __init__(self, embeddings: np.ndarray, choice: IndexChoice,
                 precision: str = "float32"):
        super().__init__(name="catalog_index")
        self.num_items = len(embeddings)
        if check_precision(precision) == "float32":
            self.item_embeddings = tf.Variable(np.asarray(embeddings, np.float32),
                                               trainable=False, name="item_embeddings")
        else:
            self.item_embeddings = QuantizedTable(embeddings, precision, name="item_embeddings")
        self.ivf = IvfIndex(choice.plan, choice.nprobe) if choice.plan is not None else None

    @property
    def is_ivf(self) -> bool:
        return self.ivf is not None

    def check_nprobe(self, nprobe: tf.Tensor) -> list:
        return self.ivf.check_nprobe(nprobe) if self.ivf is not None else []

    def top_k(self, queries: tf.Tensor, width: tf.Tensor, blocked: Optional[tf.Tensor] = None,
              eligible: Optional[tf.Variable] = None, nprobe: Optional[tf.Tensor] = None,
              exact: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
        """Best `width` rows per query, never a blocked or ineligible one.

        Args:
          queries: [B, d].
          width: scalar results per query.
          blocked: [B, X] int64 catalog rows to leave out (-1 pads).
          eligible: [N] bool (False rows never come back).
          nprobe: [B] IVF lists per query (ignored by exact search).
          exact: exact search even over an IVF index (to measure the index against).

        Returns:
          scores [B, width] (-inf past the results) and rows [B, width] (-1 there).
        """
        if self.ivf is None or exact:
            scores = table_scores(self.item_embeddings, queries)  # [B, N]
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
      tuning: validation queries nprobe is tuned on (see `choose_index`).
    """

    def __init__(self, cfg: ExportConfig, tuning: Optional[TuningQueries] = None):
        check_index_settings(cfg)
        self.cfg, self.tuning = cfg, tuning
        self._embeddings: Optional[np.ndarray] = None
        self.card: Dict = {}

    def _build(self, embeddings: np.ndarray, item_ids: Sequence[str]) -> None:
        choice = choose_index(embeddings, self.tuning, self.cfg, item_ids=item_ids)
        self.card = choice.card
        self._order = (choice.plan.order if choice.plan is not None
                       else np.arange(len(embeddings), dtype=np.int64))
        self._position = _positions(self._order)
        self._index = CatalogIndex(embeddings[self._order], choice)
        self._embeddings = embeddings

    def __call__(self, queries: np.ndarray, embeddings: np.ndarray, item_ids: Sequence[str],
                 k: int, excluded: Optional[Sequence[Sequence[int]]] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """Catalog rows [U, k] (-1 past the results) and scores of each query's top-k.

        Args:
          queries: [U, d] query embeddings.
          embeddings: [N, d] catalog embeddings (catalog row order).
          item_ids: [N] their ids.
          k: results per query.
          excluded: per query, catalog rows never to return.
        """
        if self._embeddings is None or not (
                self._embeddings.shape == embeddings.shape
                and np.array_equal(self._embeddings, embeddings)):
            self._build(np.asarray(embeddings, np.float32), item_ids)
        blocked = _padded_positions(
            excluded if excluded is not None else [[] for _ in range(len(queries))],
            self._position)
        values, rows = _search(self._index, np.asarray(queries, np.float32), blocked, k)
        return np.where(rows >= 0, self._order[np.maximum(rows, 0)], -1), values
