"""Why an item was shown: pipeline reasons, ranker attributions, and their faithfulness.

Reasons are checked for form on every returned item and for faithfulness with a
deletion test: removing the cited history item from the request must lower the item's
score more than removing another history item, over many real requests.
"""

from __future__ import annotations

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.export.reasons import KINDS, matched_words, words

DELETION_THRESHOLD = 0.8  # share of (request, item) pairs where the cited item matters most


@pytest.fixture(scope="module")
def modules(trained_run, trained_ranker, tiny_world):
    from tfrec.export.pipeline import PipelineModule
    from tfrec.export.ranking import RankerModule

    models = (trained_run.model, trained_ranker.model)
    return {"pipeline": PipelineModule(*models, tiny_world.catalog, max_per_brand=None),
            "ranker": RankerModule(*models, tiny_world.catalog)}


@pytest.fixture(scope="module")
def requests(tiny_world):
    """Real users with their last clicked / bought items as history (most recent first)."""
    events = tiny_world.events
    positives = events[events["event_type"].isin(["click", "purchase"])].sort_values("ts")
    out = []
    for user, rows in positives.groupby("user_id"):
        history = list(dict.fromkeys(rows["item_id"].tolist()[::-1]))[:8]
        if len(history) >= 3:
            out.append((user, history))
    return out[:40]


def _context(requests, width=8):
    users = np.array([u for u, _ in requests], dtype=object)
    history = np.array([h + [""] * (width - len(h)) for _, h in requests], dtype=object)
    n = len(requests)
    return dict(user_id=tf.constant(users), history=tf.constant(history),
                device=tf.constant(["mobile"] * n), hour=tf.constant([20] * n, tf.int64))


def _recommend(pipeline, requests, k=5):
    n = len(requests)
    return pipeline.recommend(**_context(requests), k=tf.constant([k] * n),
                              exclude_item_ids=tf.constant([[""]] * n),
                              purchased_item_ids=tf.constant([[""]] * n))


def test_words_keep_unicode_and_split_han_characters():
    got = words(tf.constant(["Perceuse sans-fil DORÉE", "无线耳机 Pro"])).numpy()
    assert [w.decode() for w in got[0] if w] == ["perceuse", "sans", "fil", "dorée"]
    assert [w.decode() for w in got[1] if w] == ["无", "线", "耳", "机", "pro"]
    matched = matched_words(tf.constant(["dorée drill", "蓝牙耳机"]),
                            tf.constant([["Perceuse DORÉE", "hammer"], ["无线耳机", "键盘"]]))
    assert [[m.decode() for m in row] for row in matched.numpy()] == [["dorée", ""],
                                                                     ["耳 机", ""]]


def test_every_recommended_item_has_a_well_formed_reason(modules, requests):
    out = {k: v.numpy() for k, v in _recommend(modules["pipeline"], requests).items()}
    for row, (_, history) in enumerate(requests):
        for i, item in enumerate(out["item_ids"][row]):
            kind, reason = out["reason_kinds"][row][i].decode(), out["reasons"][row][i].decode()
            cited = out["reason_items"][row][i].decode()
            if not item:
                assert (kind, reason, cited) == ("", "", "")
                continue
            assert kind in KINDS and kind != "query" and reason, (kind, reason)
            assert (cited in history) == (kind == "history") and (cited == "") != (
                kind == "history")
            if kind == "history":
                assert reason.startswith("because you viewed ")
                assert out["reason_scores"][row][i] > 0
    kinds = {k.decode() for k in out["reason_kinds"].ravel() if k}
    assert "history" in kinds, kinds


