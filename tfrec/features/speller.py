"""Query spelling correction learned from the catalog, in TensorFlow ops (symmetric delete).

Shoppers misspell ("vynal", "toliet", "ceadar"); BM25 then matches nothing. A word the
catalog never uses is replaced by the most frequent catalog word within a small edit
distance. Candidates come from a table of words-with-characters-deleted built at export
(SymSpell's idea), so serving needs only core ops: one hash lookup per deletion pattern
and an edit distance per candidate, whatever the catalog size.

CJK text has no words to look up; its typical slip is one wrong character with the same
reading (a pinyin input slip: 无线耳饥 for 无线耳机). A character neither of whose
neighbouring bigrams the catalog knows is replaced by the catalog's most frequent
character between the same neighbours (a table of trigrams with the middle left out).

Compounds are typed both ways ("lawnmower" / "lawn mower", "out door" / "outdoor"): an
unknown word with no correction is split into two catalog words, and two typed words
whose concatenation is a catalog word add it.
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
        The same holds for CJK character bigrams.
      cjk: correct single characters in CJK runs from their neighbours.
      cjk_min_count: times a character bigram / trigram must occur in the catalog to be
        offered as a CJK correction.
      compounds: split unknown words into two catalog words and join typed word pairs
        that the catalog writes as one word.
      part_min_length: letters of each part of a split or joined compound (shorter parts
        match by accident: "kid" + "die").
    """

    min_length: int = 4
    long_length: int = 5
    max_length: int = 20
    min_count: int = 2
    max_words: int = 200_000
    candidates_per_key: int = 4
    query_known: int = 10
    cjk: bool = True
    cjk_min_count: int = 2
    compounds: bool = True
    part_min_length: int = 3

    def validate(self) -> None:
        if not 1 <= self.min_length <= self.long_length <= self.max_length:
            raise ValueError("need 1 <= min_length <= long_length <= max_length, got "
                             f"{self.min_length}, {self.long_length}, {self.max_length}")
        if self.max_length > 32:
            raise ValueError(f"max_length must be <= 32 (deletion patterns grow as its "
                             f"square), got {self.max_length}")
        for name in ("min_count", "max_words", "candidates_per_key", "query_known",
                     "cjk_min_count", "part_min_length"):
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
_CJK_RUN = f"{CJK_CHAR}{{2,}}"  # a CJK run of two or more characters
_GAP = "\x00"  # the left-out character of a context key


def _context_key(run: str, i: int) -> str:
    """The context of run[i]: one character each side inside the run, two at its ends."""
    if 0 < i < len(run) - 1:
        return run[i - 1] + _GAP + run[i + 1]
    if i > 0:
        return run[max(0, i - 2):i] + _GAP
    return _GAP + run[i + 1:i + 3]


