"""Loaders of user event logs and Home Depot judgments, and the BM25 search baseline."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from tfrec.data.homedepot import (graded_relevance, homedepot_path, load_homedepot,
                                  split_by_query)
from tfrec.data.loaders import load_event_log, parse_timestamps, resolve_data_dir
from tfrec.data.schema import EVENTS_SCHEMA, SchemaError
from tfrec.evaluation.baselines import BM25Baseline
from tfrec.features.bm25 import bm25_tokenize
from tfrec.metrics.ranking import evaluate_topk, ndcg_at_k

MAPPING = {"user": "uid", "item": "sku", "timestamp": "time", "type": "action"}
TYPES = {"view": "impression", "tap": "click", "buy": "purchase"}


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ generic event logs

def test_csv_with_mapping_defaults_and_event_types(tmp_path):
    path = write(tmp_path / "log.csv", "uid,sku,time,action\n"
                 "007,A1,1700000000,view\n007,A1,2023-11-14T22:13:25Z,tap\nu2,B2,1700000100,buy\n")
    events = load_event_log(path, MAPPING, TYPES)
    assert list(events.columns) == list(EVENTS_SCHEMA)
    assert events["user_id"].tolist() == ["007", "007", "u2"]  # leading zeros kept
    assert events["event_type"].tolist() == ["impression", "click", "purchase"]
    assert events["ts"].tolist() == [1700000000, 1700000005, 1700000100]
    # Optional columns absent from the file get their defaults.
    assert events["session_id"].tolist() == ["", "", ""]
    assert events["position"].tolist() == [-1, -1, -1]


def test_missing_type_column_uses_default_event_type(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,ts\nu1,i1,10\n")
    assert load_event_log(path)["event_type"].tolist() == ["click"]
    bought = load_event_log(path, default_event_type="purchase")
    assert bought["event_type"].tolist() == ["purchase"]


def test_jsonl_and_parquet(tmp_path):
    rows = [{"uid": "u1", "sku": "i1", "time": 5, "action": "tap", "position": 2},
            {"uid": "u2", "sku": "i2", "time": "1970-01-01T00:00:07+00:00", "action": "buy"}]
    path = write(tmp_path / "log.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    events = load_event_log(path, MAPPING, TYPES)
    assert events["ts"].tolist() == [5, 7]
    assert events["position"].tolist() == [2, -1]
    parquet = str(tmp_path / "log.parquet")
    frame = pd.DataFrame({"uid": ["u1"], "sku": ["i1"], "time": [9], "action": ["click"]})
    frame.to_parquet(parquet)
    assert load_event_log(parquet, MAPPING)["event_type"].tolist() == ["click"]


def test_timestamps_accept_seconds_and_iso():
    values = pd.Series(["0", "60.9", "1970-01-01T00:02:00Z", "1970-01-01 00:03:00"])
    assert parse_timestamps(values).tolist() == [0, 60, 120, 180]
    assert parse_timestamps(pd.Series(pd.to_datetime(["1970-01-02"]))).tolist() == [86400]


@pytest.mark.parametrize("content, message", [
    ("uid,sku,action\nu1,i1,tap\n", r"mapped column\(s\) missing: timestamp -> 'time'"),
    ("uid,sku,time,action\nu1,i1,yesterday,tap\n", r"row 0 has 'yesterday'.*ISO-8601"),
    ("uid,sku,time,action\nu1,i1,1700000000000,tap\n", "milliseconds"),
    ("uid,sku,time,action\nu1,i1,5,like\nu1,i2,6,share\n",
     r"unknown event type\(s\) \['like', 'share'\]"),
    ("uid,sku,time,action\n", "has no rows"),
    ("uid,sku,time,action\nu1,,5,tap\n", "item_id"),
])
def test_malformed_csv_is_rejected_with_a_clear_message(tmp_path, content, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(SchemaError, match=message):
        load_event_log(path, MAPPING, TYPES)


def test_empty_file_and_bad_json_line(tmp_path):
    with pytest.raises(SchemaError, match="is empty"):
        load_event_log(write(tmp_path / "empty.csv", ""), MAPPING)
    path = write(tmp_path / "bad.jsonl", '{"uid": "u1", "sku": "i1", "time": 1}\n{"uid": oops}\n')
    with pytest.raises(SchemaError, match="line 2 is not valid JSON"):
        load_event_log(path, MAPPING)
    path = write(tmp_path / "list.jsonl", '[1, 2]\n')
    with pytest.raises(SchemaError, match="line 1 must be a JSON object"):
        load_event_log(path, MAPPING)


def test_bad_arguments(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,ts\nu1,i1,10\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_event_log(path, {"usr": "x"})
    with pytest.raises(ValueError, match="not an event type"):
        load_event_log(path, event_types={"tap": "tapped"})
    with pytest.raises(FileNotFoundError):
        load_event_log(str(tmp_path / "nope.csv"))
    with pytest.raises(SchemaError, match="unsupported extension"):
        load_event_log(write(tmp_path / "log.txt", "x"))


def test_data_dir_resolution(monkeypatch):
    monkeypatch.delenv("TFREC_DATA_DIR", raising=False)
    assert resolve_data_dir() == os.path.join("..", "shared", "data")
    monkeypatch.setenv("TFREC_DATA_DIR", "/somewhere")
    assert resolve_data_dir() == "/somewhere"
    assert resolve_data_dir("/explicit") == "/explicit"


# ------------------------------------------------------------------ Home Depot

JUDGMENTS_CSV = ("id,product_uid,product_title,search_term,relevance\n"
                 "1,100,Angle Bracket,l bracket,2.5\n2,101,Deck Paint,deck over,3\n"
                 "3,102,Shower Head,rain shower head,1\n4,100,Angle Bracket,deck over,1.33\n")


def test_homedepot_from_small_file(tmp_path):
    path = write(tmp_path / "j.csv", JUDGMENTS_CSV)
    judgments = load_homedepot(path)
    assert list(judgments.columns) == ["query", "product_id", "title", "relevance"]
    assert len(judgments) == 4 and judgments["relevance"].max() == 3.0
    queries, relevant = graded_relevance(judgments)
    assert queries == ["deck over", "l bracket", "rain shower head"]
    assert relevant[0] == {"101": 2.0, "100": pytest.approx(0.33)}
    assert relevant[2] == {"102": 0.0}  # grade 1 = irrelevant


def test_homedepot_split_keeps_queries_whole(tmp_path):
    rows = [(q, f"p{q}{i}", "t", 2.0) for q in range(50) for i in range(3)]
    judgments = pd.DataFrame(rows, columns=["query", "product_id", "title", "relevance"])
    parts = split_by_query(judgments, (0.6, 0.2, 0.2), seed=1)
    sets = [set(parts[n]["query"]) for n in ("train", "val", "test")]
    assert [len(s) for s in sets] == [30, 10, 10]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(p) for p in parts.values()) == len(judgments)
    again = split_by_query(judgments, (0.6, 0.2, 0.2), seed=1)
    assert set(again["test"]["query"]) == sets[2]
    with pytest.raises(ValueError, match="sum"):
        split_by_query(judgments, (0.5, 0.2, 0.2))


@pytest.mark.parametrize("content, message", [
    ("id,product_uid,product_title,search_term\n1,100,T,q\n",
     r"missing column\(s\) \['relevance'\]"),
    ("id,product_uid,product_title,search_term,relevance\n1,100,T,q,4.5\n", r"row 1 has '4.5'"),
    ("id,product_uid,product_title,search_term,relevance\n", "no judgments"),
    ("", "empty"),
])
def test_homedepot_rejects_malformed_files(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        load_homedepot(write(tmp_path / "bad.csv", content))


@pytest.fixture(scope="module")
def real_homedepot():
    path = homedepot_path()
    if not os.path.isfile(path):
        pytest.skip(f"Home Depot judgments not found at {path!r} (set TFREC_DATA_DIR to the "
                    "folder holding homedepot/queries_dev.csv)")
    return load_homedepot(path)


def test_real_homedepot_file(real_homedepot):
    assert len(real_homedepot) == 51963
    assert real_homedepot["query"].nunique() == 8234
    assert real_homedepot["relevance"].between(1, 3).all()
    parts = split_by_query(real_homedepot)
    assert set(parts["train"]["query"]).isdisjoint(parts["test"]["query"])


def test_bm25_on_real_homedepot_queries(real_homedepot):
    products = real_homedepot.drop_duplicates("product_id")
    test = split_by_query(real_homedepot)["test"]
    queries, relevant = graded_relevance(test)
    queries, relevant = queries[:200], relevant[:200]
    bm25 = BM25Baseline().fit(products["product_id"], products["title"])
    metrics = evaluate_topk(bm25.search(queries, 10), relevant, ks=(10,))
    # Lexical matching finds judged products far above chance (random ~0.0003).
    assert metrics["ndcg@10"] > 0.2


# ------------------------------------------------------------------ BM25

def test_bm25_tokenizer():
    assert bm25_tokenize("Wood-Deck 2x4, 10 ft.") == ["wood", "deck", "2x4", "10", "ft"]
    with pytest.raises(ValueError):
        bm25_tokenize(None)


def test_bm25_scores_hand_computed():
    bm25 = BM25Baseline(k1=1.2, b=0.75).fit(["d1", "d2", "d3"],
                                            ["red wood deck", "red red paint", "blue paint can"])
    # N = 3, every document has 3 tokens (avgdl = 3, so the length norm is k1).
    idf_red = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # df(red) = 2
    idf_deck = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # df(deck) = 1
    scores = bm25.score(["red paint", "deck"])
    assert scores[0, 0] == pytest.approx(idf_red * 2.2 / 2.2)
    assert scores[0, 1] == pytest.approx(idf_red * 2 * 2.2 / 3.2 + idf_red * 2.2 / 2.2)
    assert scores[0, 2] == pytest.approx(idf_red * 2.2 / 2.2)  # idf(paint) == idf(red)
    assert scores[1].tolist() == pytest.approx([idf_deck, 0.0, 0.0])
    assert bm25.search(["red paint", "deck", "unknown words"], 2) == [["d2", "d1"], ["d1"], []]
    assert bm25.search(["red paint"], 3, exclude=[{"d2"}]) == [["d1", "d3"]]


def test_bm25_length_normalisation():
    # Same term frequency, longer document -> lower score when b > 0, equal when b = 0.
    docs = ["drill", "drill bit set with case and extra batteries"]
    assert np.diff(BM25Baseline(b=0.75).fit(["a", "b"], docs).score(["drill"])[0])[0] < 0
    assert np.diff(BM25Baseline(b=0.0).fit(["a", "b"], docs).score(["drill"])[0])[0] == 0


def test_bm25_through_the_shared_metrics():
    bm25 = BM25Baseline().fit(["p1", "p2", "p3"], ["cordless drill", "drill bits", "garden hose"])
    results = bm25.search(["cordless drill", "hose"], 3)
    relevant = [{"p1": 2.0, "p2": 1.0}, {"p3": 2.0}]
    assert ndcg_at_k(results, relevant, 3) == pytest.approx(1.0)


def test_bm25_rejects_bad_input():
    with pytest.raises(ValueError, match="k1"):
        BM25Baseline(k1=-1)
    with pytest.raises(ValueError, match="b must"):
        BM25Baseline(b=2)
    with pytest.raises(ValueError, match="unique"):
        BM25Baseline().fit(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="entries"):
        BM25Baseline().fit(["a"], ["x", "y"])
    with pytest.raises(RuntimeError, match="not fitted"):
        BM25Baseline().search(["x"], 1)
    with pytest.raises(ValueError, match="list of strings"):
        BM25Baseline().fit(["a"], ["x"]).score("x")