def test_removing_the_cited_history_item_lowers_the_score_most(modules, requests):
    """Deletion test through the ranker: the cited item versus every other history item."""
    out = {k: v.numpy() for k, v in _recommend(modules["pipeline"], requests).items()}
    ranker = modules["ranker"]
    beats, total = 0, 0
    for row, (user, history) in enumerate(requests):
        shown = [i.decode() for i in out["item_ids"][row] if i]
        cited = [c.decode() for c in out["reason_items"][row][:len(shown)]]

        def scores(hist):
            got = ranker.rank(query=tf.constant([""]), user_id=tf.constant([user]),
                              history=tf.constant([hist + [""] * (8 - len(hist))]),
                              device=tf.constant(["mobile"]), hour=tf.constant([20], tf.int64),
                              candidate_ids=tf.constant([shown]))
            ids = [i.decode() for i in got["item_ids"].numpy()[0]]
            return dict(zip(ids, got["scores"].numpy()[0]))

        full = scores(history)
        without = {h: scores([x for x in history if x != h]) for h in history}
        for item, c in zip(shown, cited):
            if not c:
                continue
            drops = {h: full[item] - without[h][item] for h in history}
            others = [d for h, d in drops.items() if h != c]
            total += len(others)
            beats += sum(drops[c] > d for d in others)
    assert total > 50, total
    assert beats / total >= DELETION_THRESHOLD, (beats, total)


def test_search_reasons_cite_the_query_words_the_title_holds(modules, requests, tiny_world):
    pipeline = modules["pipeline"]
    word = tiny_world.catalog["title"].str.split().str[-1].mode()[0]
    n = len(requests)
    out = pipeline.search(query=tf.constant([f"{word} please"] * n), **_context(requests),
                          k=tf.constant([5] * n), exclude_item_ids=tf.constant([[""]] * n),
                          purchased_item_ids=tf.constant([[""]] * n))
    out = {k: v.numpy() for k, v in out.items()}
    seen_query = 0
    for row in range(n):
        for i, item in enumerate(out["item_ids"][row]):
            if not item:
                continue
            kind = out["reason_kinds"][row][i].decode()
            title = out["titles"][row][i].decode().lower()
            matched = out["reason_words"][row][i].decode()
            assert (kind == "query") == bool(matched)
            if matched:
                seen_query += 1
                assert all(w in title for w in matched.split()), (matched, title)
                assert out["reasons"][row][i].decode() == f"matches your search: {matched}"
    assert seen_query > 0


def test_ranker_attributions_add_up_to_the_score_change(modules, requests, tiny_world):
    ranker = modules["ranker"]
    user, history = requests[0]
    candidates = tiny_world.catalog["item_id"].tolist()[:6]
    inputs = dict(query=tf.constant(["wireless"]), user_id=tf.constant([user]),
                  history=tf.constant([history]), device=tf.constant(["mobile"]),
                  hour=tf.constant([20], tf.int64), candidate_ids=tf.constant([candidates]))
    got = {k: v.numpy() for k, v in ranker.explain(**inputs).items()}
    ranked = {k: v.numpy() for k, v in ranker.rank(**inputs).items()}
    by_id = dict(zip([i.decode() for i in ranked["item_ids"][0]], ranked["scores"][0]))
    # explain keeps request order; its scores are the ranker's
    assert [i.decode() for i in got["item_ids"][0]] == candidates
    np.testing.assert_allclose(got["scores"][0], [by_id[c] for c in candidates], rtol=1e-4,
                               atol=1e-4)
    groups = sum(got[f"{g}_attributions"][0] for g in
                 ("user", "history", "item", "context", "text", "retrieval"))
    change = got["scores"][0] - got["baseline_scores"][0]
    np.testing.assert_allclose(groups, change, rtol=0.05, atol=0.02 + 0.02 * np.abs(change).max())
    assert np.abs(got["history_attributions"][0]).sum() > 0


def test_a_request_with_no_history_columns_gets_reasons(modules, requests):
    n = 2
    context = _context(requests[:n])
    context["history"] = tf.zeros([n, 0], tf.string)  # width 0: TF Serving allows it
    out = modules["pipeline"].recommend(**context, k=tf.constant([3] * n),
                                        exclude_item_ids=tf.constant([[""]] * n),
                                        purchased_item_ids=tf.constant([[""]] * n))
    kinds = out["reason_kinds"].numpy().ravel()
    assert all(k and k.decode() != "history" for k in kinds), kinds
    assert all(r for r in out["reasons"].numpy().ravel())
