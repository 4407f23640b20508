"""Ranker and pipeline exports: fresh-process reload, gRPC round trips, business rules.

Both SavedModels are exported once from the session's trained retrieval run and ranker
(a catalog with some items out of stock), served by the embedded server on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.serving import format_results
from tests.helpers import assert_invalid_argument as _invalid, serve_models

MAX_PER_BRAND = 2
LONG_QUERY = "wireless headphones " * 5000  # 100 KB


def _out_of_stock(catalog) -> np.ndarray:
    return np.arange(len(catalog)) % 9 == 4


@pytest.fixture(scope="module")
def world(tiny_world):
    """Catalog with an in_stock column, and a real user with a history."""
    catalog = tiny_world.catalog.assign(in_stock=~_out_of_stock(tiny_world.catalog))
    events = tiny_world.events
    positives = events[events["event_type"].isin(["click", "purchase"])]
    user = positives["user_id"].value_counts().index[0]
    history = positives[positives["user_id"] == user].sort_values("ts")["item_id"].tolist()
    return {"catalog": catalog, "user": user, "history": list(dict.fromkeys(history))[-5:],
            "ids": catalog["item_id"].tolist()}


@pytest.fixture(scope="module")
def exported(trained_run, trained_ranker, world, tmp_path_factory):
    """Ranker and pipeline exports, plus the same modules in this process."""
    from tfrec.export.exporter import export_pipeline, export_ranker
    from tfrec.export.pipeline import PipelineModule
    from tfrec.export.ranking import RankerModule

    base = str(tmp_path_factory.mktemp("ranking_models"))
    export = ExportConfig(base_dir=base)
    models = {"retrieval": trained_run.model, "ranker": trained_ranker.model}
    ranker_dir = export_ranker(trained_run.run_dir, world["catalog"], export, **models)
    pipeline_dir = export_pipeline(trained_run.run_dir, world["catalog"], export,
                                   max_per_brand=MAX_PER_BRAND, **models)
    return {"base": base, "ranker_dir": ranker_dir, "pipeline_dir": pipeline_dir,
            "ranker": RankerModule(*models.values(), world["catalog"]),
            "pipeline": PipelineModule(*models.values(), world["catalog"],
                                       max_per_brand=MAX_PER_BRAND)}


@pytest.fixture(scope="module")
def served(exported):
    yield from serve_models({"ranker": os.path.join(exported["base"], "ranker"),
                             "pipeline": os.path.join(exported["base"], "pipeline")})


def test_ranker_and_pipeline_exports_warm_every_signature(exported, world):
    """The ranker refuses candidate ids outside its catalog, so warm-up samples carry a
    catalog item id: with a made-up id the heaviest model served its first request cold."""
    from tensorflow_serving.apis import prediction_log_pb2

    from tfrec.export.warmup import WARMUP_FILE

    def warmup(path: str) -> list:
        return [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request
                for r in tf.data.TFRecordDataset(
                    os.path.join(path, "assets.extra", WARMUP_FILE))]

    for key in ("ranker_dir", "pipeline_dir"):
        with open(os.path.join(exported[key], "assets.extra", "tfrec_model.json")) as f:
            signatures = json.load(f)["signatures"]
        names = sorted(r.model_spec.signature_name for r in warmup(exported[key]))
        assert names == signatures, key
    candidates = {c.decode() for r in warmup(exported["ranker_dir"])
                  for c in r.inputs["candidate_ids"].string_val}
    assert candidates and candidates <= set(world["ids"]), candidates


def _requests(world) -> list:
    """(model, signature, inputs as (values, dtype)) sent in and out of process."""
    ids, user, history = world["ids"], world["user"], world["history"]
    context = {"user_id": ([user, "never-seen-user"], "string"),
               "history": ([history, [""] * len(history)], "string"),
               "device": (["mobile", "desktop"], "string"), "hour": ([9, 23], "int64")}
    lists = {"k": ([10, 4], "int32"),
             "exclude_item_ids": ([[ids[0], ids[1]], ["", ""]], "string"),
             "purchased_item_ids": ([[ids[2]], [""]], "string")}
    return [
        ("ranker", "serving_default", {
            **context, "query": (["", LONG_QUERY], "string"),
            "candidate_ids": ([[ids[5], ids[6], "", ids[7]], [ids[8], "", "", ""]], "string")}),
        ("ranker", "explain", {
            **context, "query": (["", "red sneakers"], "string"),
            "candidate_ids": ([[ids[5], ids[6], "", ids[7]], [ids[8], "", "", ""]], "string")}),
        ("pipeline", "serving_default", {**context, **lists}),
        ("pipeline", "search", {**context, **lists,
                                "query": (["red sneakers", LONG_QUERY], "string")}),
    ]


def _tensors(inputs: dict) -> dict:
    return {name: tf.constant(values, dtype=dtype) for name, (values, dtype) in inputs.items()}


FRESH_PROCESS = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (what stock TF Serving links; bow needs none)

    paths, requests = json.load(open(sys.argv[1]))
    models = {name: tf.saved_model.load(path) for name, path in paths.items()}
    results = []
    for model, signature, inputs in requests:
        fn = models[model].signatures[signature]
        out = fn(**{n: tf.constant(v, dtype=d) for n, (v, d) in inputs.items()})
        results.append({k: (v.numpy().astype(str).tolist() if v.dtype == tf.string
                            else v.numpy().tolist()) for k, v in out.items()})
    signatures = {name: sorted(m.signatures) for name, m in models.items()}
    loaded = sorted(n for n in sys.modules
                    if n.split(".")[0] in ("tfrec", "tensorflow_recommenders", "tf_keras"))
    print("RESULT" + json.dumps({"results": results, "signatures": signatures,
                                 "modules": loaded}))
""")


