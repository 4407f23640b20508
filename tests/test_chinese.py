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


# --------------------------------------------- a Chinese BERT from scratch, and catalog search

# A small search run (as in test_search), on the Chinese world's search log.
SEARCH_FIELDS = dict(epochs=1, negatives=64, candidates=20, ranker_epochs=3, query_length=8,
                     title_length=16, batch_size=32,
                     ranker_folds=0)  # tests/test_search.py covers the cross-fitting


@pytest.fixture(scope="module")
def zh_bert(zh_world_dir, tmp_path_factory):
    """(encoder, preprocessor) of a small BERT trained from scratch on the Chinese world's
    text through the CLI: `text build-vocab`, then `text pretrain --from-scratch`."""
    out = tmp_path_factory.mktemp("zh_bert")
    vocab = str(out / "vocab.txt")
    proc = _tfrec("text", "build-vocab", "--data-dir", zh_world_dir, "--out", vocab,
                  "--size", "3000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _tfrec("text", "pretrain", "--from-scratch", "--vocab", vocab, "--data-dir",
                  zh_world_dir, "--out", str(out / "bert"), "--epochs", "1",
                  "--steps-per-epoch", "30", "--seq-length", "32", "--log-dir",
                  str(out / "tensorboard_logs"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = re.search(r"validation mlm_loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups()
    assert float(after) < float(before)
    return str(out / "bert" / "encoder"), str(out / "bert" / "preprocessor")


def test_chinese_bert_vocabulary_spells_the_catalog(zh_bert, zh_world):
    import tensorflow as tf
    import tensorflow_hub as hub

    from tfrec.text.hub_export import read_export_info, vocab_path
    from tfrec.text.vocab import read_vocab

    vocab = read_vocab(vocab_path(zh_bert[1]))
    info = read_export_info(zh_bert[1], "bert_preprocessor")
    assert info["keep_accents"] and info["lower_case"]
    assert sum(bool(HAN.fullmatch(t)) for t in vocab) > 200  # Han characters are units
    titles = zh_world.catalog["title"].tolist()[:200]
    ids = hub.KerasLayer(zh_bert[1])(tf.constant(titles))["input_word_ids"].numpy()
    unk = vocab.index("[UNK]")
    assert (ids == unk).mean() < 0.001, "the catalog is spelled without [UNK]"
    first = [vocab[i] for i in ids[0] if i > 4]
    assert "".join(t.lstrip("#") for t in first) == titles[0].lower().replace(" ", "")


@pytest.fixture(scope="module")
def zh_search(zh_bert, tmp_path_factory):
    from tfrec.search.config import SearchConfig
    from tfrec.search.export import export_search
    from tfrec.search.train import train_search

    encoder, preprocessor = zh_bert
    cfg = SearchConfig(judgments="synthetic:tiny:zh", encoder=encoder,
                       preprocessor=preprocessor, **SEARCH_FIELDS)
    work = tmp_path_factory.mktemp("zh_search")
    run = train_search(cfg, str(work), log_dir=str(work / "logs"))
    base = str(work / "models")
    export_search(run.pipeline, base, num_results=10, card={"metrics": run.metrics})
    return run, os.path.join(base, "search")


def test_search_with_the_chinese_bert_beats_bm25(zh_search):
    run, _ = zh_search
    metrics = run.metrics
    assert HAN.search(run.data.catalog["title"].iloc[0])
    assert metrics["bm25"]["recall@100"] > 0.5  # BM25 reads the Chinese queries
    best = max(metrics[s]["ndcg@10"] for s in ("two_tower", "hybrid", "two_tower+ranker"))
    assert best > metrics["bm25"]["ndcg@10"], metrics
    assert metrics["two_tower"]["recall@100"] > metrics["bm25"]["recall@100"], metrics


def test_search_model_answers_chinese_and_model_number_queries_over_grpc(zh_search):
    run, path = zh_search
    catalog = run.data.catalog
    with_model = catalog[catalog["title"].str.contains(r" [A-Z]+-?\d+$")]
    assert len(with_model)
    for client in serve_models({"search": path}):
        assert client.wait_until_available("search", timeout=30) == 1
        # A title's Chinese words: the answers share its characters.
        title = catalog["title"].iloc[3]
        words = title.split()[1]
        rows = client.catalog_search(words)
        assert rows and all(set(words) & set(r["title"]) for r in rows[:3]), (words, rows)
        # Brand in Chinese + a Latin model number: the product with that number is found
        # (BM25 ranks it first for every such query; the one-epoch tiny ranker reorders).
        found = []
        for _, target in with_model.head(12).iterrows():
            brand, *_, model = target["title"].split()
            rows = client.catalog_search(f"{brand} {model.lower()}")
            ids = [r["product_id"] for r in rows]
            found.append(str(target["product_id"]) in ids)
            if found[-1]:
                hit = rows[ids.index(str(target["product_id"]))]
                assert hit["bm25_score"] == max(r["bm25_score"] for r in rows)
        assert np.mean(found) >= 0.6, found
