"""Metrics and baselines checked against small cases computed by hand."""

from __future__ import annotations

from math import log2

import numpy as np
import pandas as pd
import pytest

from tfrec.evaluation import (
    CooccurrenceBaseline,
    PopularityBaseline,
    auc,
    average_precision_at_k,
    catalog_coverage,
    evaluate_topk,
    gauc,
    hit_rate_at_k,
    map_at_k,
    mrr,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    topk_ids,
)

# ----------------------------------------------------------------------------
# Top-k list metrics
# ----------------------------------------------------------------------------


def test_recall_at_k_hand_computed():
    # Relevant {a, c}; top 2 of [a, b, c] holds only a -> 1/2; top 3 holds both.
    assert recall_at_k([["a", "b", "c"]], [{"a", "c"}], 2) == pytest.approx(0.5)
    assert recall_at_k([["a", "b", "c"]], [{"a", "c"}], 3) == pytest.approx(1.0)
    # Mean over users: 1/2 and 0/1.
    assert recall_at_k([["a", "b"], ["x", "y"]], [{"a", "c"}, {"z"}], 2) == pytest.approx(0.25)


def test_precision_divides_by_k_even_for_short_lists():
    assert precision_at_k([["a", "b", "c"]], [{"a", "c"}], 2) == pytest.approx(1 / 2)
    # k larger than the list: 2 hits / k=5.
    assert precision_at_k([["a", "b", "c"]], [{"a", "c"}], 5) == pytest.approx(2 / 5)


def test_hit_rate_at_k():
    rec = [["a", "b"], ["x", "y"]]
    rel = [{"b"}, {"z"}]
    assert hit_rate_at_k(rec, rel, 1) == pytest.approx(0.0)
    assert hit_rate_at_k(rec, rel, 2) == pytest.approx(0.5)


def test_binary_ndcg_hand_computed():
    # [b, a, c] with relevant {a, c}: hits at ranks 2 and 3.
    dcg = 1 / log2(3) + 1 / log2(4)
    idcg = 1 / log2(2) + 1 / log2(3)
    assert ndcg_at_k([["b", "a", "c"]], [{"a", "c"}], 3) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.693426, abs=1e-6)
    # At k=1 the only slot is a miss.
    assert ndcg_at_k([["b", "a", "c"]], [{"a", "c"}], 1) == pytest.approx(0.0)


def test_graded_ndcg_linear_and_exponential():
    rec = [["c", "a", "x"]]
    rel = [{"a": 3, "b": 2, "c": 1}]
    dcg = 1 / log2(2) + 3 / log2(3)  # c at rank 1, a at rank 2, x misses
    idcg = 3 / log2(2) + 2 / log2(3) + 1 / log2(4)  # ideal order a, b, c
    assert ndcg_at_k(rec, rel, 3) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.607492, abs=1e-6)

    exp_dcg = (2**1 - 1) / log2(2) + (2**3 - 1) / log2(3)
    exp_idcg = (2**3 - 1) / log2(2) + (2**2 - 1) / log2(3) + (2**1 - 1) / log2(4)
    assert ndcg_at_k(rec, rel, 3, gain="exponential") == pytest.approx(exp_dcg / exp_idcg)

    # Ideal DCG at k=2 only uses the two best gains (3 and 2).
    assert ndcg_at_k(rec, rel, 2) == pytest.approx(dcg / (3 + 2 / log2(3)))


def test_graded_zero_gain_is_not_relevant():
    rec = [["a", "b"]]
    assert recall_at_k(rec, [{"a": 0, "b": 2}], 2) == pytest.approx(1.0)
    assert ndcg_at_k(rec, [{"a": 0, "b": 2}], 1) == pytest.approx(0.0)


def test_mrr_with_and_without_cutoff():
    rec = [["x", "a", "b"], ["c", "y"]]
    rel = [{"a"}, {"c"}]
    assert mrr(rec, rel) == pytest.approx((1 / 2 + 1) / 2)
    assert mrr(rec, rel, k=1) == pytest.approx((0 + 1) / 2)
    assert mrr([["x", "y"]], [{"a"}]) == pytest.approx(0.0)


