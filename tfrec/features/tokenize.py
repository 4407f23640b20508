"""One text normalisation and tokenisation for every text path, in any script.

The two-tower text encoder, the in-graph BM25 `LexicalIndex`, the numpy `BM25Scorer`
and the search two-tower's word bag all split text here, so a query is tokenised the
same way in training, evaluation and the exported SavedModel. The Python entry point
(`tokenize`) runs the very same TensorFlow function, so parity holds by construction.

Rules: invalid UTF-8 becomes U+FFFD; NFKC with case folding (TF Text `case_fold_utf8`,
an op stock TF Serving ships: fullwidth "ＡＢＣ１" -> "abc1", "Größe" -> "grösse",
accents kept as letters); runs of letters, marks and digits are segments, anything else
separates. CJK (Han, kana, hangul) runs are their own segments, tokenised as single
characters plus the bigrams of adjacent characters ("无线耳机" -> 无 线 耳 机 无线 线耳 耳机);
other segments are one token each. Character n-grams are taken per segment, so they
cover any script.

Analyzers (`ANALYZERS`) choose what a lexical index matches on top of these rules:
"plain" as above; "light" also splits letter/digit runs ("32x80" -> 32 x 80, "2700k" ->
2700 k) and folds plural suffixes (`fold_plurals`), so "door knobs" finds "Door Knob".
"""

from __future__ import annotations

import collections
from typing import List, Optional, Sequence

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_text as tf_text

from tfrec.features.analyzers import ANALYZERS, check_analyzer

__all__ = ["ANALYZERS", "check_analyzer", "normalize_text", "text_segments",
           "split_letters_digits", "fold_plurals", "segment_tokens", "text_tokens",
           "char_ngrams", "tokenize", "token_vocabulary"]

# CJK scripts (Han incl. the iteration marks, kana, hangul) plus the katakana-hiragana
# prolonged sound mark, which Unicode files under the Common script.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\x{3005}\x{3006}\x{30FC}"
_CJK_RUN = f"[{_CJK}]+"
CJK_CHAR = f"[{_CJK}]"  # one character of a script written without spaces
# Separators: anything but letters, marks and digits (\p{N} also covers ² and ①,
# which NFKC has already turned into digits).
_SEPARATORS = r"[^\p{L}\p{M}\p{N}]+"

# Harman's S-stemmer (1991), first matching rule only: each output ends in y, e or a
# non-s letter, so the later rules cannot re-apply. Letters-only tokens: digits, CJK
# characters (never ending in "s") and short words ("gas", "bus") pass unchanged.
_PLURAL_RULES = ((r"^(\pL+[^ae\PL])ies$", r"\1y"),  # batteries -> battery
                 (r"^(\pL+[^aeo\PL])es$", r"\1e"),  # hoses -> hose (toes: next rule)
                 (r"^(\pL{2,}[^us\PL])s$", r"\1"))  # bulbs -> bulb; glass, status kept
# Texts tokenised per call of `tokenize` (bounds the eager batch on long catalogs).
_BATCH = 65536
# Plain TF ops, no Python control flow on tensors: autograph would only add trace time.
_plain_ops = tf.autograph.experimental.do_not_convert


@_plain_ops
def normalize_text(texts: tf.Tensor) -> tf.Tensor:
    """[...] strings -> NFKC case-folded strings; invalid UTF-8 bytes become U+FFFD."""
    texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                         replacement_char=0xFFFD)
    return tf_text.case_fold_utf8(texts)


@_plain_ops
def text_segments(normalized: tf.Tensor) -> tf.RaggedTensor:
    """[B] normalised strings -> ragged [B, S] segments: words, digit runs, CJK runs."""
    spaced = tf.strings.regex_replace(normalized, _SEPARATORS, " ")
    spaced = tf.strings.regex_replace(spaced, f"({_CJK_RUN})", r" \1 ")
    return tf.strings.split(spaced)


@_plain_ops
def split_letters_digits(normalized: tf.Tensor) -> tf.Tensor:
    """Spaces between letters and digits: sizes and model numbers typed fused ("32x80",
    "bulbs2700k") match titles that write them apart. Two passes: a boundary of each kind
    is two characters, so matches of one kind never overlap."""
    spaced = tf.strings.regex_replace(normalized, r"(\pL)(\pN)", r"\1 \2")
    return tf.strings.regex_replace(spaced, r"(\pN)(\pL)", r"\1 \2")


@_plain_ops
def fold_plurals(tokens: tf.Tensor) -> tf.Tensor:
    """[...] tokens with plural suffixes folded (Harman's S-stemmer: -ies -> -y unless
    after a/e, -es -> -e unless after a/e/o, -s -> "" unless after u/s).

    A light rule for languages that pluralise with -s (English, French, Spanish...);
    a query and a title fold alike, so "bulbs" and "bulb" meet even where a fold is not
    a real word ("boxes" -> "boxe").
    """
    for pattern, rewrite in _PLURAL_RULES:
        tokens = tf.strings.regex_replace(tokens, pattern, rewrite)
    return tokens


def _characters(strings: tf.Tensor):
    """[N] strings -> (chars [C] one-character strings, splits [N + 1] int64 into chars)."""
    splits, codepoints = tf.raw_ops.UnicodeDecode(
        input=strings, input_encoding="UTF-8", errors="replace", Tsplits=tf.int64)
    chars = tf.raw_ops.UnicodeEncode(
        input_values=codepoints, input_splits=tf.range(tf.size(codepoints, tf.int64) + 1),
        output_encoding="UTF-8", errors="replace")
    return chars, splits


