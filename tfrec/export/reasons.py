"""Why an item was shown: one short reason per returned item, from the model's own signals.

Shops must be able to tell a shopper why an item is there. Reasons are measured, not
templated: the history item whose removal lowers the item's score most (leave-one-out
through the ranker), the query words the title matches, or the ranker's wide terms
(category / brand share, price fit, popularity) that lift it most.
"""

from __future__ import annotations

from typing import Dict, Optional

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.export.ranking import RankingCore
from tfrec.export.versioned import SignatureModule
from tfrec.models.ranking import CANDIDATE_INPUTS, NUMERIC_GROUPS

# Reason kinds, in the order their scores are stacked (query and profile are not scored).
SCORED_KINDS = ("history", "category", "brand", "price", "popularity")
KINDS = SCORED_KINDS + ("query", "profile")
REASON_OUTPUTS = ("reasons", "reason_kinds", "reason_items", "reason_words", "reason_scores")


def _without_each(history: tf.Tensor) -> tf.Tensor:
    """[B, H] -> [B, H, H]: row h is the history with position h removed ("" at the end)."""
    size = tf.shape(history)[1]
    padded = tf.concat([history, tf.fill([tf.shape(history)[0], 1], "")], axis=1)
    position = tf.range(size)[tf.newaxis, :]  # p
    removed = tf.range(size)[:, tf.newaxis]  # h
    source = tf.where(position < removed, position, position + 1)  # [H, H]; H is the pad
    return tf.gather(padded, source, axis=1)


def words(text: tf.Tensor) -> tf.Tensor:
    """Lower-cased words of each string ([N] -> [N, W], "" padded); Han characters are
    words of their own (Chinese has no spaces), other scripts split on non-letters."""
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"(\p{Han})", " \\1 ")
    text = tf.strings.regex_replace(text, r"[^\p{L}\p{N}]+", " ")
    return tf.strings.split(tf.strings.strip(text)).to_tensor("")


def matched_words(query: tf.Tensor, titles: tf.Tensor) -> tf.Tensor:
    """Query words found in each title, space-joined in query order: [B, L] strings.

    Args:
      query: [B] query text.
      titles: [B, L] candidate titles.
    """
    q = words(query)  # [B, Q]
    batch, size = tf.shape(titles)[0], tf.shape(titles)[1]
    t = tf.reshape(words(tf.reshape(titles, [-1])), [batch, size, -1])  # [B, L, T]
    found = tf.reduce_any(tf.equal(q[:, tf.newaxis, :, tf.newaxis],
                                   t[:, :, tf.newaxis, :]), axis=3)  # [B, L, Q]
    found = tf.logical_and(found, tf.not_equal(q, "")[:, tf.newaxis, :])
    kept = tf.where(found, tf.broadcast_to(q[:, tf.newaxis, :], tf.shape(found)), "")
    joined = tf.strings.reduce_join(kept, axis=2, separator=" ")
    return tf.strings.strip(tf.strings.regex_replace(joined, " +", " "))


