"""On-device export: the .tflite files run in the LiteRT interpreter and answer as the
SavedModel does (float32 to rounding, int8 within a bounded top-10 overlap)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert", reason="needs the edge extra: pip install '.[edge]'")

import tensorflow as tf  # noqa: E402

from tfrec.config import ExportConfig  # noqa: E402
from tfrec.export.edge import MISSING, EdgeRecommender, export_edge  # noqa: E402

K = 10


@pytest.fixture(scope="module")
def edge_dir(trained_run, tiny_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("edge")
    return export_edge(trained_run.run_dir, tiny_world.catalog,
                       ExportConfig(base_dir=str(base)), model=trained_run.model, k=K)


@pytest.fixture(scope="module")
def saved_model(exported_model):
    import tensorflow_text  # noqa: F401  (the case-folding op of the text tower)

    return tf.saved_model.load(exported_model)


def requests(world, n: int = 40) -> dict:
    """Real users with their recent items, plus Chinese / accented / empty queries and
    an unknown user."""
    events = world.events.sort_values("ts")
    users = list(events["user_id"].drop_duplicates().iloc[:n - 1]) + ["never-seen-user"]
    history = []
    for user in users:
        items = list(events.loc[events["user_id"] == user, "item_id"].iloc[-3:])
        history.append((items + ["", "", ""])[:3])
    queries = ["", "无线耳机 蓝牙", "café crème brûlée", "Größe XL", "wireless headphones"]
    return {"user_id": users, "history": history,
            "query": [queries[i % len(queries)] for i in range(n)],
            "device": ["mobile" if i % 2 else "desktop" for i in range(n)],
            "hour": [i % 26 for i in range(n)]}  # 24 and 25: out of range


def saved_model_answers(saved_model, features: dict, exclude_seen: bool) -> dict:
    n = len(features["user_id"])
    out = saved_model.signatures["serving_default"](
        user_id=tf.constant(features["user_id"]), history=tf.constant(features["history"]),
        query=tf.constant(features["query"]), device=tf.constant(features["device"]),
        hour=tf.constant(features["hour"], tf.int64), k=tf.constant([K] * n),
        exclude_seen=tf.constant([exclude_seen] * n))
    return {k: v.numpy() for k, v in out.items()}


def test_layout_and_card(edge_dir, tiny_world):
    assert os.path.basename(edge_dir) == "1"
    assert os.path.basename(os.path.dirname(edge_dir)) == "retrieval_tflite"
    with open(os.path.join(edge_dir, "tfrec_edge.json")) as f:
        card = json.load(f)
    assert card["k"] == K and card["num_items"] == len(tiny_world.catalog)
    assert card["signatures"] == ["recommend", "similar_items"]
    assert {"query_words", "query_grams", "exclude_seen"} <= set(card["inputs"])
    assert "query" not in card["inputs"] and card["text"]["max_length"] > 0
    for variant in ("float32", "int8"):
        size = os.path.getsize(os.path.join(edge_dir, f"{variant}.tflite"))
        assert size == card["bytes"][variant]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_float32_answers_as_the_saved_model(edge_dir, saved_model, tiny_world, exclude_seen):
    features = requests(tiny_world)
    want = saved_model_answers(saved_model, features, exclude_seen)
    got = EdgeRecommender(edge_dir, "float32").recommend(features, exclude_seen=exclude_seen)
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    # Ids equal wherever the next score is not a near-tie (rounding may swap those).
    gaps = np.abs(np.diff(want["scores"], axis=1)) > 1e-5
    stable = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], gaps[:, -1:]], axis=1)
    assert stable.mean() > 0.9
    assert (got["item_ids"][stable] == want["item_ids"][stable]).all()
    if exclude_seen:
        for row, seen in zip(got["item_ids"].astype(str), features["history"]):
            assert not set(row) & (set(seen) - {""})


def test_int8_is_small_and_agrees_with_float32(edge_dir, tiny_world):
    float32 = os.path.getsize(os.path.join(edge_dir, "float32.tflite"))
    int8 = os.path.getsize(os.path.join(edge_dir, "int8.tflite"))
    assert int8 <= float32 / 3, (int8, float32)
    features = requests(tiny_world)
    a = EdgeRecommender(edge_dir, "float32").recommend(features)["item_ids"]
    b = EdgeRecommender(edge_dir, "int8").recommend(features)["item_ids"]
    overlap = np.mean([len(set(x) & set(y)) / K for x, y in zip(a, b)])
    assert overlap >= 0.9, overlap


def test_similar_items_and_unknown_ids(edge_dir, saved_model, tiny_world):
    items = list(tiny_world.catalog["item_id"].iloc[:5])
    got = EdgeRecommender(edge_dir, "float32").similar_items(items + ["no-such-item"])
    want = saved_model.signatures["similar_items"](item_id=tf.constant(items),
                                                   k=tf.constant([K] * 5))
    np.testing.assert_allclose(got["scores"][:5], want["scores"].numpy(), atol=1e-5)
    for row, item in zip(got["item_ids"][:5].astype(str), items):
        assert item not in row and "" not in row
    assert set(got["item_ids"][5].astype(str)) == {""}
    with pytest.raises(ValueError, match=r"missing query feature\(s\) \['history'\]"):
        EdgeRecommender(edge_dir, "float32").recommend({"user_id": ["u"], "device": ["x"],
                                                        "hour": [1]})
    assert (got["scores"][5] == MISSING).all()


def test_hashed_user_ids_are_refused(trained_run, tiny_world):
    from dataclasses import replace

    from tfrec.export.edge import EdgeModule
    from tfrec.models.retrieval import TwoTowerModel

    model = trained_run.model
    hashed = TwoTowerModel(model.vocab, replace(model.config, user_hash_bins=64))
    with pytest.raises(ValueError, match="user_hash_bins"):
        EdgeModule(hashed, tiny_world.catalog)
    with pytest.raises(ValueError, match="k must be >= 1"):
        EdgeModule(model, tiny_world.catalog, k=0)


def test_cli_export_tflite(trained_run, tmp_path):
    config = os.path.join(trained_run.run_dir, "config.yaml")
    cmd = [sys.executable, "-m", "tfrec.cli", "export", "--config", config, "--format",
           "tflite", "--k", "5", "--base-dir", str(tmp_path), "--run",
           trained_run.run_name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    assert path == str(tmp_path / "retrieval_tflite" / "1")
    assert EdgeRecommender(path, "int8").similar_items(["x"])["item_ids"].shape == (1, 5)
    proc = subprocess.run(cmd + ["--gate"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tfrec: error:" in proc.stderr
    assert "--gate" in proc.stderr and "Traceback" not in proc.stderr
