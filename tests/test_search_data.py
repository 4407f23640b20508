"""Search judgments (product_catalog, judgments_from_events) and the catalog search metrics.

Metric expectations are computed by hand here (gain = grade - 1, discount 1/log2(rank+1)),
not with the code under test.
"""

import math

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

from tfrec.data.homedepot import JUDGMENT_COLUMNS
from tfrec.search.data import judgments_from_events, product_catalog
from tfrec.search.metrics import catalog_search_metrics, query_gains


# ------------------------------------------------------------------ product_catalog

def test_product_catalog_distinct_sorted_first_title():
    judgments = pd.DataFrame({
        "query": ["drill", "drill", "saw", "lamp", "saw"],
        "product_id": ["300", "1000", "300", "20", "1000"],
        "title": ["Drill A", "Saw B", "Drill A (dup)", "Lamp C", "Saw B2"],
        "relevance": [3.0, 1.0, 2.0, 2.5, 3.0],
    })
    catalog = product_catalog(judgments)
    assert list(catalog.columns) == ["product_id", "title"]
    # Sorted as strings: "1000" < "20" < "300".
    assert catalog["product_id"].tolist() == ["1000", "20", "300"]
    assert catalog["title"].tolist() == ["Saw B", "Lamp C", "Drill A"]
    assert catalog.index.tolist() == [0, 1, 2]


def test_product_catalog_errors():
    with pytest.raises(ValueError, match="title"):
        product_catalog(pd.DataFrame({"query": ["q"], "product_id": ["1"]}))
    with pytest.raises(ValueError, match="empty"):
        product_catalog(pd.DataFrame({"product_id": [], "title": []}))


# ------------------------------------------------------------ judgments_from_events

HAND_CATALOG = pd.DataFrame({"item_id": ["I1", "I2", "I3", "I4"],
                             "title": ["Drill one", "Drill two", "Lamp three", "Unused"],
                             "price": [1.0, 2.0, 3.0, 4.0]})


def _hand_events() -> pd.DataFrame:
    rows = [  # session, ts, event_type, item_id, query
        # s1: purchase (logged without the query) beats click beats impression.
        ("s1", 100, "search", "", " drill "),
        ("s1", 101, "impression", "I1", " drill "),
        ("s1", 101, "impression", "I2", " drill "),
        ("s1", 101, "impression", "I3", " drill "),
        ("s1", 105, "click", "I2", " drill "),
        ("s1", 106, "click", "I1", " drill "),
        ("s1", 120, "add_to_cart", "I1", ""),
        ("s1", 150, "purchase", "I1", ""),
        # s2: same query, weaker behaviour; grades average with s1.
        ("s2", 200, "search", "", "drill"),
        ("s2", 201, "impression", "I1", "drill"),
        ("s2", 201, "impression", "I2", "drill"),
        ("s2", 210, "click", "I1", "drill"),
        # s3: a browse click before any query is ignored; then two queries, and the
        # query-less cart / purchase go to the most recent one.
        ("s3", 290, "click", "I4", ""),
        ("s3", 300, "search", "", "lamp"),
        ("s3", 301, "impression", "I3", "lamp"),
        ("s3", 320, "add_to_cart", "I3", ""),
        ("s3", 400, "search", "", "drill"),
        ("s3", 401, "impression", "I2", "drill"),
        ("s3", 450, "purchase", "I2", None),
        # s4: a browse session, never graded.
        ("s4", 500, "impression", "I4", ""),
        ("s4", 501, "click", "I4", ""),
    ]
    events = pd.DataFrame(rows, columns=["session_id", "ts", "event_type", "item_id", "query"])
    events["user_id"] = "U1"
    # Log order must not matter: events are ordered by ts within each session.
    return events.sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_judgments_from_events_hand_log():
    out = judgments_from_events(_hand_events(), HAND_CATALOG)
    assert tuple(out.columns) == JUDGMENT_COLUMNS
    got = {(q, p): r for q, p, r in zip(out["query"], out["product_id"], out["relevance"])}
    assert got == pytest.approx({
        ("drill", "I1"): (3.0 + 2.0) / 2,        # purchase in s1, click in s2
        ("drill", "I2"): (2.0 + 1.0 + 3.0) / 3,  # click s1, impression s2, purchase s3
        ("drill", "I3"): 1.0,                    # impression only
        ("lamp", "I3"): 2.5,                     # add_to_cart carried to "lamp"
    })
    assert list(zip(out["query"], out["product_id"])) == sorted(got)  # sorted output
    assert dict(zip(out["product_id"], out["title"])) == {
        "I1": "Drill one", "I2": "Drill two", "I3": "Lamp three"}
    assert out["relevance"].dtype == np.float64