def test_average_precision_normalised_by_min_relevant_k():
    # Hits at ranks 1 and 3: precisions 1/1 and 2/3.
    rec = ["a", "x", "b", "y"]
    rel = {"a", "b", "c"}
    assert average_precision_at_k(rec, rel, 4) == pytest.approx((1 + 2 / 3) / 3)
    # k=2: one hit, normalised by min(3, 2) = 2 (not by |relevant| = 3).
    assert average_precision_at_k(rec, rel, 2) == pytest.approx(1 / 2)
    # A perfect top k scores 1 although the user has more relevant items than k.
    assert average_precision_at_k(["a", "b"], rel, 2) == pytest.approx(1.0)


def test_map_at_k_is_mean_of_average_precision():
    rec = [["a", "x", "b", "y"], ["z", "q", "w", "v"], ["p", "q"]]
    rel = [{"a", "b", "c"}, {"w"}, set()]  # third user excluded
    expected = ((1 + 2 / 3) / 3 + (1 / 3) / 1) / 2
    assert map_at_k(rec, rel, 4) == pytest.approx(expected)


def test_users_without_relevant_items_are_excluded():
    assert recall_at_k([["a"], ["b"]], [{"a"}, set()], 1) == pytest.approx(1.0)
    assert ndcg_at_k([["a"], ["b"]], [{"a"}, None], 1) == pytest.approx(1.0)
    assert np.isnan(recall_at_k([["a"]], [set()], 1))
    assert evaluate_topk([["a"], ["b"]], [{"a"}, set()], ks=(1,))["users"] == 1


def test_padding_never_matches_and_ragged_lists():
    # "" in relevant is ignored, "" in the list never hits.
    assert recall_at_k([["", "a", ""]], [{"", "a"}], 3) == pytest.approx(1.0)
    assert precision_at_k([["a", "", ""]], [{"a", "b"}], 3) == pytest.approx(1 / 3)
    # Ragged rows are padded; None also counts as padding.
    rec = [["a"], ["b", "c", None]]
    assert recall_at_k(rec, [{"a"}, {"c", "d"}], 10) == pytest.approx((1 + 1 / 2) / 2)


def test_repeated_recommendation_counts_once():
    assert recall_at_k([["a", "a"]], [{"a", "b"}], 2) == pytest.approx(0.5)
    assert precision_at_k([["a", "a"]], [{"a", "b"}], 2) == pytest.approx(0.5)


def test_numpy_and_integer_ids():
    rec = np.array([[10, 20, 30], [5, 6, 7]])
    assert recall_at_k(rec, [[30], {5, 99}], 3) == pytest.approx((1 + 0.5) / 2)
    # Bytes (as produced by TF string tensors) match Python strings.
    assert recall_at_k(np.array([[b"a", b"b"]]), [{"b"}], 2) == pytest.approx(1.0)


def test_catalog_coverage():
    assert catalog_coverage([["a", "b"], ["b", "c", ""]], 10) == pytest.approx(0.3)
    assert catalog_coverage([["a", "b"], ["b", "c"]], 10, k=1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="catalog_size"):
        catalog_coverage([["a", "b"]], 1)


def test_evaluate_topk_keys_and_values():
    rec = [["a", "b", "c"], ["x", "y", "z"]]
    rel = [{"a", "c"}, {"z"}]
    out = evaluate_topk(rec, rel, ks=(1, 3))
    assert out["users"] == 2
    assert set(out) == {
        f"{m}@{k}" for m in ("recall", "precision", "hit_rate", "ndcg", "map") for k in (1, 3)
    } | {"mrr", "users"}
    assert out["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["hit_rate@1"] == pytest.approx(0.5)
    assert out["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert out["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 3) / 1) / 2)
    # Identical to the standalone functions.
    assert out["ndcg@3"] == pytest.approx(ndcg_at_k(rec, rel, 3))
    # k beyond the list width is fine.
    assert evaluate_topk(rec, rel, ks=(100,))["recall@100"] == pytest.approx(1.0)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, None])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError, match="k"):
        recall_at_k([["a"]], [{"a"}], k)