def test_exports_reload_in_a_fresh_process_with_the_same_outputs(exported, world, tmp_path):
    for key, name in (("ranker_dir", "ranker"), ("pipeline_dir", "pipeline")):
        path = exported[key]
        assert os.path.basename(path) == "1" and os.path.basename(os.path.dirname(path)) == name
        with open(os.path.join(path, "assets.extra", "tfrec_model.json")) as f:
            card = json.load(f)
        assert card["model"] == name and card["text_mode"] == "bow"
    requests = _requests(world)
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps([{"ranker": exported["ranker_dir"],
                                 "pipeline": exported["pipeline_dir"]}, requests]))
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(spec)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert fresh["modules"] == [], "the fresh process must need TensorFlow (+ TF Text) only"
    assert fresh["signatures"] == {"ranker": ["explain", "serving_default"],
                                   "pipeline": ["recommend", "search", "serving_default"]}
    modules = {"ranker": exported["ranker"].rank, "pipeline": exported["pipeline"].recommend}
    for (model, signature, inputs), got in zip(requests, fresh["results"]):
        fn = {"search": exported["pipeline"].search,
              "explain": exported["ranker"].explain}.get(signature, modules[model])
        want = fn(**_tensors(inputs))
        assert sorted(got) == sorted(want), (model, signature)
        for name, tensor in want.items():
            if tensor.dtype == tf.string:
                assert got[name] == tensor.numpy().astype(str).tolist(), (model, name)
            else:
                np.testing.assert_allclose(np.array(got[name], float), tensor.numpy(),
                                           rtol=1e-4, atol=1e-5, err_msg=f"{model} {name}")

    ranked = exported["ranker"].rank(**_tensors(requests[0][2]))
    ids = ranked["item_ids"].numpy().astype(str)
    assert sorted(ids[0][:3]) == sorted(world["ids"][5:8]) and ids[0][3] == ""
    scores = ranked["scores"].numpy()
    assert np.all(np.diff(scores[0][:3]) <= 0) and scores[0][3] == -np.inf
    assert ranked["candidate_index"].numpy()[1].tolist() == [0, -1, -1, -1]
    assert {"click_scores", "purchase_scores", "retrieval_scores"} <= set(ranked)


def _check_rules(rows, k, world, blocked):
    catalog = world["catalog"].set_index("item_id")
    ids = [r["item_id"] for r in rows]
    assert len(ids) == k and len(set(ids)) == k
    assert not set(ids) & set(blocked), "history, excluded and purchased items are dropped"
    assert catalog.loc[ids, "in_stock"].all(), "out-of-stock items are dropped"
    assert max(Counter(r["brand"] for r in rows).values()) <= MAX_PER_BRAND
    assert [r["brand"] for r in rows] == catalog.loc[ids, "brand"].tolist()
    assert [r["title"] for r in rows] == catalog.loc[ids, "title"].tolist()
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert scores == [r["ranker_score"] for r in rows]
    assert all(np.isfinite(r["retrieval_score"]) for r in rows)


