"""Query spelling correction: unit behaviour, and the gain on a synthetic world's typos.

The synthetic world knows which logged queries carry a typo and what the shopper wanted,
so the speller's effect is measured, not assumed: BM25 recall@10 of misspelled queries
must rise and correctly spelled queries must not lose.
"""

import numpy as np
import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.features.bm25 import BM25Scorer
from tfrec.features.speller import Speller, SpellerOptions, speller_from_texts, word_counts

TITLES = ["vinyl flooring plank", "toilet seat white", "cedar fence picket", "vinyl siding",
          "toilet paper holder", "cedar planks", "Größe Stiefel braun", "无线耳机 蓝牙",
          "Sony WH1000 headphones"] * 3


@pytest.fixture(scope="module")
def speller():
    return speller_from_texts(TITLES, ["cheap vinyl"] * 3 + [f"cheap thing {i}" for i in range(10)])[0]


def _correct(speller, queries):
    return [q.decode() for q in speller.correct(tf.constant(queries)).numpy()]


def test_unknown_words_become_frequent_catalog_words(speller):
    assert _correct(speller, ["vynal flooring", "TOLIET seat", "ceadar fence", "größe stifel"]) == [
        "vinyl flooring", "toilet seat", "cedar fence", "grösse stiefel"]
    assert [c.decode() for c in speller.corrections(
        tf.constant(["vynal flooring", "toilet seat", ""])).numpy()] == ["vinyl", "", ""]


def test_what_is_left_alone(speller):
    # Known words, words in >= 10 logged queries ("cheap"), short words, model numbers,
    # CJK runs (phrases typed without spaces, not words), and words too far from any.
    queries = ["vinyl", "cheap", "vinl", "seet", "wh1001", "无线耳鸡", "qqqqqqqq"]
    assert _correct(speller, queries) == ["vinyl", "cheap", "vinyl", "seat", "wh1001",
                                          "无线耳鸡", "qqqqqqqq"]
    assert _correct(speller, ["sea"]) == ["sea"]  # 3 letters: too many close neighbours


def test_graph_batch_shapes_and_empty_batch(speller):
    fn = tf.function(speller.corrections, input_signature=[tf.TensorSpec([None], tf.string)])
    assert fn(tf.constant([], tf.string)).shape == (0,)
    assert [c.decode() for c in fn(tf.constant(["toliet", "toilet"])).numpy()] == ["toilet", ""]


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_length"):
        Speller({"word": 3}, options=SpellerOptions(min_length=8, long_length=5))
    with pytest.raises(ValueError, match="max_length"):
        Speller({"word": 3}, options=SpellerOptions(max_length=40))
    assert word_counts(["Café café", "无线 耳机"]) == {"café": 2, "无线": 1, "耳机": 1}


def _typo_recall(world):
    """BM25 recall@10 of the target item, typo and clean queries, without/with the speller."""
    catalog, gt = world.catalog, world.ground_truth
    texts = (catalog["title"] + " " + catalog["brand"].astype(str) + " "
             + catalog["category"].astype(str)).tolist()
    events = world.events
    cut = events["ts"].quantile(0.7)  # the speller learns from the earlier query log only
    logged = events.loc[(events["ts"] < cut) & (events["query"] != ""), "query"].tolist()
    speller, _ = speller_from_texts(texts, logged)
    bm25 = BM25Scorer().fit(catalog["item_id"].tolist(), texts)
    ids = catalog["item_id"].to_numpy()
    queries = gt["query_texts"].astype(str)
    targets = gt["item_ids"].astype(str)[gt["query_target"]]
    typo = gt["query_typo"].astype(bool)
    out = {}
    for name, sel in (("typo", np.where(typo)[0]), ("clean", np.where(~typo)[0][:1500])):
        qs = queries[sel].tolist()
        fixed = [c.decode() for c in speller.corrections(tf.constant(qs)).numpy()]
        expanded = [f"{q} {c}" if c else q for q, c in zip(qs, fixed)]
        for variant, texts_ in (("plain", qs), ("speller", expanded)):
            top = np.argsort(-bm25.score(texts_), axis=1)[:, :10]
            out[name, variant] = float(np.mean(
                [t in set(ids[r]) for t, r in zip(targets[sel], top)]))
    return out


def test_speller_lifts_recall_of_misspelled_queries_on_the_synthetic_world(tiny_world):
    r = _typo_recall(tiny_world)
    assert r["typo", "speller"] > r["typo", "plain"] + 0.05, r
    assert r["clean", "speller"] >= r["clean", "plain"] - 0.005, r
