"""How much a query speller helps BM25 on a synthetic world, whose typos are known.

The generator marks the logged queries it misspelled and the item each query was after,
so the speller is judged on recall, typo and clean queries apart: it must lift the first
without costing the second.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.data.synthetic import World
from tfrec.features.bm25 import BM25Scorer
from tfrec.features.speller import Speller, speller_from_texts

__all__ = ["corrected_queries", "homophone_repair", "top_rows", "typo_recall", "world_speller"]


def corrected_queries(speller: Speller, queries: Sequence[str], batch: int = 512
                      ) -> Tuple[List[str], np.ndarray]:
    """Queries with the speller's corrections appended, and [Q] bool: which changed."""
    fixes: List[str] = []
    for i in range(0, len(queries), batch):
        fixes += [c.decode() for c in speller.corrections(
            tf.constant(list(queries[i:i + batch]), tf.string)).numpy()]
    return ([f"{q} {c}" if c else q for q, c in zip(queries, fixes)],
            np.array([bool(c) for c in fixes], bool))


def top_rows(bm25: BM25Scorer, queries: Sequence[str], k: int) -> np.ndarray:
    """[Q, k] catalog rows of the best BM25 scores, best first."""
    return np.concatenate([np.argsort(-bm25.score(list(queries[i:i + 256])), axis=1)[:, :k]
                           for i in range(0, len(queries), 256)])


def world_speller(world: World, log_share: float = 0.7) -> Tuple[Speller, List[str]]:
    """The speller a synthetic shop would have: its catalog text (title, brand, category)
    and the first `log_share` of its query log by time; also returns that text."""
    catalog, events = world.catalog, world.events
    texts = (catalog["title"] + " " + catalog["brand"].astype(str) + " "
             + catalog["category"].astype(str)).tolist()
    cut = events["ts"].quantile(log_share)
    logged = events.loc[(events["ts"] < cut) & (events["query"] != ""), "query"].tolist()
    return speller_from_texts(texts, logged)[0], texts


def typo_recall(world: World, max_queries: int = 3000, k: int = 10,
                log_share: float = 0.7) -> Dict[str, Dict[str, float]]:
    """BM25 recall@k of each query's target item, without and with the speller.

    The speller learns from the catalog (title, brand, category) and the first
    `log_share` of the query log by time; BM25 indexes the same catalog text.

    Returns:
      {"typo"|"clean": {"queries", "changed" (share), "plain", "speller"}}.
    """
    catalog, gt = world.catalog, world.ground_truth
    speller, texts = world_speller(world, log_share)
    bm25 = BM25Scorer().fit(catalog["item_id"].tolist(), texts)
    ids = catalog["item_id"].to_numpy()
    queries = gt["query_texts"].astype(str)
    targets = gt["item_ids"].astype(str)[gt["query_target"]]
    typo = gt["query_typo"].astype(bool)
    out = {}
    for name, sel in (("typo", np.where(typo)[0]), ("clean", np.where(~typo)[0])):
        sel = sel[:max_queries]
        plain = queries[sel].tolist()
        expanded, changed = corrected_queries(speller, plain)
        recall = [float(np.mean([t in set(ids[r]) for t, r in zip(targets[sel], top)]))
                  if len(sel) else float("nan")
                  for top in (top_rows(bm25, plain, k), top_rows(bm25, expanded, k))]
        out[name] = {"queries": len(sel), "changed": float(changed.mean()) if len(sel) else 0.0,
                     "plain": recall[0], "speller": recall[1]}
    return out


def homophone_repair(world: World, max_queries: int = 3000, seed: int = 0,
                     log_share: float = 0.7) -> Dict[str, float]:
    """How often the speller undoes a pinyin slip in Chinese queries, and harms clean ones.

    Clean logged queries (no generator typo) are misspelled here the generator's way: one
    character of a CJK run replaced by its homophone (`HOMOPHONES_ZH`), so the intended
    query is known exactly. BM25 over characters and bigrams already finds most such
    queries (a slip breaks one or two bigrams), so what is measured is the repair itself.

    Returns:
      {"queries": misspelled queries, "repaired": share whose corrected query equals the
      intended one, "changed": share with any correction, "clean_changed": share of the
      clean queries the speller alters (false corrections)}.
    """
    from tfrec.data.lexicon_zh import HOMOPHONES_ZH

    gt = world.ground_truth
    speller, _ = world_speller(world, log_share)
    queries = gt["query_texts"].astype(str)[~gt["query_typo"].astype(bool)]
    rng = np.random.default_rng(seed)
    clean, typos = [], []
    for query in queries:
        slots = [i for i, c in enumerate(query) if c in HOMOPHONES_ZH]
        if not slots:
            continue
        i = slots[int(rng.integers(len(slots)))]
        clean.append(query)
        typos.append(query[:i] + HOMOPHONES_ZH[query[i]] + query[i + 1:])
        if len(clean) >= max_queries:
            break
    if not clean:
        raise ValueError("no clean query holds a character with a homophone: not a "
                         "Chinese world?")

    def fixed(texts: Sequence[str]) -> List[str]:
        return [q.decode() for q in speller.correct(tf.constant(list(texts))).numpy()]

    intended = [q.decode() for q in _normalized(clean)]
    repaired, as_clean = fixed(typos), fixed(clean)
    typed = [q.decode() for q in _normalized(typos)]
    return {"queries": len(typos),
            "repaired": float(np.mean([r == t for r, t in zip(repaired, intended)])),
            "changed": float(np.mean([r != t for r, t in zip(repaired, typed)])),
            "clean_changed": float(np.mean([c != t for c, t in zip(as_clean, intended)]))}


def _normalized(texts: Sequence[str]) -> np.ndarray:
    """Queries as `Speller.correct` writes them when it changes nothing."""
    from tfrec.features.tokenize import normalize_text, text_segments

    segments = text_segments(normalize_text(tf.constant(list(texts))))
    return tf.strings.reduce_join(segments, axis=1, separator=" ").numpy()
