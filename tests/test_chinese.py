"""The Chinese synthetic world end to end: generate (CLI), BM25, train, evaluate, gRPC.

Every text path must keep Chinese characters: before the shared tokenizer, a Chinese
query was an all-zero text vector and BM25 matched nothing.
"""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import serve_models, small_run_config
from tfrec.data.lexicon_zh import HOMOPHONES_ZH
from tfrec.data.split import time_split
from tfrec.data.synthetic import World, WorldSpec, generate_world, get_spec
from tfrec.features.bm25 import BM25Scorer

HAN = re.compile(r"[\u4e00-\u9fff]")


def _tfrec(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tfrec.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def zh_world_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("zh_world"))
    proc = _tfrec("generate", "--world", "tiny", "--lang", "zh", "--seed", "7",
                  "--data-dir", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(tiny, zh, seed 7)" in proc.stdout
    return path


@pytest.fixture(scope="module")
def zh_world(zh_world_dir) -> World:
    return World.load(zh_world_dir)


@pytest.fixture(scope="module")
def zh_run(zh_world_dir, tmp_path_factory):
    """A small retrieval run on the Chinese world, exported as a SavedModel."""
    from tfrec.export.exporter import export_retrieval
    from tfrec.training.trainer import train_retrieval

    cfg = small_run_config(zh_world_dir, tmp_path_factory.mktemp("zh_work"), "zh")
    run = train_retrieval(cfg)
    catalog = World.load(zh_world_dir).catalog
    return export_retrieval(run.run_dir, catalog, cfg.export, model=run.model)


def test_chinese_world_keeps_the_english_structure(zh_world):
    english = generate_world(dataclasses.replace(get_spec("tiny")), seed=7)
    catalog, events = zh_world.catalog, zh_world.events
    assert zh_world.spec.lang == "zh"
    assert catalog["title"].map(lambda t: bool(HAN.search(t))).all()
    assert catalog["category"].map(lambda c: bool(HAN.search(c))).all()
    # Same leaves, brands tiers and prices: only the words differ.
    assert catalog["category"].nunique() == english.catalog["category"].nunique()
    np.testing.assert_allclose(catalog["price"], english.catalog["price"])
    queries = events.loc[events["query"] != "", "query"].drop_duplicates()
    assert queries.map(lambda q: bool(HAN.search(q))).mean() > 0.95
    # Mixed Chinese + Latin model numbers, and pinyin typos (a homophone in the query).
    assert queries.str.contains(r"[\u4e00-\u9fff]+ [a-z]+-?\d+$").any()
    typos = zh_world.ground_truth["query_texts"][zh_world.ground_truth["query_typo"]]
    assert len(typos) and all(any(c in HOMOPHONES_ZH.values() for c in q) for q in typos)
    with pytest.raises(ValueError, match="lang must be one of"):
        WorldSpec(lang="fr")


def test_bm25_matches_chinese_words_and_model_numbers(zh_world):
    catalog = zh_world.catalog
    bm25 = BM25Scorer().fit(catalog["item_id"], catalog["title"].tolist())
    titles = catalog["title"].to_numpy()
    for query in ("耳机", "无线耳机"):
        row = bm25.score([query])[0]
        # Titles holding the query's words (run together, no spaces) outrank the rest.
        holding = np.array([query in t for t in titles])
        assert holding.any() and row[holding].min() > row[~holding].max(), query
    # "<noun> <model number>" finds the item with that model first.
    with_model = catalog[catalog["title"].str.contains(r" [A-Z]+-?\d+$")].head(40)
    queries = [f"{t.split(' ')[1][-2:]} {t.rsplit(' ', 1)[1].lower()}" for t in with_model["title"]]
    top = np.argmax(bm25.score(queries), axis=1)
    hits = np.mean(catalog["item_id"].to_numpy()[top] == with_model["item_id"].to_numpy())
    assert hits >= 0.9, hits


def test_trained_model_beats_popularity_and_bm25_on_chinese(zh_run, zh_world_dir, tmp_path):
    proc = _tfrec("evaluate", "--saved-model", zh_run, "--data-dir", zh_world_dir,
                  "--workdir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = __import__("json").loads(proc.stdout)
    assert rows["two_tower"]["recall@100"] > rows["popularity"]["recall@100"]
    assert rows["search:bm25"]["recall@100"] > 0.5  # BM25 reads Chinese queries
    assert rows["search:two_tower"]["recall@100"] > rows["search:bm25"]["recall@100"]


def test_grpc_answers_chinese_queries(zh_run, zh_world):
    """Over gRPC, a Chinese query moves the engaged item up (it is not read as empty)."""
    events = zh_world.events
    split = time_split(events)
    test = events[(events["ts"] >= split.t_test) & (events["query"] != "")
                  & events["event_type"].isin(["click", "add_to_cart", "purchase"])]
    sessions = test.drop_duplicates("session_id").head(60)
    assert len(sessions) >= 20
    base = os.path.dirname(zh_run)
    for client in serve_models({"retrieval": base}):
        hits = {}
        for name, queries in (("query", sessions["query"]), ("empty", [""] * len(sessions))):
            out = client.predict("retrieval", {
                "user_id": sessions["user_id"].to_numpy(object),
                "history": np.full([len(sessions), 1], "", object),
                "query": np.asarray(list(queries), object),
                "device": np.full(len(sessions), "mobile", object),
                "hour": np.full(len(sessions), 12, np.int64),
                "k": np.full(len(sessions), 10, np.int32),
                "exclude_seen": np.zeros(len(sessions), bool)})
            ids = out["item_ids"].astype(str)
            hits[name] = np.mean([item in row for item, row in
                                  zip(sessions["item_id"], ids)])
        assert hits["query"] > hits["empty"] + 0.2, hits