def test_judgments_from_events_errors():
    events = _hand_events()
    with pytest.raises(ValueError, match="session_id"):
        judgments_from_events(events.drop(columns=["session_id"]), HAND_CATALOG)
    with pytest.raises(ValueError, match="title"):
        judgments_from_events(events, HAND_CATALOG.drop(columns=["title"]))
    with pytest.raises(ValueError, match=r"not in the catalog.*I2"):
        judgments_from_events(events, HAND_CATALOG[HAND_CATALOG["item_id"] != "I2"])
    browse = events[events["session_id"] == "s4"]
    with pytest.raises(ValueError, match="no search events"):
        judgments_from_events(browse, HAND_CATALOG)


def test_judgments_from_events_tiny_world(tiny_world):
    out = judgments_from_events(tiny_world.events, tiny_world.catalog)
    assert tuple(out.columns) == JUDGMENT_COLUMNS
    assert len(out) > 0
    assert out["relevance"].between(1.0, 3.0).all()
    assert (out["relevance"] > 1.0).any()
    assert (out["relevance"] >= 2.5).any()
    catalog_titles = dict(zip(tiny_world.catalog["item_id"], tiny_world.catalog["title"]))
    assert set(out["product_id"]) <= set(catalog_titles)
    assert all(catalog_titles[p] == t for p, t in zip(out["product_id"], out["title"]))
    assert (out["query"] == out["query"].str.strip()).all() and (out["query"] != "").all()
    assert not out.duplicated(["query", "product_id"]).any()

    # End to end: ranking each query's judged products by grade is ideal.
    catalog = product_catalog(out)
    row_of = {p: i for i, p in enumerate(catalog["product_id"])}
    queries = sorted(out["query"].unique())
    gains = query_gains(out, row_of, queries)
    ranked = np.full((len(queries), 100), -1, dtype=np.int64)
    for i, gain in enumerate(gains):
        best = sorted(gain, key=lambda r: -gain[r])[:100]
        ranked[i, :len(best)] = best
    summary = catalog_search_metrics(ranked, gains).summary()
    assert summary["ndcg@10"] == pytest.approx(1.0)
    assert summary["mrr"] == pytest.approx(1.0)
    assert summary["queries"] > 0


# ------------------------------------------------------------------ search metrics

# Catalog rows 0..8 are products P0..P8.
METRIC_JUDGMENTS = pd.DataFrame([
    ("a", "P0", 3.0), ("a", "P1", 2.0), ("a", "P2", 1.0), ("a", "P3", 2.5),
    ("b", "P4", 1.0),                     # nothing relevant: NaN everywhere
    ("c", "P6", 2.0), ("c", "P7", 3.0),   # relevant products only below the top 10
    ("d", "P8", 2.0),                     # relevant for recall, nothing for MRR
], columns=["query", "product_id", "relevance"])
ROW_OF = {f"P{i}": i for i in range(9)}
DEPTH = 200


def _ranked() -> np.ndarray:
    ranked = np.full((4, DEPTH), -1, dtype=np.int64)  # -1 = padding, no result
    ranked[0, :4] = [2, 0, 5, 3]        # a: P1 never retrieved
    ranked[1, :2] = [4, 0]              # b
    ranked[2, 50] = 6                   # c: P6 at rank 51, inside Recall@100
    ranked[2, 120] = 7                  # c: P7 at rank 121, outside Recall@100, MRR counts it
    ranked[3, 0] = 8                    # d
    return ranked


