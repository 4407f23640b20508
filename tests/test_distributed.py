"""Training under tf.distribute strategies, each in a fresh process (device layout is
fixed when TensorFlow starts), and the training logs read by a real TensorBoard."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest


def _train(tiny_world_dir, tmp_path, *flags):
    args = [sys.executable, "-m", "tfrec.cli", "train", "--workdir", str(tmp_path),
            "--data-dir", tiny_world_dir, "--set", f"train.log_dir={tmp_path / 'logs'}",
            "--set", "data.num_shards=2", "--batch-size", "128", "--run-name", "dist", *flags]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_mirrored_strategy_on_two_logical_cpus(tiny_world_dir, tmp_path):
    proc = _train(tiny_world_dir, tmp_path, "--strategy", "mirrored", "--cpu-devices", "2",
                  "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(mirrored, 2 replicas)" in proc.stdout, proc.stdout
    run_dir = tmp_path / "checkpoints" / "dist"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = metrics["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert 0.0 < metrics["validation"]["recall_at_100"] <= 1.0
    assert (run_dir / "weights").is_dir()

    # The ranker of that run trains under the same strategy.
    proc = subprocess.run(
        [sys.executable, "-m", "tfrec.cli", "train-ranker", "--workdir", str(tmp_path),
         "--set", f"train.log_dir={tmp_path / 'logs'}", "--run", "dist", "--strategy",
         "mirrored", "--cpu-devices", "2", "--epochs", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranker = json.loads((run_dir / "ranker" / "metrics.json").read_text())
    assert len(ranker["history"]["loss"]) >= 1
    assert 0.0 < ranker["validation"]["score_ndcg_at_10"] <= 1.0
    assert (run_dir / "ranker" / "weights").is_dir()


def test_unknown_strategy_and_missing_tpu_are_clear_errors(tiny_world_dir, tmp_path):
    proc = _train(tiny_world_dir, tmp_path, "--set", "train.strategy=warp", "--epochs", "1")
    assert proc.returncode == 2 and "unknown strategy 'warp'" in proc.stderr
    proc = _train(tiny_world_dir, tmp_path, "--strategy", "tpu", "--epochs", "1")
    assert proc.returncode == 2 and "needs a TPU address" in proc.stderr


def _get_json(url, deadline):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_tensorboard_serves_the_training_logs(trained_run):
    from tests.test_cli import free_port

    logdir = os.path.dirname(trained_run.tensorboard_dir)
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tfrec.cli", "board", "--logdir", logdir,
                              "--port", str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 150
        base = f"http://127.0.0.1:{port}/data"
        runs = _get_json(f"{base}/runs", deadline)
        while "tiny/validation" not in runs and time.time() < deadline:
            time.sleep(1)
            runs = _get_json(f"{base}/runs", deadline)
        assert {"tiny/train", "tiny/validation"} <= set(runs), runs
        tags = _get_json(f"{base}/plugin/scalars/tags", deadline)
        assert "epoch_recall_at_100" in tags["tiny/validation"]
        # One projector run per training run (none for train/validation sub-runs; other
        # tests may have trained into the same log dir), and every listed run has titles,
        # category and brand as metadata.
        # TensorBoard discovers runs in the background: poll until the parent run is in.
        projector_runs = _get_json(f"{base}/plugin/projector/runs", deadline)
        while "tiny" not in projector_runs and time.time() < deadline:
            time.sleep(1)
            projector_runs = _get_json(f"{base}/plugin/projector/runs", deadline)
        assert "tiny" in projector_runs and not any("/" in r for r in projector_runs), \
            projector_runs
        for run in projector_runs:
            config = _get_json(f"{base}/plugin/projector/info?run={run}", deadline)
            (embedding,) = config["embeddings"]
            assert embedding["tensorName"] == "item_embeddings", config
            assert embedding["metadataPath"], config
            url = f"{base}/plugin/projector/metadata?run={run}&name=item_embeddings"
            with urllib.request.urlopen(url, timeout=10) as r:
                header, first = r.read().decode("utf-8").split("\n")[:2]
            assert header.split("\t") == ["title", "item_id", "category", "brand"]
            assert first.split("\t")[0].strip(), first
            url = f"{base}/plugin/projector/tensor?run={run}&name=item_embeddings"
            with urllib.request.urlopen(url, timeout=10) as r:
                rows, dim = (int(x) for x in embedding["tensorShape"])
                assert len(r.read()) == rows * dim * 4  # float32 payload
    finally:
        board.terminate()
        board.wait(timeout=30)


@pytest.mark.parametrize("strategy", ["one_device", "multi_worker"])
def test_other_strategies_train(strategy, tiny_world_dir, tmp_path):
    """OneDevice, and MultiWorkerMirrored as a single worker (no TF_CONFIG)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    args = [sys.executable, "-m", "tfrec.cli", "train", "--workdir", str(tmp_path),
            "--data-dir", tiny_world_dir, "--set", f"train.log_dir={tmp_path / 'logs'}",
            "--batch-size", "256", "--epochs", "1", "--run-name", strategy,
            "--strategy", strategy]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({strategy}, 1 replicas)" in proc.stdout
    assert (tmp_path / "checkpoints" / strategy / "weights").is_dir()


def test_mixed_precision_keeps_embeddings_float32(trained_run, tiny_config):
    """The GPU path (mixed_float16) on CPU: towers in float16, scores and loss in float32,
    loss scaling in the optimizer, and one real training step."""
    import numpy as np
    import tensorflow as tf

    from tfrec.training.strategy import resolve_precision
    from tfrec.training.trainer import build_model

    assert resolve_precision("auto") == "float32"  # no GPU here
    model = build_model(trained_run.model.vocab, tiny_config, precision="mixed_float16")
    batch = {"user_id": tf.constant(["U000001", "x"]), "history": tf.constant([["", ""]] * 2),
             "query": tf.constant(["red", ""]), "device": tf.constant(["app"] * 2),
             "hour": tf.constant([1, 2], tf.int64), "item_id": tf.constant(["a", "b"]),
             "title": tf.constant(["t", "u"]), "category": tf.constant(["c", "d"]),
             "brand": tf.constant(["b", "c"]), "price": tf.constant([1.0, 2.0]),
             "weight": tf.constant([1.0, 1.0]), "candidate_prob": tf.constant([0.1, 0.1])}
    query, candidate = model(batch)
    assert query.dtype == tf.float32 and candidate.dtype == tf.float32
    assert model.query_tower.mlp.layers[0].compute_dtype == "float16"
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match="unknown mixed precision mode"):
        resolve_precision("float8")