def test_pipeline_over_grpc_applies_the_business_rules(served, exported, world):
    client, user, history = served, world["user"], world["history"]
    assert client.wait_until_available("pipeline", timeout=30) == 1
    first = client.recommend_pipeline("pipeline", user, k=12, history=history, hour=9)
    _check_rules(first, 12, world, history)
    exclude, purchased = [first[0]["item_id"], first[1]["item_id"]], [first[2]["item_id"]]
    rows = client.recommend_pipeline("pipeline", user, k=12, history=history, hour=9,
                                     exclude=exclude, purchased=purchased)
    _check_rules(rows, 12, world, history + exclude + purchased)  # the top 3 are gone

    # Same answer as the module in this process.
    want = exported["pipeline"].recommend(**_tensors({
        "user_id": ([user], "string"), "history": ([history], "string"),
        "device": (["desktop"], "string"), "hour": ([9], "int64"), "k": ([12], "int32"),
        "exclude_item_ids": ([exclude], "string"), "purchased_item_ids": ([purchased], "string")}))
    assert [r["item_id"] for r in rows] == want["item_ids"].numpy()[0].astype(str).tolist()

    title_words = " ".join(world["catalog"]["title"].iloc[10].lower().split()[:2])
    found = client.search("pipeline", user, title_words, k=7, history=history,
                          exclude=exclude, purchased=purchased)
    # Search keeps the shopper's history (search_history: keep, as the ranker trained).
    _check_rules(found, 7, world, exclude + purchased)
    card = json.loads(open(os.path.join(exported["pipeline_dir"], "assets.extra",
                                        "tfrec_model.json")).read())
    assert card["search_history"] == "keep"
    cold = client.search("pipeline", "never-seen-user", title_words, k=3)
    assert len(cold) == 3
    table = format_results(found)
    assert "brand" in table and found[0]["item_id"] in table

    ranked = client.rank("ranker", user, [r["item_id"] for r in first[:5]][::-1],
                         history=history, query=title_words)
    assert sorted(r["item_id"] for r in ranked) == sorted(r["item_id"] for r in first[:5])
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert {"click_score", "purchase_score", "retrieval_score", "candidate_index"} <= set(
        ranked[0])


def test_bad_requests_are_invalid_argument_and_long_queries_answer(served, exported, world):
    client, user, ids = served, world["user"], world["ids"]
    _invalid(lambda: client.search("pipeline", user, "", k=5),
             "search needs a non-empty query; use recommend")
    _invalid(lambda: client.search("pipeline", user, "   ", k=5), "non-empty query")
    _invalid(lambda: client.rank("ranker", user, [ids[0], "NO-SUCH-ITEM"]),
             "unknown candidate item id", "NO-SUCH-ITEM")
    max_candidates = exported["ranker"].max_candidates
    _invalid(lambda: client.rank("ranker", user, (ids * 3)[:max_candidates + 1]),
             "too many candidates", str(max_candidates))
    _invalid(lambda: client.recommend_pipeline("pipeline", user, k=0), "k must be between 1")
    _invalid(lambda: client.recommend_pipeline("pipeline", user, k=10_000),
             "k must be between 1")
    # The in-graph batch check (stock TF Serving does not compare batch sizes for us).
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        exported["ranker"].rank(
            query=tf.constant(["", ""]), user_id=tf.constant(["u"]), history=tf.constant([[""]]),
            device=tf.constant([""]), hour=tf.constant([1], tf.int64),
            candidate_ids=tf.constant([[ids[0]]]))

    start = time.perf_counter()
    assert len(client.search("pipeline", user, LONG_QUERY, k=5)) == 5
    assert len(client.rank("ranker", user, ids[:20], query=LONG_QUERY)) == 20
    # Invalid UTF-8, and the 1024-byte cut falls inside a two-byte character.
    broken = b"\xff" + ("\u00e9" * 600).encode()
    assert len(client.search("pipeline", user, broken, k=5)) == 5
    assert time.perf_counter() - start < 30
    assert len(client.recommend_pipeline("pipeline", user, k=5)) == 5  # still healthy


