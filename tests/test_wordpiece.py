"""WordPiece vocabularies learned from the shop's own text, and the casing that keeps accents.

A Chinese or accented shop has no pretrained BERT offline: the vocabulary learned here
must spell its text without [UNK], keep accented letters, and treat each Han character
as a unit, exactly as the exported preprocessor splits it.
"""

import subprocess
import sys

import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.text.preprocess import BertPreprocessor, TextCasing
from tfrec.text.vocab import SPECIAL_TOKENS
from tfrec.text.wordpiece import WordPieceOptions, learn_wordpiece, reserved_tokens

CORPUS = (["无线蓝牙耳机 降噪", "蓝牙音箱 便携", "无线鼠标 静音", "Café Crème Kapseln",
           "Größe 42 Stiefel", "crème brûlée Förmchen", "Sony WH-1000XM5 无线耳机"] * 3
          + ["kettlebell 12kg", "grey kettlebell", "red kettlebell 8kg"] * 4)
FOLDED = TextCasing(lower_case=True, keep_accents=True)


def _pieces(vocab, text, casing=FOLDED):
    pre = BertPreprocessor(vocab, lower_case=casing.lower_case,
                           keep_accents=casing.keep_accents)
    ids = pre.tokenize_strings(tf.constant([text])).flat_values.numpy()
    return [vocab[i] for i in ids]


@pytest.fixture(scope="module")
def vocab():
    return learn_wordpiece(CORPUS, FOLDED, WordPieceOptions(vocab_size=400))


def test_vocabulary_starts_with_specials_and_ascii_and_respects_its_size(vocab):
    assert vocab[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert vocab[:len(reserved_tokens())] == reserved_tokens()
    assert len(vocab) <= 400 and len(set(vocab)) == len(vocab)
    # Frequent whole words become one token; Han characters are units of their own.
    assert "kettlebell" in vocab
    assert {"无", "线", "蓝", "牙"} <= set(vocab)
    assert not any(len(t) > 1 and "\u4e00" <= t[0] <= "\u9fff" for t in vocab)


def test_learned_text_tokenizes_without_unk_and_keeps_accents(vocab):
    for text in CORPUS:
        assert "[UNK]" not in _pieces(vocab, text), text
    assert _pieces(vocab, "无线耳机")[:4] == ["无", "线", "耳", "机"]
    crème = _pieces(vocab, "CRÈME")
    assert "".join(p.lstrip("#") for p in crème) == "crème"
    # NFKC case folding: ß folds to ss, ö stays ö (BERT's uncased mode would drop it).
    assert "".join(p.lstrip("#") for p in _pieces(vocab, "Größe")) == "grösse"
    # A model number never seen is spelled out with the ASCII pieces, not [UNK].
    assert "[UNK]" not in _pieces(vocab, "QX-9981z")


def test_uncased_bert_casing_still_strips_accents():
    vocab = list(SPECIAL_TOKENS) + ["creme", "crème"]
    assert _pieces(vocab, "Crème", TextCasing(lower_case=True)) == ["creme"]
    assert _pieces(vocab, "Crème", FOLDED) == ["crème"]
    assert TextCasing(lower_case=False, keep_accents=True).keep_accents is False


def test_bad_options_and_empty_text_are_refused():
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        learn_wordpiece(CORPUS, FOLDED, WordPieceOptions(vocab_size=10))
    with pytest.raises(ValueError, match="min_count"):
        learn_wordpiece(CORPUS, FOLDED, WordPieceOptions(min_count=0))
    with pytest.raises(ValueError, match="no words"):
        learn_wordpiece(["", "  "], FOLDED)


def test_cli_build_vocab_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "tfrec.cli", "text", "build-vocab",
                               *args], capture_output=True, text=True, timeout=300)

    proc = run("--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "v.txt"))
    assert proc.returncode != 0 and "tfrec: error:" in proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "v.txt").write_text("x\n")
    proc = run("--data-dir", str(tmp_path), "--out", str(tmp_path / "v.txt"))
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (tmp_path / "v.txt").read_text() == "x\n"  # nothing lost