def _position_in_segment(splits: tf.Tensor, size: tf.Tensor):
    """For items 0..size-1 listed segment by segment (`splits` [N + 1]): (segment, offset)."""
    items = tf.range(size)
    segment = tf.searchsorted(splits[1:], items, side="right", out_type=tf.int64)
    return segment, items - tf.gather(splits, segment)


@_plain_ops
def segment_tokens(segments: tf.RaggedTensor) -> tf.RaggedTensor:
    """Ragged [B, S] segments -> ragged [B, T] tokens.

    A CJK run expands to its characters then its adjacent-character bigrams; any other
    segment is one token. Built from raw ops on flat tensors, not ragged concatenation:
    every model trace holds a copy per text feature, and the ragged version was ~750 ops.
    """
    flat = segments.flat_values  # [N]
    cjk = tf.strings.regex_full_match(flat, _CJK_RUN)
    runs = tf.reshape(tf.where(cjk), [-1])  # only CJK runs are split into characters
    chars, splits = _characters(tf.gather(flat, runs))
    lengths = splits[1:] - splits[:-1]
    num_chars = tf.size(chars, tf.int64)
    bigram_splits = tf.concat([[0], tf.cumsum(tf.maximum(lengths - 1, 0))], axis=0)
    # Each CJK run yields len chars + (len - 1) bigrams; any other segment one token.
    counts = tf.tensor_scatter_nd_update(tf.ones_like(flat, tf.int64), runs[:, tf.newaxis],
                                         2 * lengths - 1)
    start = tf.concat([[0], tf.cumsum(counts)], axis=0)
    run_start = tf.gather(start, runs)
    char_run, char_offset = _position_in_segment(splits, num_chars)
    bigram_run, bigram_offset = _position_in_segment(bigram_splits, bigram_splits[-1])
    first = tf.gather(splits, bigram_run) + bigram_offset  # a bigram's first character
    bigrams = tf.strings.join([tf.gather(chars, first), tf.gather(chars, first + 1)])
    values = tf.concat([chars, bigrams,
                        tf.boolean_mask(flat, tf.logical_not(cjk))], axis=0)
    slots = tf.concat([tf.gather(run_start, char_run) + char_offset,
                       tf.gather(run_start + lengths, bigram_run) + bigram_offset,
                       tf.boolean_mask(start[:-1], tf.logical_not(cjk))], axis=0)
    tokens = tf.gather(values, tf.math.invert_permutation(slots))
    return tf.RaggedTensor.from_row_splits(tokens, tf.gather(start, segments.row_splits),
                                           validate=False)


@_plain_ops
def text_tokens(texts: tf.Tensor, analyzer: str = "plain") -> tf.RaggedTensor:
    """[B] raw strings -> ragged [B, T] tokens (normalise, segment, expand CJK).

    Args:
      texts: [B] tf.string.
      analyzer: one of `ANALYZERS` ("light": letter/digit splits, plurals folded).
    """
    light = check_analyzer(analyzer) == "light"
    normalized = normalize_text(texts)
    if light:
        normalized = split_letters_digits(normalized)
    tokens = segment_tokens(text_segments(normalized))
    if light:
        tokens = tokens.with_flat_values(fold_plurals(tokens.flat_values))
    return tokens


@_plain_ops
def char_ngrams(segments: tf.RaggedTensor, n: int = 3) -> tf.RaggedTensor:
    """Ragged [B, S] segments -> ragged [B, G] character n-grams of "#segment#"."""
    marked = tf.strings.join(["#", segments, "#"])
    chars = tf.strings.unicode_split(marked, "UTF-8")  # [B, S, C]
    return tf.strings.ngrams(chars, n, separator="").merge_dims(1, 2)


# One traced graph per analyzer, built on first use.
_TOKEN_GRAPHS = {name: tf.function(lambda texts, name=name: text_tokens(texts, name),
                                   input_signature=[tf.TensorSpec([None], tf.string)])
                 for name in ANALYZERS}


def tokenize(texts: Sequence[str], analyzer: str = "plain") -> List[List[str]]:
    """Python strings -> token lists, by the same graph the models run.

    Args:
      texts: strings (a single str is a ValueError: wrap it in a list).
      analyzer: one of `ANALYZERS`.

    Returns:
      one list of tokens (str) per text.

    Raises:
      ValueError: if texts is a str or holds a non-string, or analyzer is unknown.
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a list of strings; wrap a single text in [ ]")
    graph = _TOKEN_GRAPHS[check_analyzer(analyzer)]
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
    out: List[List[str]] = []
    for start in range(0, len(texts), _BATCH):
        ragged = graph(tf.constant(texts[start:start + _BATCH], tf.string))
        words = [w.decode("utf-8") for w in ragged.flat_values.numpy().tolist()]
        splits = ragged.row_splits.numpy().tolist()
        out.extend(words[a:b] for a, b in zip(splits[:-1], splits[1:]))
    return out


def token_vocabulary(texts: Sequence[str], max_tokens: Optional[int] = None,
                     min_count: int = 1, analyzer: str = "plain") -> List[str]:
    """Tokens of `texts` seen at least `min_count` times, most frequent first.

    Ties are broken alphabetically so the vocabulary does not depend on text order.

    Args:
      texts: strings to count tokens in.
      max_tokens: keep at most this many (None: all).
      min_count: drop rarer tokens.
      analyzer: one of `ANALYZERS`.

    Returns:
      the token list.
    """
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
    counts = collections.Counter(t for row in tokenize(texts, analyzer) for t in row)
    kept = sorted((w for w, c in counts.items() if c >= min_count),
                  key=lambda w: (-counts[w], w))
    return kept if max_tokens is None else kept[:max_tokens]
