"""Quantized tables: int8 / bfloat16 storage in the retrieval SavedModel, answers close
to float32, smaller on disk, loaded in a fresh TensorFlow-only process."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from tfrec.features.quantize import MIN_ROWS, QuantizedTable

FRESH = textwrap.dedent(r"""
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    request = json.loads(sys.argv[2])
    fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    n = len(request["user_id"])
    out = fn(user_id=tf.constant(request["user_id"]), history=tf.constant(request["history"]),
             query=tf.constant(request["query"]), device=tf.constant(request["device"]),
             hour=tf.constant(request["hour"], tf.int64), k=tf.constant([10] * n),
             exclude_seen=tf.constant([True] * n))
    print("RESULT" + json.dumps({"item_ids": out["item_ids"].numpy().astype(str).tolist(),
                                 "scores": out["scores"].numpy().tolist()}))
""")


def test_int8_rows_are_within_half_a_step():
    rng = np.random.RandomState(0)
    table = rng.randn(50, 8).astype(np.float32) * rng.uniform(0.01, 10, size=(50, 1))
    table[3] = 0.0  # an all-zero row keeps a usable scale
    q = QuantizedTable(table, "int8")
    rows = q.gather(tf.constant([[0, 3], [49, 7]])).numpy()
    assert rows.shape == (2, 2, 8) and q.values.dtype == tf.int8
    step = np.abs(table).max(axis=1) / 127
    for got, idx in zip(rows.reshape(-1, 8), [0, 3, 49, 7]):
        assert np.all(np.abs(got - table[idx]) <= step[idx] / 2 + 1e-6)
    queries = rng.randn(4, 8).astype(np.float32)
    dequantized = q.gather(tf.range(50)).numpy()
    np.testing.assert_allclose(q.scores(queries).numpy(), queries @ dequantized.T, rtol=1e-4,
                               atol=1e-4)
    assert q.nbytes() == 50 * 8 + 50 * 4


def test_bfloat16_and_bad_precisions():
    table = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    q = QuantizedTable(table, "bfloat16")
    np.testing.assert_allclose(q.gather(tf.range(8)).numpy(), table, atol=1e-2)
    # Scored in bfloat16: within its rounding of the queries and rows (8 bits).
    queries = np.linspace(-2, 2, 24, dtype=np.float32).reshape(3, 8)
    scores = q.scores(queries)
    assert scores.dtype == tf.float32
    np.testing.assert_allclose(scores.numpy(), queries @ table.T, atol=0.03)
    with pytest.raises(ValueError, match="'int8' or 'bfloat16'"):
        QuantizedTable(table, "int4")
    with pytest.raises(ValueError, match=r"\[rows, dim\]"):
        QuantizedTable(table.ravel(), "int8")


@pytest.fixture(scope="module")
def quantized_exports(trained_run, tiny_world, tmp_path_factory):
    from tfrec.config import ExportConfig
    from tfrec.export.exporter import export_retrieval

    base = tmp_path_factory.mktemp("quantized")
    return {p: export_retrieval(trained_run.run_dir, tiny_world.catalog,
                                ExportConfig(base_dir=str(base), model_name=p, precision=p),
                                model=trained_run.model)
            for p in ("float32", "bfloat16", "int8")}


def variables_bytes(path: str) -> int:
    folder = os.path.join(path, "variables")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def answer(path: str, request: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH, path, json.dumps(request)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_quantized_exports_are_smaller_and_answer_alike(quantized_exports, tiny_world,
                                                        trained_run):
    tables = sum(int(np.prod(v.shape)) * 4 for v in trained_run.model.variables
                 if len(v.shape) == 2 and v.shape[0] >= MIN_ROWS)
    float32 = variables_bytes(quantized_exports["float32"])
    # The large tables (and the catalog embeddings) shrink 4x / 2x; the rest is kept.
    assert variables_bytes(quantized_exports["int8"]) <= float32 - 0.7 * tables
    assert variables_bytes(quantized_exports["bfloat16"]) <= float32 - 0.45 * tables
    for p in ("bfloat16", "int8"):
        with open(os.path.join(quantized_exports[p], "assets.extra", "tfrec_model.json")) as f:
            assert json.load(f)["precision"] == p
    users = list(tiny_world.events["user_id"].drop_duplicates().iloc[:12])
    items = list(tiny_world.catalog["item_id"])
    request = {"user_id": users, "history": [[items[i], items[i + 20]] for i in range(12)],
               "query": ["", "无线耳机", "café crème", "Größe"] * 3,
               "device": ["mobile"] * 12, "hour": list(range(12))}
    want = answer(quantized_exports["float32"], request)
    for p in ("bfloat16", "int8"):
        got = answer(quantized_exports[p], request)
        np.testing.assert_allclose(got["scores"], want["scores"], atol=0.02)
        overlap = np.mean([len(set(a) & set(b)) / 10
                           for a, b in zip(got["item_ids"], want["item_ids"])])
        assert overlap >= 0.9, (p, overlap)


def test_unknown_precision_is_refused(trained_run, tiny_world):
    from tfrec.config import ExportConfig
    from tfrec.export.retrieval import RetrievalModule

    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        RetrievalModule(trained_run.model, tiny_world.catalog,
                        ExportConfig(index="exact", precision="int4"))


def test_catalog_rows_keep_whole_reads_of_a_catalog_table_free_of_copies():
    """A gather on a variable puts it in copy-on-read mode for good: every whole read
    (the exact top-k matmul) then copies the table. `catalog_rows` gathers from a whole
    read instead, and `dense_reads` ends the mode after sparse writes."""
    from tfrec.features.quantize import catalog_rows, dense_reads

    rows, dim = 60_000, 256  # 61 MB: a copy costs more than the matmul
    values = np.random.default_rng(0).normal(size=[rows, dim]).astype(np.float32)
    query = tf.constant(values[:1])

    fresh = tf.Variable(values)
    gathered = tf.Variable(values)
    tf.gather(gathered, [1, 2])  # ResourceGather: copy-on-read from here on
    ours = tf.Variable(values)
    tf.function(lambda: catalog_rows(ours, [1, 2]))()
    filled = tf.Variable(tf.zeros([rows, dim]))
    filled.scatter_update(tf.IndexedSlices(tf.constant(values), tf.range(rows)))
    dense_reads(filled)
    tables = {"fresh": fresh, "gathered": gathered, "ours": ours, "filled": filled}
    tops = {name: tf.function(lambda q, t=t: tf.math.top_k(tf.matmul(q, t, transpose_b=True),
                                                           10))
            for name, t in tables.items()}
    fastest = {name: float("inf") for name in tables}
    for _ in range(60):  # interleaved rounds: load from elsewhere falls on every table
        for name, top in tops.items():
            start = time.perf_counter()
            top(query).values.numpy()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    # Quiet machine: gathered ~10x fresh, ours and filled ~1x; under CI load the copy's
    # share shrinks (gathered 1.9x fresh seen), so compare with the copying table.
    assert fastest["ours"] < 0.75 * fastest["gathered"], fastest
    assert fastest["filled"] < 0.75 * fastest["gathered"], fastest
    # And by construction: the gather reads the variable whole, never ResourceGather.
    graph = tf.function(lambda: catalog_rows(ours, [1, 2])).get_concrete_function().graph
    ops = {op.type for op in graph.get_operations()}
    assert "ReadVariableOp" in ops and "ResourceGather" not in ops, ops
    np.testing.assert_array_equal(catalog_rows(ours, [3]).numpy(), values[3:4])


FRESH_PIPELINE = textwrap.dedent(r"""
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    request = json.loads(sys.argv[3])
    n = len(request["user_id"])
    empty = tf.constant([[""]] * n)
    out = tf.saved_model.load(sys.argv[1]).signatures["recommend"](
        user_id=tf.constant(request["user_id"]), history=tf.constant(request["history"]),
        device=tf.constant(request["device"]), hour=tf.constant(request["hour"], tf.int64),
        k=tf.constant([10] * n), exclude_item_ids=empty, purchased_item_ids=empty)
    # The ranker export's `rank` (serving_default) over fixed candidate lists.
    ranked = tf.saved_model.load(sys.argv[2]).signatures["serving_default"](
        query=tf.constant([""] * n), user_id=tf.constant(request["user_id"]),
        history=tf.constant(request["history"]), device=tf.constant(request["device"]),
        hour=tf.constant(request["hour"], tf.int64),
        candidate_ids=tf.constant(request["candidates"]))
    print("RESULT" + json.dumps({"item_ids": out["item_ids"].numpy().astype(str).tolist(),
                                 "scores": out["ranker_scores"].numpy().tolist(),
                                 "ranked_ids": ranked["item_ids"].numpy().astype(str).tolist(),
                                 "ranked_scores": ranked["scores"].numpy().tolist()}))