class Reasons(SignatureModule):
    """Computes the reason of every shown item of a pipeline request.

    Args:
      core: the pipeline's ranking core (towers, ranker, catalog tables).
    """

    def __init__(self, core: RankingCore):
        super().__init__(name="tfrec_reasons")
        self.core = core

    def _scores(self, request: Dict[str, tf.Tensor], item_ids: tf.Tensor, rows: tf.Tensor,
                candidates: Optional[Dict[str, tf.Tensor]] = None):
        """Ranker score [B, L] of the items, and the ranker's inputs behind it."""
        core, ranker = self.core, self.core.ranker
        retrieval = core.retrieval_scores(core.query_embedding(request), rows)
        x = ranker.scoring_inputs({**request, "item_id": item_ids,
                                   "retrieval_score": retrieval},
                                  training=False, candidates=candidates)
        return ranker.score(ranker.logits(x)), x

    def history_effects(self, request: Dict[str, tf.Tensor], item_ids: tf.Tensor,
                        rows: tf.Tensor):
        """Leave-one-out effect of each history item on each item's score.

        Only the history changes between the passes, so the candidates' own inputs
        (ids, content, title text) are computed once and repeated.

        Returns:
          [B, H, L] score(full history) - score(history without item h), -inf where
          history position h is padding, and the items' standardised numeric features.
        """
        history = request["history"]
        batch, size = tf.shape(history)[0], tf.shape(history)[1]
        full, x = self._scores(request, item_ids, rows)
        repeat = lambda t: tf.repeat(t, size, axis=0)  # noqa: E731
        width = tf.shape(item_ids)[1]

        def per_request(t: tf.Tensor) -> tf.Tensor:
            """[B*L, d] -> [B*H*L, d]: each request's candidate rows, H times."""
            rows_ = tf.reshape(t, [batch, width, t.shape[-1]])
            return tf.reshape(repeat(rows_), [-1, t.shape[-1]])

        candidates = {name: per_request(x[name]) for name in CANDIDATE_INPUTS if name in x}
        loo = {name: repeat(value) for name, value in request.items() if name != "history"}
        loo["history"] = tf.reshape(_without_each(history), [batch * size, size])
        dropped, _ = self._scores(loo, repeat(item_ids), repeat(rows), candidates)
        effect = full[:, tf.newaxis, :] - tf.reshape(dropped, [batch, size, -1])
        real = tf.not_equal(history, "")[:, :, tf.newaxis]
        return tf.where(real, effect, float("-inf")), x["numeric"]

    def wide_effects(self, numeric: tf.Tensor) -> Dict[str, tf.Tensor]:
        """The ranker's linear (wide) term of each numeric feature group: [B, L] each."""
        ranker = self.core.ranker
        weights = tf.add_n([ranker.task_weight(t) * tf.reshape(ranker.wide[t].kernel, [-1])
                            for t in ranker.tasks])  # [NUMERIC_FEATURES]
        terms = numeric * tf.cast(weights, numeric.dtype)
        return {name: tf.reduce_sum(tf.gather(terms, list(columns), axis=2), axis=2)
                for name, columns in NUMERIC_GROUPS.items() if name != "retrieval"}

    def __call__(self, request: Dict[str, tf.Tensor], rows: tf.Tensor,
                 search: bool) -> Dict[str, tf.Tensor]:
        """Reasons of the shown items (rows [B, k] of the served catalog, -1 padding).

        Returns:
          reasons (text), reason_kinds (one of KINDS), reason_items (the cited history
          item), reason_words (matched query words), reason_scores (the score change or
          wide term behind the reason), all [B, k]; "" / 0 for padding.
        """
        core = self.core
        shown = rows >= 0
        item_ids = core.gather(core.item_ids, rows, "")
        effect, numeric = self.history_effects(request, item_ids, rows)
        # One more "" position, after the passes: argmax needs a column even without history.
        history = tf.concat([request["history"],
                             tf.fill([tf.shape(rows)[0], 1], "")], axis=1)
        effect = tf.concat([effect, tf.fill([tf.shape(rows)[0], 1, tf.shape(rows)[1]],
                                            float("-inf"))], axis=1)
        best = tf.argmax(effect, axis=1, output_type=tf.int32)  # [B, k]
        cited = tf.gather(history, best, batch_dims=1)
        wide = self.wide_effects(numeric)
        scored = tf.stack([tf.reduce_max(effect, axis=1)]
                          + [wide[k] for k in SCORED_KINDS[1:]], axis=2)  # [B, k, 5]
        pick = tf.argmax(scored, axis=2, output_type=tf.int32)
        value = tf.reduce_max(scored, axis=2)
        kind = tf.where(value > 0.0, tf.gather(tf.constant(SCORED_KINDS), pick), "profile")
        matched = tf.fill(tf.shape(rows), "")
        if search:
            matched = matched_words(request["query"], core.gather(core.titles, rows, ""))
            kind = tf.where(tf.not_equal(matched, ""), "query", kind)
        item = core.ranker.catalog(item_ids)
        cited_title = core.ranker.catalog(cited)["title"]
        cited_title = tf.where(tf.equal(cited_title, ""), cited, cited_title)
        texts = {
            "history": tf.strings.join(["because you viewed ", cited_title]),
            "category": tf.strings.join(["you often browse ", item["category"]]),
            "brand": tf.strings.join(["you often choose ", item["brand"]]),
            "price": tf.fill(tf.shape(rows), "in your usual price range"),
            "popularity": tf.strings.join(["popular in ", item["category"], " lately"]),
            "query": tf.strings.join(["matches your search: ", matched]),
            "profile": tf.fill(tf.shape(rows), "picked for your profile"),
        }
        reason = tf.fill(tf.shape(rows), "")
        for name, words_ in texts.items():
            reason = tf.where(tf.equal(kind, name), words_, reason)
        history_kind = tf.equal(kind, "history")
        return {
            "reasons": tf.where(shown, reason, ""),
            "reason_kinds": tf.where(shown, kind, ""),
            "reason_items": tf.where(tf.logical_and(shown, history_kind), cited, ""),
            "reason_words": tf.where(shown, matched, ""),
            "reason_scores": tf.where(shown, tf.where(tf.equal(kind, "query"), 0.0, value),
                                      0.0),
        }
