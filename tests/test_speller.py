"""Query spelling correction: unit behaviour, and the gain on a synthetic world's typos.

The synthetic world knows which logged queries carry a typo and what the shopper wanted,
so the speller's effect is measured, not assumed: BM25 recall@10 of misspelled queries
must rise and correctly spelled queries must not lose.
"""

import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

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


def test_speller_lifts_recall_of_misspelled_queries_on_the_synthetic_world(tiny_world):
    from tfrec.evaluation.spelling import typo_recall

    r = typo_recall(tiny_world, max_queries=1500)
    assert r["typo"]["speller"] > r["typo"]["plain"] + 0.05, r
    assert r["clean"]["speller"] >= r["clean"]["plain"] - 0.005, r
    assert r["typo"]["changed"] > 0.5 and r["clean"]["changed"] < 0.1, r