def test_input_validation():
    with pytest.raises(ValueError, match="2 users but relevant has 1"):
        recall_at_k([["a"], ["b"]], [{"a"}], 1)
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.array(["a", "b"]), [{"a"}, {"b"}], 1)
    with pytest.raises(ValueError, match="ranked sequence"):
        recall_at_k(["ab"], [{"a"}], 1)
    with pytest.raises(ValueError, match="single string"):
        recall_at_k([["a"]], ["a"], 1)
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_k([["a"]], [{"a": -1}], 1)
    with pytest.raises(ValueError, match="gain"):
        ndcg_at_k([["a"]], [{"a"}], 1, gain="log")
    with pytest.raises(ValueError, match="aligned"):
        recall_at_k([["a"]], {"u1": {"a"}}, 1)
    with pytest.raises(ValueError, match="ks"):
        evaluate_topk([["a"]], [{"a"}], ks=())


# ----------------------------------------------------------------------------
# AUC and GAUC
# ----------------------------------------------------------------------------


def test_auc_with_ties():
    # Pairs (pos, neg): (0.9, 0.9) tie -> 0.5, (0.9, 0.1) -> 1, (0.5, 0.9) -> 0,
    # (0.5, 0.1) -> 1; 2.5 / 4.
    assert auc([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == pytest.approx(0.625)
    assert auc([1, 1, 0], [3.0, 2.0, 1.0]) == pytest.approx(1.0)
    assert auc([0, 0, 1], [3.0, 2.0, 1.0]) == pytest.approx(0.0)
    assert auc([True, False], [0.5, 0.5]) == pytest.approx(0.5)


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 10, 200).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(labels, scores) == pytest.approx(pairwise)


def test_gauc_weights_users_by_example_count():
    # u1: AUC 1 over 2 examples; u2: positives 0.1, 0.9 vs negatives 0.5, 0.3 -> 2/4
    # over 4 examples; u3: only positives -> skipped.
    users = ["u2", "u1", "u2", "u3", "u2", "u1", "u2", "u3"]
    labels = [1, 1, 0, 1, 0, 0, 1, 1]
    scores = [0.1, 0.8, 0.5, 0.3, 0.3, 0.2, 0.9, 0.7]
    assert gauc(users, labels, scores) == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)
    # A single user reduces to plain AUC.
    assert gauc(["u"] * 4, [1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == pytest.approx(0.625)


def test_auc_validation():
    with pytest.raises(ValueError, match="both positive and negative"):
        auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        auc([2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [np.nan, 0.2])
    with pytest.raises(ValueError, match="entries"):
        auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="user_ids"):
        gauc(["a"], [1, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one user"):
        gauc(["a", "b"], [1, 0], [0.1, 0.2])


# ----------------------------------------------------------------------------
# topk_ids
# ----------------------------------------------------------------------------


def test_topk_ids_orders_and_excludes():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.0]])
    ids = np.array(["a", "b", "c", "d"])
    np.testing.assert_array_equal(topk_ids(scores, ids, 2), [["b", "d"], ["a", "b"]])
    np.testing.assert_array_equal(
        topk_ids(scores, ids, 2, exclude=[{1}, set()]), [["d", "c"], ["a", "b"]]
    )
    # k above the number of items is capped.
    assert topk_ids(scores, ids, 10).shape == (2, 4)
    # Rows that run out of admissible items are padded, never filled with excluded ids.
    out = topk_ids(scores[:1], ids, 3, exclude=[{0, 1, 2}])
    np.testing.assert_array_equal(out, [["d", "", ""]])
    # Ties resolve to the lower column index.
    np.testing.assert_array_equal(topk_ids(np.zeros((1, 3)), np.array([7, 8, 9]), 2), [[7, 8]])


def test_topk_ids_feeds_metrics():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    rec = topk_ids(scores, np.array([10, 20, 30]), 2)
    assert recall_at_k(rec, [{20}, {30}], 2) == pytest.approx(0.5)


def test_topk_ids_validation():
    with pytest.raises(ValueError, match="2-D"):
        topk_ids(np.zeros(3), np.arange(3), 1)
    with pytest.raises(ValueError, match="item_ids"):
        topk_ids(np.zeros((1, 3)), np.arange(2), 1)
    with pytest.raises(ValueError, match="exclude"):
        topk_ids(np.zeros((2, 3)), np.arange(3), 1, exclude=[set()])
    with pytest.raises(ValueError, match="outside"):
        topk_ids(np.zeros((1, 3)), np.arange(3), 1, exclude=[{3}])


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------


def _events(rows):
    """Events table from (ts, user_id, event_type, item_id) tuples."""
    frame = pd.DataFrame(rows, columns=["ts", "user_id", "event_type", "item_id"])
    frame["session_id"] = frame["user_id"] + "-s"
    frame["query"] = ""
    frame["device"] = "desktop"
    frame["position"] = -1
    return frame


@pytest.fixture
def popularity_events():
    return _events(
        [
            (1, "u1", "click", "i1"),
            (2, "u2", "click", "i1"),
            (3, "u3", "click", "i1"),
            (4, "u1", "purchase", "i2"),
            (5, "u2", "purchase", "i2"),
            (6, "u3", "click", "i3"),
            # Not positives: impressions and searches.
            (7, "u1", "impression", "i4"),
            (7, "u2", "impression", "i4"),
            (7, "u3", "impression", "i4"),
            (7, "u4", "impression", "i4"),
            (8, "u1", "search", ""),
            # The future (ts >= 10) must not leak into a fit with until_ts=10.
            (10, "u1", "purchase", "i5"),
            (11, "u2", "purchase", "i5"),
            (12, "u3", "purchase", "i5"),
            (13, "u4", "purchase", "i5"),
        ]
    )


def test_popularity_ranks_by_counts(popularity_events):
    model = PopularityBaseline().fit(popularity_events, until_ts=10)
    assert model.recommend(["u1", "unknown"], k=3) == [["i1", "i2", "i3"]] * 2
    assert model.popularity.to_dict() == {"i1": 3.0, "i2": 2.0, "i3": 1.0}


def test_popularity_weighted_counts(popularity_events):
    model = PopularityBaseline(weighted=True).fit(popularity_events, until_ts=10)
    # Purchases weigh 3: i2 = 6 > i1 = 3 > i3 = 1.
    assert model.recommend(["u1"], k=3) == [["i2", "i1", "i3"]]


def test_popularity_no_look_ahead(popularity_events):
    assert "i5" not in PopularityBaseline().fit(popularity_events, until_ts=10).popularity
    # Without a cut-off the later purchases dominate.
    assert PopularityBaseline().fit(popularity_events).recommend(["u1"], k=1) == [["i5"]]
    # until_ts is exclusive: the event at ts=10 is not counted.
    assert PopularityBaseline().fit(popularity_events, until_ts=11).popularity["i5"] == 1.0


def test_popularity_exclusion_still_returns_k(popularity_events):
    model = PopularityBaseline().fit(popularity_events, until_ts=10)
    recs = model.recommend(["u1", "u2"], k=2, exclude={"u1": {"i1"}})
    assert recs == [["i2", "i3"], ["i1", "i2"]]
    # Fewer items than k once everything is excluded.
    assert model.recommend(["u1"], k=3, exclude={"u1": {"i1", "i2"}}) == [["i3"]]


def test_popularity_validation(popularity_events):
    with pytest.raises(RuntimeError, match="fit"):
        PopularityBaseline().recommend(["u1"], k=1)
    with pytest.raises(ValueError, match="missing columns"):
        PopularityBaseline().fit(popularity_events.drop(columns=["item_id"]))
    with pytest.raises(ValueError, match="k"):
        PopularityBaseline().fit(popularity_events).recommend(["u1"], k=0)


@pytest.fixture
def basket_events():
    # A and B are bought together by u1 and u2; C goes with A once (u2) and with D (u3);
    # E is popular on its own. The late u9 event pairs A with F after the cut-off.
    return _events(
        [
            (1, "u1", "purchase", "A"),
            (2, "u1", "click", "B"),
            (3, "u2", "click", "A"),
            (4, "u2", "add_to_cart", "B"),
            (5, "u2", "click", "C"),
            (6, "u3", "click", "C"),
            (7, "u3", "click", "D"),
            (8, "u4", "click", "E"),
            (8, "u5", "click", "E"),
            (8, "u6", "click", "E"),
            (8, "u7", "click", "E"),
            (9, "u1", "impression", "D"),
            (20, "u9", "click", "A"),
            (21, "u9", "click", "F"),
        ]
    )


def test_cooccurrence_recommends_co_consumed_items(basket_events):
    model = CooccurrenceBaseline(similarity="jaccard").fit(basket_events, until_ts=20)
    # History [A]: jaccard(A, B) = 2 / (2 + 2 - 2) = 1, jaccard(A, C) = 1 / (2 + 2 - 1);
    # the third slot falls back to the most popular remaining item (E, 4 users).
    recs = model.recommend(["x"], {"x": ["A"]}, k=3)
    assert recs == [["B", "C", "E"]]
    # No look-ahead: F only co-occurs with A after the cut-off.
    assert "F" not in model.recommend(["x"], {"x": ["A"]}, k=10)[0]
    assert model.similar_items("A", 5) == ["B", "C"]


def test_cooccurrence_sums_similarity_over_history(basket_events):
    model = CooccurrenceBaseline(similarity="count").fit(basket_events, until_ts=20)
    # History [B, D]: C scores count(B, C) + count(D, C) = 1 + 1 = 2, A scores 2 (from B).
    # Tie broken by popularity: A (2 users) vs C (2 users) -> by id, A first.
    assert model.recommend(["x"], {"x": ["B", "D", "unknown-item"]}, k=2) == [["A", "C"]]


def test_cooccurrence_long_history(basket_events):
    # Enough candidates to take the dense scoring path. Jaccard: AB = 1, AC = BC = 1/3,
    # CD = 1 / (2 + 1 - 1) = 1/2. History {A, B, C, D} scores A = 1 + 1/3 (from B, C),
    # B = 4/3 (A and B tie; A wins by popularity order), C = 1/3 + 1/3 + 1/2, D = 1/2.
    model = CooccurrenceBaseline().fit(basket_events, until_ts=20)
    history = {"x": ["A", "B", "C", "D"]}
    assert model.recommend(["x"], history, k=5) == [["A", "B", "C", "D", "E"]]
    # Excluding A leaves only four items in the whole catalogue.
    assert model.recommend(["x"], history, k=5, exclude={"x": {"A"}}) == [["B", "C", "D", "E"]]


def test_cooccurrence_lift(basket_events):
    model = CooccurrenceBaseline(similarity="lift").fit(basket_events, until_ts=20)
    # lift(C, D) = 1 / (2 * 1) = 0.5 beats lift(C, A) = lift(C, B) = 1 / (2 * 2).
    assert model.recommend(["x"], {"x": ["C"]}, k=1) == [["D"]]


def test_cooccurrence_fallbacks_and_exclusion(basket_events):
    model = CooccurrenceBaseline().fit(basket_events, until_ts=20)
    popular = PopularityBaseline().fit(basket_events, until_ts=20).recommend(["x"], k=3)[0]
    # Empty history, unknown user and unknown items all fall back to popularity.
    recs = model.recommend(
        ["empty", "missing", "strange"], {"empty": [], "strange": ["zzz"]}, k=3
    )
    assert recs == [popular] * 3
    # Excluded items are skipped and the list is still filled up to k.
    recs = model.recommend(["x"], {"x": ["A"]}, k=3, exclude={"x": {"B"}})
    assert recs == [["C", "E", "A"]]
    # histories=None uses the histories seen in fit (u1 had A and B): A and B score
    # 1 from each other, C 1/3 + 1/3; exclude_history drops A and B.
    assert model.recommend(["u1"], None, k=3) == [["A", "B", "C"]]
    assert model.recommend(["u1"], None, k=2, exclude_history=True) == [["C", "E"]]


def test_cooccurrence_validation(basket_events):
    with pytest.raises(ValueError, match="similarity"):
        CooccurrenceBaseline(similarity="cosine")
    with pytest.raises(RuntimeError, match="fit"):
        CooccurrenceBaseline().recommend(["x"], {}, k=1)
    model = CooccurrenceBaseline().fit(basket_events)
    with pytest.raises(ValueError, match="string"):
        model.recommend(["x"], {"x": "A"}, k=1)


def test_cooccurrence_history_cap_keeps_recent_items():
    events = _events([(t, "u1", "click", item) for t, item in enumerate("ABC")])
    model = CooccurrenceBaseline(max_items_per_user=2).fit(events)
    assert model.histories_["u1"] == ["B", "C"]
    # A is still a known (popular) item, but its pairs were not counted.
    assert model.similar_items("A", 3) == []
    assert model.similar_items("B", 3) == ["C"]


def test_scored_list_metrics_by_hand():
    from tfrec.metrics.ranking import scored_list_metrics

    scores = np.array([[0.9, 0.5, 0.1, 0.0], [0.2, 0.8, 0.4, 0.3]])
    labels = np.array([[0.0, 1.0, 0.0, -1.0], [1.0, 0.0, 0.0, 0.0]])
    out = scored_list_metrics(scores, labels, ks=(2,))
    # List 1: positive ranked 2nd of 3 -> RR 1/2, NDCG@2 = 1/log2(3). List 2: 4th of 4 -> RR 1/4,
    # NDCG@2 = 0. Padding (-1) is ignored.
    assert out["mrr"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["ndcg@2"] == pytest.approx((1 / np.log2(3) + 0.0) / 2)
    # AUC: positives 0.5, 0.2 vs negatives 0.9 0.1 0.8 0.4 0.3: 0.5 beats three, 0.2 one.
    assert out["auc"] == pytest.approx(4 / 10)
    # GAUC per list: list 1 AUC 1/2 (3 examples), list 2 AUC 0 (4 examples).
    assert out["gauc"] == pytest.approx((0.5 * 3 + 0.0 * 4) / 7)
    with pytest.raises(ValueError, match="must be equal"):
        scored_list_metrics(scores, labels[:, :2])


def test_retrieve_with_scores_is_exact_sorted_and_skips_excluded():
    """Top-k by dot product over chunks of users: the brute-force order, excluded items
    never returned, ties to the lower catalog row, k capped at the catalog."""
    from tfrec.metrics.retrieval import retrieve_with_scores

    rng = np.random.default_rng(0)
    users, items = rng.standard_normal((37, 8)), rng.standard_normal((300, 8))
    items[3] *= 10
    items[7] = items[3]  # a tie at the top: item 3 must come first
    users[0] = items[3]
    ids = np.asarray([f"商品{i}" for i in range(300)], dtype=object)
    exclude = [set() for _ in range(37)]
    exclude[1] = {ids[int(np.argmax(items @ users[1]))], "not in the catalog"}
    got, scores = retrieve_with_scores(users, items, ids, 20, exclude, chunk=16)
    full = users @ items.T
    for u in range(37):
        allowed = [i for i in range(300) if ids[i] not in exclude[u]]
        want = sorted(allowed, key=lambda i: (-full[u, i], i))[:20]
        assert list(got[u]) == [ids[i] for i in want]
        np.testing.assert_allclose(scores[u], full[u, want], rtol=1e-6)
    assert list(got[0][:2]) == ["商品3", "商品7"]
    assert scores.dtype == np.float32 and got.shape == (37, 20)
    everything, _ = retrieve_with_scores(users[:2], items[:5], ids[:5], 10)
    assert everything.shape == (2, 5)
