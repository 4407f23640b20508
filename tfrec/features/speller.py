"""Query spelling correction learned from the catalog, in TensorFlow ops (symmetric delete).

Shoppers misspell ("vynal", "toliet", "ceadar"); BM25 then matches nothing. A word the
catalog never uses is replaced by the most frequent catalog word within a small edit
distance. Candidates come from a table of words-with-characters-deleted built at export
(SymSpell's idea), so serving needs only core ops: one hash lookup per deletion pattern
and an edit distance per candidate, whatever the catalog size.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.features.tokenize import CJK_CHAR, normalize_text, text_segments

__all__ = ["SpellerOptions", "Speller", "word_counts"]

_BATCH = 65536


@dataclasses.dataclass(frozen=True)
class SpellerOptions:
    """Which words are corrected, and into what.

    Args:
      min_length: shorter words are never corrected (too many close neighbours).
      long_length: words this long may be two edits away; shorter ones only one.
      max_length: longer words are left alone (bounds the deletion patterns per word).
      min_count: catalog words seen fewer times are not offered as corrections.
      max_words: most frequent catalog words offered as corrections (bounds the table).
      candidates_per_key: words kept per deletion key, most frequent first.
      query_known: a word in at least this many distinct logged queries is known even if
        the catalog never uses it ("cheap", "sale"); a typo is rarely repeated that often.
    """

    min_length: int = 4
    long_length: int = 5
    max_length: int = 20
    min_count: int = 2
    max_words: int = 200_000
    candidates_per_key: int = 4
    query_known: int = 10

    def validate(self) -> None:
        if not 1 <= self.min_length <= self.long_length <= self.max_length:
            raise ValueError("need 1 <= min_length <= long_length <= max_length, got "
                             f"{self.min_length}, {self.long_length}, {self.max_length}")
        if self.max_length > 32:
            raise ValueError(f"max_length must be <= 32 (deletion patterns grow as its "
                             f"square), got {self.max_length}")
        for name in ("min_count", "max_words", "candidates_per_key", "query_known"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _segments_graph(texts: tf.Tensor) -> tf.RaggedTensor:
    return text_segments(normalize_text(texts))


def word_counts(texts: Iterable[str]) -> collections.Counter:
    """Counts of the words (segments) of `texts`, as the tokenizer normalises them."""
    counts: collections.Counter = collections.Counter()
    texts = [str(t) for t in texts]
    for start in range(0, len(texts), _BATCH):
        flat = _segments_graph(tf.constant(texts[start:start + _BATCH])).flat_values.numpy()
        counts.update(w.decode("utf-8") for w in flat.tolist())
    return counts


_NOT_CORRECTED = f".*(\\d|{CJK_CHAR}).*"


def _correctable(words: Sequence[str], options: SpellerOptions) -> List[bool]:
    """Whether each word may be corrected or offered: by length, no digit, no CJK.

    Model numbers are exact (a digit: leave the word alone); CJK runs are phrases typed
    without spaces, not words, so edit distance over them corrects the wrong thing. The
    check is the graph's own regex (RE2), so both sides agree.
    """
    if not words:
        return []
    excluded = tf.strings.regex_full_match(tf.constant(list(words), tf.string),
                                           _NOT_CORRECTED).numpy()
    return [options.min_length <= len(w) <= options.max_length and not x
            for w, x in zip(words, excluded)]


def _allowed(length: int, options: SpellerOptions) -> int:
    return 2 if length >= options.long_length else 1


def _deletes(word: str, distance: int) -> List[str]:
    keys = [word]
    for d in range(1, distance + 1):
        for drop in itertools.combinations(range(len(word)), d):
            keys.append("".join(c for i, c in enumerate(word) if i not in drop))
    return keys


def _deletion_patterns(max_length: int) -> np.ndarray:
    """[P, max_length] bool keep-masks: none, one or two positions dropped."""
    patterns = [np.ones(max_length, bool)]
    for d in (1, 2):
        for drop in itertools.combinations(range(max_length), d):
            keep = np.ones(max_length, bool)
            keep[list(drop)] = False
            patterns.append(keep)
    return np.stack(patterns)


class Speller(tf.Module):
    """Corrects unknown query words into frequent catalog words, in graph.

    Args:
      counts: word -> count from the catalog text (and optionally the query log: words
        searched often are offered first); every word in `known` is left as typed.
      known: words never corrected (default: every word of `counts`).
      options: lengths, distances and table bounds.
    """

    def __init__(self, counts: Dict[str, int], known: Optional[Iterable[str]] = None,
                 options: Optional[SpellerOptions] = None, name: str = "speller"):
        super().__init__(name=name)
        self.options = options = options or SpellerOptions()
        options.validate()
        known = sorted(set(counts) if known is None else set(known))
        frequent = [w for w, c in counts.items() if c >= options.min_count]
        offered = sorted((w for w, ok in zip(frequent, _correctable(frequent, options)) if ok),
                         key=lambda w: (-counts[w], w))[:options.max_words]
        self.num_words = len(offered)
        buckets: Dict[str, List[int]] = collections.defaultdict(list)
        for i, word in enumerate(offered):  # most frequent first, so buckets stay sorted
            for key in _deletes(word, _allowed(len(word), options)):
                bucket = buckets[key]
                if len(bucket) < options.candidates_per_key and (not bucket or bucket[-1] != i):
                    bucket.append(i)
        keys = sorted(buckets)
        table = np.full([len(keys) + 1, options.candidates_per_key], -1, np.int64)
        for row, key in enumerate(keys):
            table[row, :len(buckets[key])] = buckets[key]
        self.num_keys = len(keys)
        self._words = tf.Variable(np.asarray(offered + [""], dtype=object), trainable=False,
                                  dtype=tf.string, name="words")
        self._log_counts = tf.Variable(
            np.log1p([counts[w] for w in offered] + [0]).astype(np.float32), trainable=False,
            name="log_counts")
        self._candidates = tf.Variable(table, trainable=False, name="candidates")
        self._keys = _lookup(keys, "delete_keys")
        self._known = _lookup(known, "known_words")
        patterns = _deletion_patterns(options.max_length)
        self._patterns = tf.constant(patterns)
        self._pattern_drops = tf.constant((~patterns).sum(axis=1).astype(np.int32))

    def correct_words(self, words: tf.Tensor) -> tf.Tensor:
        """[N] normalised words -> [N] words, unknown ones replaced by their correction.

        Only unknown words are looked at, and only real candidates get an edit distance,
        so a query of catalog words costs one hash lookup per word.
        """
        o = self.options
        words = tf.reshape(tf.convert_to_tensor(words, tf.string), [-1])
        lengths = tf.strings.length(words, unit="UTF8_CHAR")
        eligible = (tf.less(self._known.lookup(words), 0)
                    & ~tf.strings.regex_full_match(words, _NOT_CORRECTED)
                    & (lengths >= o.min_length) & (lengths <= o.max_length))
        at = tf.where(eligible)  # [U, 1]
        fixed = self._correct_unknown(tf.gather_nd(words, at), tf.gather_nd(lengths, at))
        return tf.tensor_scatter_nd_update(words, at, fixed)

    def _correct_unknown(self, words: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
        """[U] unknown words -> [U] their best correction, or themselves."""
        o = self.options
        chars = tf.strings.unicode_split(words, "UTF-8")
        padded = chars.to_tensor("", shape=[None, o.max_length])  # [U, L]
        # Deletion keys [U, P]: a pattern applies if it drops only positions in the word,
        # at most as many as the word's length allows.
        in_word = tf.sequence_mask(lengths, o.max_length)  # [U, L]
        drops = tf.logical_and(~self._patterns[tf.newaxis], in_word[:, tf.newaxis])
        dropped = tf.reduce_sum(tf.cast(drops, tf.int32), -1)  # [U, P]
        allowed = tf.where(lengths >= o.long_length, 2, 1)[:, tf.newaxis]  # [U, 1]
        usable = tf.equal(dropped, self._pattern_drops[tf.newaxis]) & (dropped <= allowed)
        keep = tf.logical_and(self._patterns[tf.newaxis], in_word[:, tf.newaxis])
        keys = tf.strings.reduce_join(tf.where(keep, padded[:, tf.newaxis], ""), axis=-1)
        rows = tf.where(usable, self._keys.lookup(keys), -1)  # [U, P]
        cands = tf.gather(self._candidates, tf.where(rows < 0, tf.constant(self.num_keys, tf.int64), rows))
        cands = tf.reshape(cands, [tf.shape(words)[0], -1])  # [U, P*C], -1 = none
        # Exact edit distance of each real (word, candidate) pair.
        pairs = tf.where(cands >= 0)  # [M, 2]
        word_of = pairs[:, 0]
        cand = tf.gather_nd(cands, pairs)

        def distances() -> tf.Tensor:
            truth = tf.strings.unicode_split(tf.gather(self._words, cand), "UTF-8")
            return tf.edit_distance(tf.gather(chars, word_of).to_sparse(), truth.to_sparse(),
                                    normalize=False)

        # EditDistance refuses an empty batch: no candidate pair, no call.
        dist = tf.cond(tf.size(cand) > 0, distances, lambda: tf.zeros([0], tf.float32))
        ok = dist <= tf.cast(tf.gather(allowed[:, 0], word_of), tf.float32)
        # Fewest edits first, then the most frequent word.
        score = tf.where(ok, tf.gather(self._log_counts, cand) - 100.0 * dist, -1e9)
        n = tf.shape(words)[0]
        best = tf.math.unsorted_segment_max(score, word_of, n)  # [U]
        is_best = tf.logical_and(ok, tf.equal(score, tf.gather(best, word_of)))
        # Several pairs may tie (the same word via several keys): the lowest id wins.
        none = tf.constant(self.num_words, tf.int64)  # the table's padding row ("")
        pick = tf.math.unsorted_segment_min(tf.where(is_best, cand, none), word_of, n)
        found = tf.less(pick, none)
        return tf.where(found, tf.gather(self._words, tf.minimum(pick, none)), words)

    def corrections(self, queries: tf.Tensor) -> tf.Tensor:
        """[B] raw queries -> [B] strings of the corrected words only ("" if none).

        Appended to a query, they add the catalog's spelling without dropping what the
        shopper typed (a wrong correction costs a little precision, not the match).
        """
        segments = text_segments(normalize_text(tf.reshape(queries, [-1])))
        fixed = self.correct_words(segments.flat_values)
        changed = tf.not_equal(fixed, segments.flat_values)
        kept = tf.ragged.boolean_mask(segments.with_flat_values(fixed),
                                      segments.with_flat_values(changed))
        return tf.strings.reduce_join(kept, axis=1, separator=" ")

    def correct(self, queries: tf.Tensor) -> tf.Tensor:
        """[B] raw queries -> [B] normalised queries with unknown words corrected."""
        segments = text_segments(normalize_text(tf.reshape(queries, [-1])))
        fixed = segments.with_flat_values(self.correct_words(segments.flat_values))
        return tf.strings.reduce_join(fixed, axis=1, separator=" ")


def _lookup(keys: Sequence[str], name: str) -> tf.lookup.StaticHashTable:
    values = np.arange(len(keys), dtype=np.int64)
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(keys) or [""], tf.string),
                                            tf.constant(values if len(keys) else [-1],
                                                        tf.int64)),
        default_value=-1, name=name)


def speller_from_texts(catalog_texts: Sequence[str], queries: Sequence[str] = (),
                       options: Optional[SpellerOptions] = None) -> Tuple[Speller, Dict]:
    """A Speller over catalog text, with query-log counts boosting catalog words.

    Only catalog words are offered as corrections; query words are known (left alone)
    once they appear in `options.query_known` distinct queries.

    Args:
      catalog_texts: titles, brands, categories... of the catalog.
      queries: logged queries of the training period (duplicates count once).
      options: see SpellerOptions.

    Returns:
      (speller, summary dict: offered words, deletion keys, known words).
    """
    options = options or SpellerOptions()
    catalog = word_counts(catalog_texts)
    counts = dict(catalog)
    logged = word_counts(sorted(set(str(q) for q in queries)))
    for word, n in logged.items():
        if word in counts:
            counts[word] += n
    known = set(catalog) | {w for w, n in logged.items() if n >= options.query_known}
    speller = Speller(counts, known=known, options=options)
    # Kept (untracked) so a run can rebuild the same speller over a new product table.
    object.__setattr__(speller, "logged_queries", sorted(set(str(q) for q in queries)))
    return speller, {"words": speller.num_words, "keys": speller.num_keys,
                     "known": len(known)}