def test_search_history_policy_keeps_or_excludes_the_history(trained_run, trained_ranker,
                                                             world):
    """With every item a candidate and no brand cap, `search` shows every eligible item:
    the in-stock history items under "keep", none of them under "exclude"."""
    from tfrec.export.pipeline import PipelineModule

    catalog, history = world["catalog"], world["history"]
    in_stock = set(catalog.loc[catalog["in_stock"], "item_id"])
    shown = {}
    for policy in ("keep", "exclude"):
        module = PipelineModule(trained_run.model, trained_ranker.model, catalog,
                                candidates=len(catalog), max_per_brand=None,
                                search_history=policy)
        out = module.search(**_tensors({
            "query": (["wireless headphones"], "string"), "user_id": ([world["user"]], "string"),
            "history": ([history], "string"), "device": (["app"], "string"),
            "hour": ([9], "int64"), "k": ([module.candidates], "int32"),
            "exclude_item_ids": ([[""]], "string"), "purchased_item_ids": ([[""]], "string")}))
        shown[policy] = set(out["item_ids"].numpy()[0].astype(str)) - {""}
    wanted = set(history) & in_stock
    assert wanted, "the test user needs an in-stock history item"
    assert wanted <= shown["keep"] and not wanted & shown["exclude"]
    assert shown["keep"] - shown["exclude"] == wanted
    with pytest.raises(ValueError, match="search_history must be one of"):
        PipelineModule(trained_run.model, trained_ranker.model, catalog, search_history="drop")


def test_brand_cap_keeps_the_first_items_of_each_brand():
    from tfrec.export.pipeline import brand_cap

    brands = tf.constant([["a", "b", "a", "a", "", "", "b", "a"]])
    valid = tf.constant([[True, True, False, True, True, True, True, True]])
    keep = brand_cap(brands, valid, 2).numpy()[0].tolist()
    # The invalid "a" does not count; "" has no cap.
    assert keep == [True, True, False, True, True, True, True, False]


def test_cli_query_searches_and_recommends_through_the_pipeline(served, world):
    """`tfrec query --model pipeline --query ...` is a search; without --query, recommend."""
    address = served.address
    base = [sys.executable, "-m", "tfrec.cli", "query", "--server", address, "--model",
            "pipeline", "--user", world["user"], "--history", ",".join(world["history"]),
            "--k", "4", "--json"]
    search = subprocess.run(base + ["--query", "running shoes"], capture_output=True,
                            text=True, timeout=120)
    assert search.returncode == 0, search.stderr[-2000:]
    rows = json.loads(search.stdout)
    assert len(rows) == 4 and all("ranker_score" in r and r["title"] for r in rows)
    recommend = subprocess.run(base + ["--exclude", rows[0]["item_id"]], capture_output=True,
                               text=True, timeout=120)
    assert recommend.returncode == 0, recommend.stderr[-2000:]
    assert rows[0]["item_id"] not in [r["item_id"] for r in json.loads(recommend.stdout)]
    empty = subprocess.run(base + ["--query", "   "], capture_output=True, text=True,
                           timeout=120)  # blank text is not a search: it recommends
    assert empty.returncode == 0, empty.stderr[-2000:]


def test_bert_fast_mode_ranker_trains_and_exports(trained_run, tiny_config, tiny_encoder,
                                                  world, tmp_path):
    """The ranker with BERT text (TF-Hub tiny encoder, fast mode) end to end, its top
    encoder layer fine-tuning at its own warm-up rate."""
    from copy import deepcopy

    from tfrec.export.exporter import export_pipeline
    from tfrec.training.ranking_trainer import train_ranker

    cfg = deepcopy(tiny_config)
    cfg.train.checkpoint_dir = str(tmp_path / "checkpoints")
    cfg.train.log_dir = str(tmp_path / "logs")
    shutil.copytree(trained_run.run_dir, os.path.join(cfg.train.checkpoint_dir, "tiny"))
    cfg.ranking.text_mode = "fast"
    cfg.ranking.text_encoder, cfg.ranking.text_preprocessor = tiny_encoder
    cfg.ranking.epochs = 1
    cfg.ranking.text_trainable, cfg.ranking.text_top_layers = True, 1
    cfg.ranking.encoder_learning_rate, cfg.ranking.encoder_schedule = 1e-4, "warmup_linear"
    result = train_ranker(cfg, run="tiny", retrieval=trained_run.model, max_users=60)
    model = result.model
    assert model.text_match is not None and result.history["loss"]
    encoder, heads = model.encoder_optimizer, model.optimizer
    assert model.encoder_variables and encoder is not None
    assert int(encoder.iterations) == int(heads.iterations) > 0
    assert encoder.get_config()["learning_rate"]["config"]["peak"] == 1e-4
    path = export_pipeline(os.path.join(cfg.train.checkpoint_dir, "tiny"), world["catalog"],
                           ExportConfig(base_dir=str(tmp_path / "models")),
                           retrieval=trained_run.model, ranker=result.model)
    import tensorflow_text  # noqa: F401  (the BERT preprocessor's ops)
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["search"](
        query=tf.constant(["mat"]), user_id=tf.constant([world["user"]]),
        history=tf.constant([world["history"]]), device=tf.constant(["mobile"]),
        hour=tf.constant([9], tf.int64), k=tf.constant([3], tf.int32),
        exclude_item_ids=tf.constant([[""]]), purchased_item_ids=tf.constant([[""]]))
    assert out["item_ids"].shape == (1, 3) and np.all(np.isfinite(out["scores"].numpy()))

    # A grown catalog: only the new titles are embedded, stored vectors are kept.
    catalog = world["catalog"]
    new = catalog.iloc[:2].assign(item_id=["NEU-a", "NEU-b"],
                                  title=["Tapis de yoga épais", "瑜伽垫 加厚"])
    grown = pd.concat([catalog, new], ignore_index=True)
    stored = model.text_match.item_embeddings.numpy()
    weights = len(model.text_match.weights)
    assert model.use_catalog(grown) == 2
    after = model.text_match.item_embeddings.numpy()
    assert after.shape == (len(grown), stored.shape[1])
    np.testing.assert_array_equal(after[:len(catalog)], stored)
    assert len(model.text_match.weights) == weights  # the old table is gone, not kept
    scores = model({"user_id": tf.constant([world["user"]]), "query": tf.constant(["yoga"]),
                    "history": tf.constant([world["history"]]), "device": tf.constant(["app"]),
                    "hour": tf.constant([9], tf.int64),
                    "item_id": tf.constant([["NEU-a", "NEU-b", catalog["item_id"].iloc[0]]])})
    assert np.all(np.isfinite(scores["click"].numpy()))


