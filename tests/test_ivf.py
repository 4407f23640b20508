"""IVF top-k: the index itself, the export's choice of index, and an exported IVF model
loaded in a fresh process that imports nothing but TensorFlow."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.models.catalog_index import (CatalogIndex, IndexChoice, TuningQueries, choose_index,
                                        exact_top_k)
from tfrec.models.ivf import IvfIndex, build_ivf, default_nlist, train_centroids


def _clustered(n=3000, d=16, topics=40, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(topics, d)
    x = centers[rng.randint(0, topics, n)] + 0.4 * rng.randn(n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _queries(x, n=50, seed=1):
    rng = np.random.RandomState(seed)
    q = x[rng.randint(0, len(x), n)] + 0.2 * rng.randn(n, x.shape[1]).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


def test_plan_covers_the_catalog_once_and_is_seeded():
    x = _clustered()
    plan = build_ivf(x, nlist=32, seed=3)
    assert sorted(plan.order.tolist()) == list(range(len(x)))
    assert plan.offsets[0] == 0 and plan.offsets[-1] == len(x) and plan.sizes.min() >= 0
    again = build_ivf(x, nlist=32, seed=3)
    np.testing.assert_array_equal(plan.order, again.order)
    np.testing.assert_allclose(plan.centroids, again.centroids)
    assert default_nlist(1_000_000) == 4000 and default_nlist(1) == 1
    with pytest.raises(ValueError, match="nlist must be between 1 and the number"):
        train_centroids(x[:10], nlist=11)
    with pytest.raises(ValueError, match="nprobe must be between 1 and nlist"):
        IvfIndex(plan, nprobe=33)


def test_kmeans_in_chunks_gives_the_centroids_of_one_pass():
    """Assigning the sample chunk by chunk bounds memory and changes no centroid."""
    x = _clustered()
    whole = train_centroids(x, nlist=32, seed=5, chunk=len(x))
    np.testing.assert_allclose(train_centroids(x, nlist=32, seed=5, chunk=97), whole,
                               atol=1e-6)
    # A reference Lloyd iteration in numpy: sample rows, then nearest-centroid means.
    rng = np.random.RandomState(5)
    take = 32 * 64  # sample_per_list's default
    sample = x[np.sort(rng.choice(len(x), take, replace=False))]
    centroids = sample[rng.choice(take, 32, replace=False)]
    for _ in range(10):
        lists = np.argmax(sample @ centroids.T, axis=1)
        for c in range(32):
            if np.any(lists == c):
                mean = sample[lists == c].sum(axis=0)
                centroids[c] = mean / np.linalg.norm(mean)
    np.testing.assert_allclose(whole, centroids, atol=1e-4)


def test_all_lists_probed_is_exact_and_recall_grows_with_nprobe():
    x = _clustered()
    plan = build_ivf(x, nlist=32, seed=0)
    table = tf.constant(x[plan.order])
    q = _queries(x)
    truth = exact_top_k(q, x[plan.order], 20)
    index = IvfIndex(plan, nprobe=4)
    recalls = []
    for nprobe in (1, 4, 32):
        values, rows = index.search(tf.constant(q), table, 20, tf.fill([len(q)], nprobe))
        recalls.append(_recall(rows.numpy(), truth))
    assert recalls[0] <= recalls[1] <= recalls[2] == 1.0, recalls
    assert recalls[0] < 1.0  # probing one list of 32 does miss neighbours
    # Scores are the exact inner products of the rows returned.
    np.testing.assert_allclose(values.numpy(), np.einsum("qd,qkd->qk", q, x[plan.order][
        rows.numpy()]), rtol=1e-5, atol=1e-6)
    # Per-row nprobe in one batch: row 0 probes one list, row 1 all of them.
    _, mixed = index.search(tf.constant(q[:2]), table, 20, tf.constant([1, 32]))
    np.testing.assert_array_equal(mixed.numpy()[1], truth[1])


def test_short_lists_pad_with_minus_one():
    x = _clustered(n=200)
    plan = build_ivf(x, nlist=20, seed=0)
    index = IvfIndex(plan, nprobe=1)
    values, rows = index.search(tf.constant(x[:3]), tf.constant(x[plan.order]), 150)
    rows, values = rows.numpy(), values.numpy()
    for r, v in zip(rows, values):
        found = r >= 0
        assert found.sum() < 150 and np.all(np.isneginf(v[~found]))
        assert np.all(found[:found.sum()])  # results first, padding last


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_catalog_index_never_returns_blocked_or_ineligible_rows(kind):
    x = _clustered(n=2000)
    cfg = ExportConfig(index=kind, nlist=16, nprobe=16)
    choice = choose_index(x, TuningQueries(_queries(x)), cfg)
    assert (choice.plan is None) == (kind == "exact")
    ordered = x[choice.plan.order] if choice.plan is not None else x
    index = CatalogIndex(ordered, choice)
    q = tf.constant(_queries(x, n=4))
    _, best = index.top_k(q, 10)
    blocked = tf.constant(np.concatenate([best.numpy()[:, :5], -np.ones([4, 2], np.int64)], 1))
    eligible = np.ones(len(x), bool)
    eligible[best.numpy()[:, 5]] = False
    values, rows = index.top_k(q, 10, blocked=blocked, eligible=tf.constant(eligible))
    rows = rows.numpy()
    for r, b in zip(rows, blocked.numpy()):
        assert not set(r) & set(b[b >= 0])
        assert eligible[r].all()
    # With every list probed, IVF answers what exact search answers.
    exact = CatalogIndex(ordered, IndexChoice(plan=None))
    _, expected = exact.top_k(q, 10, blocked=blocked, eligible=tf.constant(eligible))
    np.testing.assert_array_equal(rows, expected.numpy())


def test_choose_index_tunes_nprobe_on_queries_and_falls_back_to_exact():
    x = _clustered(n=4000)
    q = TuningQueries(_queries(x, n=100))
    auto = choose_index(x, q, ExportConfig(index="auto", index_min_items=5000))
    assert auto.plan is None and auto.card == {"index": "exact"}
    choice = choose_index(x, q, ExportConfig(index="ivf", nlist=64, index_target_recall=0.9))
    card = choice.card
    assert card["index"] == "ivf" and card["nlist"] == 64 and card["nprobe"] == choice.nprobe
    ladder = {int(p): r for p, r in card["recall_by_nprobe"].items()}
    # The smallest ladder step reaching the target; every smaller one fell short.
    assert ladder[choice.nprobe] >= 0.9
    assert all(r < 0.9 for p, r in ladder.items() if p < choice.nprobe)
    assert card["recall_vs_exact"]["queries"] == 100
    assert card["recall_vs_exact"]["source"] == "validation users"
    assert card["list_sizes"]["max"] >= card["list_sizes"]["mean"] >= card["list_sizes"]["min"]
    small = choose_index(x[:100], q, ExportConfig(index="ivf", nlist=64))
    assert small.plan is None and "exact top-k" in small.card["note"]
    for bad, message in [(dict(index="annoy"), "export.index must be one of"),
                         (dict(index="ivf", nlist=16, nprobe=17), "nprobe .17. must be <= nlist"),
                         (dict(nprobe=-1), "export.nprobe must be >= 0"),
                         (dict(index_target_recall=1.5), "index_target_recall must be in")]:
        with pytest.raises(ValueError, match=message):
            choose_index(x, q, replace(ExportConfig(), **bad))


def test_recall_below_the_floor_is_warned_and_carded(caplog):
    x = _clustered(n=4000)
    with caplog.at_level("WARNING"):
        choice = choose_index(x, None, ExportConfig(index="ivf", nlist=64, nprobe=1,
                                                     index_recall_floor=0.99))
    assert choice.card["below_floor"] and "below the floor" in caplog.text
    assert choice.card["recall_vs_exact"]["source"].startswith("catalog items")


@pytest.fixture(scope="module")
def ivf_exports(trained_run, tiny_config, tiny_world, tmp_path_factory):
    """The shared run exported twice over the same catalog: exact and IVF (16 lists)."""
    from tfrec.export.exporter import export_retrieval

    base = str(tmp_path_factory.mktemp("ivf_models"))
    out = {}
    for kind in ("exact", "ivf"):
        cfg = replace(tiny_config.export, base_dir=base, model_name=kind, index=kind, nlist=16)
        out[kind] = export_retrieval(trained_run.run_dir, tiny_world.catalog, cfg,
                                     model=trained_run.model)
    return out


def _assert_same_up_to_ties(ids, scores, want_ids, want_scores):
    """The same ranked lists, except that items with equal scores may come in any order
    (exact search and IVF gather rows in different orders, so top_k breaks ties apart)."""
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    for row, row_scores, want in zip(ids, want_scores, want_ids):
        start = 0
        while start < len(row):
            end = start + 1
            while end < len(row) and np.isclose(row_scores[end], row_scores[start],
                                                rtol=1e-5, atol=1e-6):
                end += 1
            if end < len(row):  # a tie cut by the list's end may hold other items
                assert set(row[start:end]) == set(want[start:end]), (start, row, want)
            start = end


def test_ivf_export_runs_on_core_tensorflow_and_matches_exact_at_full_probe(
        ivf_exports, tiny_world):
    card = json.load(open(os.path.join(ivf_exports["ivf"], "assets.extra",
                                       "tfrec_model.json")))
    index = card["retrieval_index"]
    assert index["index"] == "ivf" and index["nlist"] == 16
    assert index["recall_vs_exact"]["source"] == "validation users"
    assert 0.0 < index["recall_vs_exact"]["recall@100"] <= 1.0
    assert "recommend_nprobe" in card["signatures"]
    users = tiny_world.events["user_id"].drop_duplicates().head(3).tolist()
    history = tiny_world.events["item_id"].head(6).tolist()
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # the text case-folding op, as TF Serving links it
        exact = tf.saved_model.load({ivf_exports["exact"]!r})
        ivf = tf.saved_model.load({ivf_exports["ivf"]!r})
        bad = [m for m in sys.modules if m == "tfrec" or m.startswith("tfrec.")]
        assert not bad, bad
        users = {users!r}
        history = tf.constant([{history[:3]!r}, {history[3:]!r}, ["", "", ""]])
        request = dict(user_id=tf.constant(users), history=history,
                       k=tf.constant([20, 20, 5]), exclude_seen=tf.constant([True, False, True]))
        spec = exact.signatures["serving_default"].structured_input_signature[1]
        for name in spec:
            if name not in request:  # declared context columns: empty / zero
                s = spec[name]
                request[name] = tf.zeros([3] + [1] * (len(s.shape) - 1), s.dtype)
        want = exact.signatures["serving_default"](**request)
        full = ivf.signatures["recommend_nprobe"](**request, nprobe=tf.constant([16] * 3))
        default = ivf.signatures["serving_default"](**request)
        sim_exact = exact.signatures["similar_items"](item_id=tf.constant({history[:2]!r}),
                                                      k=tf.constant([10, 10]))
        sim_ivf = ivf.signatures["similar_items_nprobe"](item_id=tf.constant({history[:2]!r}),
                                                         k=tf.constant([10, 10]),
                                                         nprobe=tf.constant([16, 16]))
        try:
            ivf.signatures["recommend_nprobe"](**request, nprobe=tf.constant([0, 1, 1]))
            error = None
        except tf.errors.InvalidArgumentError as e:
            error = e.message
        print(json.dumps(dict(
            want=want["item_ids"].numpy().astype(str).tolist(),
            full=full["item_ids"].numpy().astype(str).tolist(),
            default=default["item_ids"].numpy().astype(str).tolist(),
            want_scores=want["scores"].numpy().tolist(),
            full_scores=full["scores"].numpy().tolist(),
            sim_exact=sim_exact["item_ids"].numpy().astype(str).tolist(),
            sim_ivf=sim_ivf["item_ids"].numpy().astype(str).tolist(),
            sim_exact_scores=sim_exact["scores"].numpy().tolist(),
            sim_ivf_scores=sim_ivf["scores"].numpy().tolist(), error=error)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    _assert_same_up_to_ties(out["full"], out["full_scores"], out["want"], out["want_scores"])
    _assert_same_up_to_ties(out["sim_ivf"], out["sim_ivf_scores"], out["sim_exact"],
                            out["sim_exact_scores"])
    assert out["full"][2][5:] == [""] * 15  # row 2 asked for 5
    # The default nprobe finds most of the exact list.
    overlap = [len(set(a) & set(b)) / 20 for a, b in zip(out["default"][:2], out["want"][:2])]
    assert min(overlap) >= 0.5, overlap
    assert out["error"] and "nprobe must be between 1 and 16" in out["error"]
    # History items stay out where asked.
    for row, seen in ((0, tiny_world.events["item_id"].head(3).tolist()),):
        assert not set(out["default"][row]) & set(seen)


def test_nprobe_out_of_range_is_invalid_argument_over_grpc(ivf_exports, tiny_world):
    from tests.helpers import assert_invalid_argument, serve_models

    models = {"ivf": os.path.dirname(ivf_exports["ivf"])}
    for client in serve_models(models):
        inputs = {"item_id": np.array([tiny_world.catalog["item_id"].iloc[0]], dtype=object),
                  "k": np.array([5], np.int32)}
        rows = client.predict("ivf", {**inputs, "nprobe": np.array([16], np.int32)},
                              "similar_items_nprobe")
        assert len(rows["item_ids"][0]) == 5
        for nprobe in (0, 17):
            assert_invalid_argument(
                lambda: client.predict("ivf", {**inputs, "nprobe": np.array([nprobe], np.int32)},
                                       "similar_items_nprobe"),
                "nprobe must be between 1 and 16")


def test_pipeline_retrieves_through_the_ivf_index(trained_run, trained_ranker, tiny_world,
                                                  tiny_config, tmp_path):
    """Full probe: the pipeline's answer is the exact pipeline's; in-stock and blocked
    items stay out of the IVF candidates too."""
    from tfrec.export.pipeline import PipelineModule

    catalog = tiny_world.catalog.copy()
    catalog["in_stock"] = np.arange(len(catalog)) % 7 != 0
    history = tiny_world.events["item_id"].head(4).tolist()
    request = dict(user_id=tf.constant(["U000001", "nobody"]),
                   history=tf.constant([history[:2], history[2:]]),
                   device=tf.constant(["mobile", "desktop"]),
                   hour=tf.constant([9, 21], tf.int64), k=tf.constant([10, 10]),
                   exclude_item_ids=tf.constant([[""], [history[0]]]),
                   purchased_item_ids=tf.constant([[""], [""]]))
    exact = PipelineModule(trained_run.model, trained_ranker.model, catalog)
    ivf = PipelineModule(trained_run.model, trained_ranker.model, catalog,
                         index=ExportConfig(index="ivf", nlist=16, nprobe=4))
    assert ivf.core.index_card["nprobe"] == 4
    want = exact.recommend(**request)
    full = ivf.recommend_nprobe(**request, nprobe=tf.constant([16, 16]))
    assert full["item_ids"].numpy().tolist() == want["item_ids"].numpy().tolist()
    out = ivf.recommend(**request)["item_ids"].numpy().astype(str)
    stock = dict(zip(catalog["item_id"], catalog["in_stock"]))
    for row, blocked in zip(out, (history[:2], history[2:] + [history[0]])):
        shown = [i for i in row if i]
        assert shown and all(stock[i] for i in shown) and not set(shown) & set(blocked)
    with pytest.raises(tf.errors.InvalidArgumentError, match="nprobe must be between"):
        ivf.search_nprobe(query=tf.constant(["shoe", "lamp"]), **request,
                          nprobe=tf.constant([1, 99]))


def test_evaluation_measures_what_the_ivf_export_serves(trained_run, tiny_config):
    """`tfrec evaluate` with export.index=ivf retrieves through the index: at full probe
    its rows are exact search's; probing one list of 16 loses recall."""
    from copy import deepcopy

    from tfrec.workflow import evaluate

    def rows(**export):
        cfg = deepcopy(tiny_config)
        for name, value in export.items():
            setattr(cfg.export, name, value)
        return evaluate(cfg, run=trained_run.run_name, max_users=300)

    exact = rows(index="exact")
    full = rows(index="ivf", nlist=16, nprobe=16)
    one = rows(index="ivf", nlist=16, nprobe=1)
    for name in ("two_tower", "two_tower+ranker"):
        if name in exact:
            assert full[name] == pytest.approx(exact[name], abs=0.005), name
    assert one["two_tower"]["recall@100"] < exact["two_tower"]["recall@100"]


def test_recall_is_measured_with_each_query_s_exclusions():
    """Served and evaluated lists skip seen items, so the kept results lie deeper in the
    ranking: the index is measured (and nprobe tuned) on exactly those lists."""
    x = _clustered(n=4000)
    q = _queries(x, n=100)
    ids = [f"I{i}" for i in range(len(x))]
    seen = [{ids[r] for r in row} for row in exact_top_k(q, x, 60)]
    cfg = ExportConfig(index="ivf", nlist=64, nprobe=2)
    plain = choose_index(x, TuningQueries(q), cfg, item_ids=ids).card["recall_vs_exact"]
    deep = choose_index(x, TuningQueries(q, exclude=seen), cfg, item_ids=ids).card[
        "recall_vs_exact"]
    assert deep["with_exclusions"] and not plain["with_exclusions"]
    assert deep["recall@100"] < plain["recall@100"]
