"""The shared tokenizer: Unicode text in any script, identical in Python and in the graph."""

import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.features.tokenize import (char_ngrams, normalize_text, text_segments, text_tokens,
                                     token_vocabulary, tokenize)


@pytest.mark.parametrize("text, tokens", [
    ("Wood-Deck 2x4, 10 ft.", ["wood", "deck", "2x4", "10", "ft"]),
    # Accents are letters; NFKC + case folding: ß -> ss, fullwidth -> ASCII, ligatures open.
    ("Café ÉLAN naïve Größe", ["café", "élan", "naïve", "grösse"]),
    ("ＡＢＣ１２３ ﬁne ㎡", ["abc123", "fine", "m2"]),
    ("cafe\u0301", ["café"]),  # decomposed accent composes to the same token
    # CJK: characters, then bigrams of adjacent characters; Latin model numbers stay words.
    ("无线耳机", ["无", "线", "耳", "机", "无线", "线耳", "耳机"]),
    ("iPhone15手机壳", ["iphone15", "手", "机", "壳", "手机", "机壳"]),
    ("蓝牙　耳机", ["蓝", "牙", "蓝牙", "耳", "机", "耳机"]),  # ideographic space separates
    ("コーヒー", ["コ", "ー", "ヒ", "ー", "コー", "ーヒ", "ヒー"]),
    ("한국어", ["한", "국", "어", "한국", "국어"]),
    ("Ελληνικά ΣΑΣ", ["ελληνικά", "σασ"]),
    ("", []), ("  \t\n ", []), ("!!!", []),
])
def test_tokens_keep_every_script(text, tokens):
    assert tokenize([text]) == [tokens]


@pytest.mark.parametrize("text, tokens", [
    # Letter/digit runs split; plurals folded (Harman's S-stemmer), kept words kept.
    ("Screen Doors 32x80 bulbs2700K", ["screen", "door", "32", "x", "80", "bulb", "2700", "k"]),
    ("batteries hoses toes glass status gas bus", ["battery", "hose", "toe", "glass",
                                                   "status", "gas", "bus"]),
    # Accented Latin folds as letters; CJK, Greek finals and model numbers pass unchanged.
    ("Cafés crèmes Größes", ["café", "crème", "grösse"]),
    ("iPhone15手机壳 无线耳机s", ["iphone", "15", "手", "机", "壳", "手机", "机壳", "无",
                              "线", "耳", "机", "无线", "线耳", "耳机", "s"]),
    ("", []),
])
def test_light_analyzer_splits_digits_and_folds_plurals(text, tokens):
    assert tokenize([text], "light") == [tokens]
    graph = text_tokens(tf.constant([text]), "light").to_list()[0]
    assert [t.decode() for t in graph] == tokens
    # "plain" (the default) is the shared tokenizer unchanged.
    assert tokenize([text], "plain") == tokenize([text])


def test_python_and_graph_tokens_agree_including_invalid_utf8():
    texts = ["Café 无线耳机 iPhone15", "ＡＢＣ", "x" * 300, ""]
    graph = [[t.decode() for t in row] for row in text_tokens(tf.constant(texts)).to_list()]
    assert graph == tokenize(texts)
    # Invalid bytes (possible only at serving) separate like U+FFFD.
    raw = text_tokens(tf.constant([b"dr\xffill RED\xc3"])).to_list()[0]
    assert [t.decode() for t in raw] == tokenize(["dr\ufffdill RED\ufffd"])[0] == [
        "dr", "ill", "red"]


def test_trigrams_run_over_segments_in_any_script():
    segments = text_segments(normalize_text(tf.constant(["无线耳机 Ab"])))
    grams = [g.decode() for g in char_ngrams(segments).to_list()[0]]
    assert grams == ["#无线", "无线耳", "线耳机", "耳机#", "#ab", "ab#"]


def test_token_vocabulary_orders_by_count_then_text():
    texts = ["蓝牙 耳机", "蓝牙 音箱", "b a", "a"]
    assert token_vocabulary(texts, max_tokens=3) == ["a", "牙", "蓝"]
    assert token_vocabulary(texts, min_count=2) == ["a", "牙", "蓝", "蓝牙"]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="wrap a single text"):
        tokenize("a text")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a string"):
        tokenize(["ok", None])
    with pytest.raises(ValueError, match="max_tokens"):
        token_vocabulary(["a"], max_tokens=-1)
    with pytest.raises(ValueError, match="analyzer must be one of plain, light, got 'porter'"):
        tokenize(["a"], "porter")