def _check_reasons(rows, history, search_words=None):
    kinds = {"history", "category", "brand", "price", "popularity", "query", "profile"}
    for r in rows:
        assert r["reason_kind"] in kinds and r["reason"], r
        assert (r["reason_item"] != "") == (r["reason_kind"] == "history"), r
        if r["reason_kind"] == "history":
            assert r["reason_item"] in history and r["reason"].startswith("because you viewed")
        if r["reason_kind"] == "query":
            assert set(r["reason_word"].split()) <= set(search_words), r
            assert r["reason"] == f"matches your search: {r['reason_word']}"


def test_every_item_served_over_grpc_carries_a_reason(served, world):
    client, user, history = served, world["user"], world["history"]
    rows = client.recommend_pipeline("pipeline", user, k=12, history=history)
    assert len(rows) == 12
    _check_reasons(rows, history)
    words = world["catalog"]["title"].iloc[3].lower().split()[:2]
    found = client.search("pipeline", user, " ".join(words), k=8, history=history)
    _check_reasons(found, history, words)
    assert any(r["reason_kind"] == "query" for r in found)
    cold = client.recommend_pipeline("pipeline", "never-seen-user", k=5)
    _check_reasons(cold, [])
    assert all(r["reason_kind"] != "history" for r in cold)


def test_cli_explains_recommendations_and_ranker_scores(served, world):
    address, user, history = served.address, world["user"], ",".join(world["history"])
    query = subprocess.run(
        [sys.executable, "-m", "tfrec.cli", "query", "--server", address, "--model",
         "pipeline", "--user", user, "--history", history, "--k", "3", "--explain"],
        capture_output=True, text=True, timeout=120)
    assert query.returncode == 0, query.stderr[-2000:]
    assert query.stdout.count("why: ") == 3, query.stdout
    items = world["ids"][20:23]
    base = [sys.executable, "-m", "tfrec.cli", "explain", "--server", address, "--user", user,
            "--history", history, "--query", "wireless"]
    explained = subprocess.run(base + [a for i in items for a in ("--item", i)] + ["--json"],
                               capture_output=True, text=True, timeout=120)
    assert explained.returncode == 0, explained.stderr[-2000:]
    rows = json.loads(explained.stdout)
    assert [r["item_id"] for r in rows] == items
    for r in rows:
        assert set(r["attributions"]) == {"user", "history", "item", "context", "text",
                                          "retrieval"}
        change = r["score"] - r["baseline_score"]
        assert abs(sum(r["attributions"].values()) - change) <= 0.05 * abs(change) + 0.05
    table = subprocess.run(base + ["--item", items[0]], capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0 and "history" in table.stdout and items[0] in table.stdout
    wrong = subprocess.run(base + ["--item", items[0], "--model", "pipeline"],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.startswith("tfrec: error:"), wrong.stderr
    unknown = subprocess.run(base + ["--item", "no-such-item"], capture_output=True,
                             text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown candidate" in unknown.stderr, unknown.stderr
