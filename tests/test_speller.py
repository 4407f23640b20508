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
    # and words too far from any.
    queries = ["vinyl", "cheap", "vinl", "seet", "wh1001", "qqqqqqqq"]
    assert _correct(speller, queries) == ["vinyl", "cheap", "vinyl", "seat", "wh1001",
                                          "qqqqqqqq"]
    assert _correct(speller, ["sea"]) == ["sea"]  # 3 letters: too many close neighbours


def test_fused_words_are_split_and_split_words_joined():
    titles = ["Lawn Mower 21 in.", "Fire Pit bowl", "Outdoor Ceiling Fan", "Rust-Oleum paint",
              "Café Tisch rund", "toolbox steel", "vinyl plank", "无线耳机 蓝牙"] * 3
    sp = speller_from_texts(titles)[0]
    queries = ["lawnmower", "firepit kit", "out door fan", "rustoleum paint", "cafétisch",
               "tool box", "vynal plank", "firepit2", "fan pit", "无线耳机", "out 2 door"]
    assert [c.decode() for c in sp.corrections(tf.constant(queries)).numpy()] == [
        "lawn mower", "fire pit", "outdoor", "rust oleum", "café tisch", "toolbox", "vinyl",
        "",  # a digit: a model number, left alone
        "",  # both halves known, but "fanpit" is no catalog word
        "", ""]
    # Splits replace the word in the corrected query; joins only add to it.
    assert _correct(sp, ["lawnmower blade", "out door fan"]) == ["lawn mower blade",
                                                                 "out door fan"]
    # Parts shorter than part_min_length neither split nor join ("a c" is not "ac").
    short = speller_from_texts(["ac unit window", "a c"] * 3)[0]
    assert short.corrections(tf.constant(["a c unit"])).numpy().tolist() == [b""]
    four = speller_from_texts(titles, options=SpellerOptions(part_min_length=4))[0]
    assert four.corrections(tf.constant(["firepit", "out door"])).numpy().tolist() == [
        b"", b""]
    off = speller_from_texts(titles, options=SpellerOptions(compounds=False))[0]
    assert [c.decode() for c in off.corrections(tf.constant(queries[:3])).numpy()] == [
        "", "", ""]
    fn = tf.function(sp.corrections, input_signature=[tf.TensorSpec([None], tf.string)])
    assert [c.decode() for c in fn(tf.constant(["", "out door", "lawnmower"])).numpy()] == [
        "", "outdoor", "lawn mower"]


def test_one_wrong_chinese_character_is_repaired_from_its_neighbours():
    titles = ["无线耳机 蓝牙", "头戴耳机", "无线鼠标", "蓝牙音箱", "折叠椅 户外",
              "双人沙发"] * 3
    queries = [f"便宜货 {i}" for i in range(12)]  # "便宜" in >= 10 logged queries: known
    sp = speller_from_texts(titles, queries)[0]
    assert _correct(sp, ["无线耳饥", "无线耳机", "蓝芽音箱", "双人纱发", "折蝶椅", "便宜沙发"]) == [
        "无线耳机",  # end of a run: the two characters before decide
        "无线耳机",  # known phrase: untouched
        "蓝牙音箱",  # inside a run: both neighbours decide
        "双人沙发",
        "折叠椅",
        "便宜沙发"]  # a word shoppers use often is not a typo
    # A character whose context the catalog never saw, and a run with a foreign script.
    assert _correct(sp, ["红色耳饥", "Größe 耳机"]) == ["红色耳饥", "grösse 耳机"]
    assert [c.decode() for c in sp.corrections(tf.constant(["无线耳饥 wh1000", "蓝牙"])).numpy()
            ] == ["无线耳机", ""]
    off = speller_from_texts(titles, options=SpellerOptions(cjk=False))[0]
    assert _correct(off, ["无线耳饥"]) == ["无线耳饥"]


def test_chinese_homophone_slips_are_repaired_on_the_synthetic_world():
    import dataclasses

    from tfrec.data.synthetic import generate_world, get_spec
    from tfrec.evaluation.spelling import homophone_repair

    world = generate_world(dataclasses.replace(get_spec("tiny"), lang="zh"), seed=7)
    r = homophone_repair(world, max_queries=1000)
    # Measured 0.45 repaired / 0.012 clean changed (tiny), 0.71 / 0.0 (small world).
    assert r["queries"] >= 500 and r["repaired"] >= 0.3, r
    assert r["changed"] - r["repaired"] <= 0.1 and r["clean_changed"] <= 0.03, r


def test_graph_batch_shapes_and_empty_batch(speller):
    fn = tf.function(speller.corrections, input_signature=[tf.TensorSpec([None], tf.string)])
    assert fn(tf.constant([], tf.string)).shape == (0,)
    assert [c.decode() for c in fn(tf.constant(["toliet", "toilet"])).numpy()] == ["toilet", ""]
    # Graph branches: nothing to correct (both skipped), a CJK run only (its branch alone).
    assert fn(tf.constant(["toilet seat", "蓝牙"])).numpy().tolist() == [b"", b""]
    assert [c.decode() for c in fn(tf.constant(["无线耳饥", "toilet"])).numpy()] == ["无线耳机", ""]


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_length"):
        Speller({"word": 3}, options=SpellerOptions(min_length=8, long_length=5))
    with pytest.raises(ValueError, match="max_length"):
        Speller({"word": 3}, options=SpellerOptions(max_length=40))
    with pytest.raises(ValueError, match="part_min_length must be >= 1"):
        Speller({"word": 3}, options=SpellerOptions(part_min_length=0))
    assert word_counts(["Café café", "无线 耳机"]) == {"café": 2, "无线": 1, "耳机": 1}


def test_speller_lifts_recall_of_misspelled_queries_on_the_synthetic_world(tiny_world):
    from tfrec.evaluation.spelling import typo_recall

    r = typo_recall(tiny_world, max_queries=1500)
    assert r["typo"]["speller"] > r["typo"]["plain"] + 0.05, r
    assert r["clean"]["speller"] >= r["clean"]["plain"] - 0.005, r
    assert r["typo"]["changed"] > 0.5 and r["clean"]["changed"] < 0.1, r