""")


@pytest.fixture(scope="module")
def quantized_pipelines(trained_run, trained_ranker, tiny_world, tmp_path_factory):
    from tfrec.config import ExportConfig
    from tfrec.export.exporter import export_pipeline, export_ranker

    base = tmp_path_factory.mktemp("quantized_pipeline")
    models = {"retrieval": trained_run.model, "ranker": trained_ranker.model}
    return {p: (export_pipeline(trained_run.run_dir, tiny_world.catalog,
                                ExportConfig(base_dir=str(base), precision=p),
                                model_name=f"pipeline_{p}", **models),
                export_ranker(trained_run.run_dir, tiny_world.catalog,
                              ExportConfig(base_dir=str(base), precision=p),
                              model_name=f"ranker_{p}", **models))
            for p in ("float32", "int8")}


def test_quantized_pipeline_is_smaller_and_answers_alike(quantized_pipelines, trained_run,
                                                         trained_ranker, tiny_world):
    """export.precision covers the ranker and the pipeline (one `RankingCore`): the query
    tower's and the ranker's large tables and the catalog embeddings are stored in int8,
    and a fresh process gets (nearly) the float32 answers from both exports."""
    from tfrec.features.quantize import table_key

    variables = {table_key(v): v for m in (trained_run.model.query_tower, trained_ranker.model)
                 for v in m.variables}
    tables = sum(int(np.prod(v.shape)) * 4 for v in variables.values()
                 if len(v.shape) == 2 and v.shape[0] >= MIN_ROWS)
    assert tables > 0
    (float32, ranker32), (int8, ranker8) = (quantized_pipelines[p] for p in ("float32", "int8"))
    assert variables_bytes(int8) <= variables_bytes(float32) - 0.7 * tables
    for path in (int8, ranker8):
        with open(os.path.join(path, "assets.extra", "tfrec_model.json")) as f:
            assert json.load(f)["precision"] == "int8"
    users = list(tiny_world.events["user_id"].drop_duplicates().iloc[:12])
    items = list(tiny_world.catalog["item_id"])
    request = {"user_id": users, "history": [[items[i], items[i + 20]] for i in range(12)],
               "device": ["mobile"] * 12, "hour": list(range(12)),
               "candidates": [items[i:i + 20] for i in range(12)]}
    proc = [subprocess.run([sys.executable, "-c", FRESH_PIPELINE, path, ranker,
                            json.dumps(request)], capture_output=True, text=True, timeout=240)
            for path, ranker in ((float32, ranker32), (int8, ranker8))]
    for p in proc:
        assert p.returncode == 0, p.stderr[-3000:]
    want, got = (json.loads([x for x in p.stdout.splitlines()
                             if x.startswith("RESULT")][-1][len("RESULT"):]) for p in proc)
    overlap = np.mean([len(set(a) & set(b)) / 10
                       for a, b in zip(got["item_ids"], want["item_ids"])])
    assert overlap >= 0.9, overlap
    # The ranker's score of each item both return: per-row int8 rounding moves it by
    # ~0.1-1% of the score range here.
    pairs = [(dict(zip(a, s)), dict(zip(b, t))) for a, s, b, t in zip(
        got["item_ids"], got["scores"], want["item_ids"], want["scores"])]
    diff = max(abs(g[i] - w[i]) for g, w in pairs for i in w if i and i in g)
    scale = max(abs(x) for _, w in pairs for i, x in w.items() if i)
    assert diff <= 0.02 * scale, (diff, scale)
    # The ranker export scores the same 20 candidates per shopper: every candidate comes
    # back, scored within the same bound, and the top 5 mostly agree.
    ranked = [(dict(zip(a, s)), dict(zip(b, t))) for a, s, b, t in zip(
        got["ranked_ids"], got["ranked_scores"], want["ranked_ids"], want["ranked_scores"])]
    for (g, w), candidates in zip(ranked, request["candidates"]):
        assert set(g) == set(w) == set(candidates)
    diff = max(abs(g[i] - w[i]) for g, w in ranked for i in w)
    scale = max(abs(x) for _, w in ranked for x in w.values())
    assert 0 < diff <= 0.02 * scale, (diff, scale)
    top5 = np.mean([len(set(a[:5]) & set(b[:5])) / 5
                    for a, b in zip(got["ranked_ids"], want["ranked_ids"])])
    assert top5 >= 0.8, top5