def cjk_contexts(counts: Dict[str, int], min_count: int = 2
                 ) -> Tuple[Dict[str, int], Dict[str, str]]:
    """Character bigram counts of the CJK runs in `counts`, and context -> best character.

    Context keys: "a\\0b" (between a and b), "za\\0" (after za, at a run's end),
    "\\0bc" (before bc, at its start; one character in two-character runs); the value is
    the character most often seen there (ties: the smallest), among contexts seen at
    least `min_count` times.
    """
    bigrams: Dict[str, int] = collections.Counter()
    seen: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    runs = [w for w in counts if len(w) >= 2]
    cjk = tf.strings.regex_full_match(tf.constant(runs or [""], tf.string), _CJK_RUN).numpy()
    for run, is_cjk in zip(runs, cjk):
        if not is_cjk:
            continue
        n = counts[run]
        for i, c in enumerate(run):
            if i + 1 < len(run):
                bigrams[run[i:i + 2]] += n
            seen[_context_key(run, i)][c] += n
    best = {}
    for key, chars in seen.items():
        char, n = min(chars.items(), key=lambda kv: (-kv[1], kv[0]))
        if n >= min_count:
            best[key] = char
    return dict(bigrams), best


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
      known_bigrams: CJK character bigrams never corrected besides the catalog's (e.g.
        those frequent in the query log).
    """

    def __init__(self, counts: Dict[str, int], known: Optional[Iterable[str]] = None,
                 options: Optional[SpellerOptions] = None, name: str = "speller",
                 known_bigrams: Iterable[str] = ()):
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
        bigrams, contexts = cjk_contexts(counts, options.cjk_min_count)
        self.num_contexts = len(contexts) if options.cjk else 0
        self._bigrams = _lookup(sorted(set(bigrams) | set(known_bigrams)), "cjk_bigrams")
        keys = sorted(contexts) if options.cjk else []
        self._contexts = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(keys or [_GAP], tf.string),
                                                tf.constant([contexts[k] for k in keys] or [""],
                                                            tf.string)),
            default_value="", name="cjk_contexts")
        # Compound parts: frequent catalog words of letters only (no digit, no CJK).
        parts = sorted((w for w, ok in zip(frequent, _correctable(
            frequent, dataclasses.replace(options, min_length=options.part_min_length)))
            if ok), key=lambda w: (-counts[w], w))[:options.max_words] if options.compounds else []
        self.num_parts = len(parts)
        self._parts = _lookup(parts, "compound_parts")
        self._part_log_counts = tf.constant(
            np.log1p([counts[w] for w in parts] + [0]).astype(np.float32))
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
        unknown, unknown_lengths = tf.gather_nd(words, at), tf.gather_nd(lengths, at)

        def correct() -> tf.Tensor:
            fixed = self._correct_unknown(unknown, unknown_lengths)
            if o.compounds:  # no word within reach: maybe two fused ("lawnmower")
                fixed = tf.where(tf.equal(fixed, unknown),
                                 self._split_compounds(unknown, unknown_lengths), fixed)
            return tf.tensor_scatter_nd_update(words, at, fixed)

        # Most queries are all catalog words: their batch skips the correction graph.
        words = tf.cond(tf.size(at) > 0, correct, lambda: words)
        if not o.cjk:
            return words
        runs = tf.where(tf.less(self._known.lookup(words), 0)
                        & tf.strings.regex_full_match(words, _CJK_RUN))
        return tf.cond(tf.size(runs) > 0, lambda: tf.tensor_scatter_nd_update(
            words, runs, self._correct_cjk(tf.gather_nd(words, runs))), lambda: words)

    def _correct_cjk(self, runs: tf.Tensor) -> tf.Tensor:
        """[R] CJK runs -> [R] runs with each unsupported character replaced when the
        catalog has a character for its context.

        A character is unsupported when no bigram it is part of is known (so one wrong
        character in a known phrase is, and its correct neighbours are not).
        """
        chars = tf.strings.unicode_split(runs, "UTF-8")
        flat = chars.flat_values
        starts = tf.gather(chars.row_starts(), chars.value_rowids())
        position = tf.range(tf.size(flat, out_type=tf.int64)) - starts
        last = tf.gather(chars.row_lengths(), chars.value_rowids()) - 1
        has_left, has_right = position > 0, position < last
        left = tf.where(has_left, tf.roll(flat, 1, axis=0), "")
        right = tf.where(has_right, tf.roll(flat, -1, axis=0), "")
        known_left = has_left & (self._bigrams.lookup(left + flat) >= 0)
        known_right = has_right & (self._bigrams.lookup(flat + right) >= 0)
        unsupported = ~known_left & ~known_right
        # _context_key in graph: "a\0b" inside, "za\0" / "\0bc" at the ends.
        far_left = tf.where(position > 1, tf.roll(flat, 2, axis=0), "")
        far_right = tf.where(position < last - 1, tf.roll(flat, -2, axis=0), "")
        key = tf.where(has_left & has_right, left + _GAP + right,
                       tf.where(has_left, far_left + left + _GAP, _GAP + right + far_right))
        candidate = self._contexts.lookup(key)
        fixed = tf.where(unsupported & tf.not_equal(candidate, ""), candidate, flat)
        return tf.strings.reduce_join(chars.with_flat_values(fixed), axis=1)

    def _split_compounds(self, words: tf.Tensor, lengths: tf.Tensor) -> tf.Tensor:
        """[U] words -> [U] "left right" where both halves are catalog words (the split
        whose rarer half is most frequent), else the word itself."""
        o = self.options
        cut = tf.range(1, o.max_length, dtype=tf.int32)[tf.newaxis]  # [1, L-1]
        lengths = tf.cast(lengths, tf.int32)[:, tf.newaxis]  # [U, 1]
        cut = tf.broadcast_to(cut, [tf.shape(words)[0], o.max_length - 1])
        at = tf.minimum(cut, lengths)  # substr refuses positions past the end
        spread = tf.broadcast_to(words[:, tf.newaxis], tf.shape(cut))
        left = tf.strings.substr(spread, tf.zeros_like(at), at, unit="UTF8_CHAR")
        right = tf.strings.substr(spread, at, lengths - at, unit="UTF8_CHAR")
        li, ri = self._parts.lookup(left), self._parts.lookup(right)
        ok = ((cut >= o.part_min_length) & (lengths - cut >= o.part_min_length)
              & (li >= 0) & (ri >= 0))
        none = tf.constant(self.num_parts, tf.int64)  # the log-count padding (0)
        rarer = tf.minimum(tf.gather(self._part_log_counts, tf.where(li >= 0, li, none)),
                           tf.gather(self._part_log_counts, tf.where(ri >= 0, ri, none)))
        best = tf.argmax(tf.where(ok, rarer, -1.0), axis=1, output_type=tf.int32)
        split = tf.strings.join([tf.gather(left, best, batch_dims=1),
                                 tf.gather(right, best, batch_dims=1)], separator=" ")
        return tf.where(tf.reduce_any(ok, axis=1), split, words)

    def _joined_pairs(self, segments: tf.RaggedTensor) -> tf.RaggedTensor:
        """Ragged [B, J]: each pair of neighbouring typed words whose concatenation is a
        catalog word ("out door" -> "outdoor"), as that word."""
        o = self.options
        flat = segments.flat_values
        rows = segments.value_rowids()
        after = tf.concat([flat[1:], [""]], 0)
        same_query = tf.concat([tf.equal(rows[1:], rows[:-1]), [False]], 0)
        lengths = tf.strings.length(flat, unit="UTF8_CHAR")
        letters = (~tf.strings.regex_full_match(flat, _NOT_CORRECTED)
                   & (lengths >= o.part_min_length))
        joined = flat + after
        hit = (same_query & letters & tf.concat([letters[1:], [False]], 0)
               & (self._parts.lookup(joined) >= 0))
        return tf.ragged.boolean_mask(segments.with_flat_values(joined),
                                      segments.with_flat_values(hit))

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
        """[B] raw queries -> [B] strings of the corrected words only ("" if none), then
        the compounds that typed word pairs join into.

        Appended to a query, they add the catalog's spelling without dropping what the
        shopper typed (a wrong correction costs a little precision, not the match).
        """
        segments = text_segments(normalize_text(tf.reshape(queries, [-1])))
        fixed = self.correct_words(segments.flat_values)
        changed = tf.not_equal(fixed, segments.flat_values)
        kept = tf.ragged.boolean_mask(segments.with_flat_values(fixed),
                                      segments.with_flat_values(changed))
        if self.options.compounds:
            kept = tf.concat([kept, self._joined_pairs(segments)], axis=1)
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
    # A bigram in that many distinct queries is the shoppers' own word, not a slip.
    query_bigrams, _ = cjk_contexts(dict(logged))
    speller = Speller(counts, known=known, options=options,
                      known_bigrams=[b for b, n in query_bigrams.items()
                                     if n >= options.query_known])
    # Kept (untracked) so a run can rebuild the same speller over a new product table.
    object.__setattr__(speller, "logged_queries", sorted(set(str(q) for q in queries)))
    return speller, {"words": speller.num_words, "keys": speller.num_keys,
                     "known": len(known)}