def test_query_gains_by_hand():
    gains = query_gains(METRIC_JUDGMENTS, ROW_OF, ["d", "a", "b", "c"])
    assert gains == [{8: 1.0}, {0: 2.0, 1: 1.0, 2: 0.0, 3: 1.5}, {4: 0.0}, {6: 1.0, 7: 2.0}]


def test_catalog_search_metrics_by_hand():
    gains = query_gains(METRIC_JUDGMENTS, ROW_OF, ["a", "b", "c", "d"])
    metrics = catalog_search_metrics(_ranked(), gains, k=10, recall_k=100)

    # a: ranked gains 0 (P2), 2 (P0), 0 (unjudged P5), 1.5 (P3) at ranks 1..4;
    #    ideal gains 2, 1.5, 1, 0.
    dcg_a = 2.0 / math.log2(3) + 1.5 / math.log2(5)
    idcg_a = 2.0 / 1.0 + 1.5 / math.log2(3) + 1.0 / 2.0
    ndcg_a = dcg_a / idcg_a
    np.testing.assert_allclose(metrics.ndcg, [ndcg_a, np.nan, 0.0, 1.0])
    # Recall@100 of grade >= 2: a finds P0, P3 of {P0, P1, P3}; c finds P6 of {P6, P7}.
    np.testing.assert_allclose(metrics.recall, [2 / 3, np.nan, 1 / 2, 1.0])
    # MRR of grade >= 2.5: a's first is P0 at rank 2; c's only is P7 at rank 121.
    np.testing.assert_allclose(metrics.mrr, [1 / 2, np.nan, 1 / 121, np.nan])

    summary = metrics.summary()
    assert summary["ndcg@10"] == pytest.approx((ndcg_a + 0.0 + 1.0) / 3)
    assert summary["recall@100"] == pytest.approx((2 / 3 + 1 / 2 + 1.0) / 3)
    assert summary["mrr"] == pytest.approx((1 / 2 + 1 / 121) / 2)
    assert summary["queries"] == 3  # b has no positive gain


def test_mrr_zero_when_absent_and_averaged_grades():
    # Grade 2.5 from averaging still reaches the MRR threshold; absent -> 0, not NaN.
    judgments = pd.DataFrame([("q", "P0", 2.5), ("q", "P1", 2.0), ("r", "P2", 3.0)],
                             columns=["query", "product_id", "relevance"])
    gains = query_gains(judgments, ROW_OF, ["q", "r"])
    ranked = np.full((2, 100), -1)
    ranked[0, :3] = [1, 5, 0]
    ranked[1, :2] = [4, 5]              # r's relevant P2 never retrieved
    metrics = catalog_search_metrics(ranked, gains)
    np.testing.assert_allclose(metrics.mrr, [1 / 3, 0.0])
    np.testing.assert_allclose(metrics.recall, [1.0, 0.0])
    # q: gains 1.0 at rank 1, 1.5 at rank 3; ideal 1.5, 1.0.
    expected = (1.0 + 1.5 / 2.0) / (1.5 + 1.0 / math.log2(3))
    np.testing.assert_allclose(metrics.ndcg, [expected, 0.0])


def test_search_metric_errors():
    gains = query_gains(METRIC_JUDGMENTS, ROW_OF, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="need >= 100"):
        catalog_search_metrics(_ranked()[:, :99], gains)
    with pytest.raises(ValueError, match="one row per query"):
        catalog_search_metrics(_ranked()[:3], gains)
    with pytest.raises(ValueError, match="not in the catalog"):
        query_gains(METRIC_JUDGMENTS, {p: r for p, r in ROW_OF.items() if p != "P7"}, ["a"])
    with pytest.raises(ValueError, match="no judgments"):
        query_gains(METRIC_JUDGMENTS, ROW_OF, ["a", "zzz"])
