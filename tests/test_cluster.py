"""Local tf.distribute clusters (`tfrec train --cluster`): a 2-worker MultiWorkerMirrored
run killed mid-training resumes from its backup and reports the same TFRS metrics as one
process; a parameter-server run shards embeddings across PS tasks.

Every cluster runs in its own session (process group), killed in `finally`, with a
timeout on every wait, so a failing test leaves no process behind.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tfrec.training.cluster import LocalCluster, parse_cluster, tf_config

EPOCHS = 3  # the kill lands in epoch 2: one epoch backed up, one or two left to resume


def _start(tmp_path, world_dir, run, log_name, *flags):
    args = [sys.executable, "-m", "tfrec.cli", "train", "--workdir", str(tmp_path / "work"),
            "--data-dir", world_dir, "--set", f"train.log_dir={tmp_path / 'logs'}",
            "--set", "data.num_shards=2", "--batch-size", "128", "--run-name", run, *flags]
    log = open(tmp_path / log_name, "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.log_path = tmp_path / log_name
    proc.log_file = log
    return proc


def _read(proc) -> str:
    return proc.log_path.read_text(errors="replace")


def _wait(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cluster still running after {timeout:.0f}s:\n{_read(proc)[-3000:]}")


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    proc.log_file.close()


def _wait_for_line(proc, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, _read(proc), re.MULTILINE)
        if match:
            return match
        if proc.poll() is not None:
            pytest.fail(f"cluster exited ({proc.returncode}) before {pattern!r}:\n"
                        f"{_read(proc)[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} within {timeout:.0f}s:\n{_read(proc)[-3000:]}")


def _gone(pids, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _started_pids(text: str) -> dict:
    return {name: int(pid) for name, pid in
            re.findall(r"^\[cluster\] started (\w+ \d+) \(pid (\d+)", text, re.MULTILINE)}


def test_cluster_specs_parse_into_tf_configs():
    assert parse_cluster("local:2") == LocalCluster("multi_worker", workers=2)
    ps = parse_cluster("local:workers=2,ps=1")
    assert ps == LocalCluster("parameter_server", workers=2, ps=1)
    assert ps.jobs() == [("chief", 0), ("worker", 0), ("worker", 1), ("ps", 0)]
    cluster = ps.addresses([1001, 1002, 1003, 1004])
    assert cluster == {"chief": ["127.0.0.1:1001"], "worker": ["127.0.0.1:1002", "127.0.0.1:1003"],
                       "ps": ["127.0.0.1:1004"]}
    assert json.loads(tf_config(cluster, "ps", 0))["task"] == {"type": "ps", "index": 0}
    for bad, message in [("local:0", "at least 1 worker"), ("local:ps=0,workers=1", "ps >= 1"),
                         ("local:ps=1", "workers >= 1"), ("local:gpus=2", "cannot parse"),
                         ("gke:2", "unknown cluster")]:
        with pytest.raises(ValueError, match=message):
            parse_cluster(bad)


def test_parameter_server_needs_a_cluster(monkeypatch):
    from tfrec.training.cluster import run_server
    from tfrec.training.strategy import make_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="--cluster local:ps=1,workers=2"):
        make_strategy("parameter_server")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]},
         "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="must be TF_CONFIG task 'chief'"):
        make_strategy("parameter_server")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}))
    with pytest.raises(ValueError, match="not a worker or ps"):
        run_server()


def test_killed_worker_resumes_from_backup_with_single_process_metrics(tiny_world_dir,
                                                                      tmp_path):
    """2 workers, one SIGKILLed after the first epoch backup: the launcher fails naming it;
    the same command resumes at the epoch after the last backup and finishes, and its
    TFRS FactorizedTopK metrics equal a single-process evaluation of the saved weights."""
    import tensorflow as tf

    from tfrec.data.io import load_tables
    from tfrec.data.prepare import load_meta
    from tfrec.training.trainer import evaluate_keras_metrics, load_trained_model

    flags = ["--cluster", "local:2", "--epochs", str(EPOCHS), "--steps-per-epoch", "6",
             "--set", "model.factorized_topk_ks=[10,50]",
             "--set", "train.early_stopping_patience=10",
             "--set", "train.histogram_freq=0"]
    run_dir = tmp_path / "work" / "checkpoints" / "ft"
    first = _start(tmp_path, tiny_world_dir, "ft", "first.log", *flags)
    try:
        # "Epoch 2/N" is printed after epoch 1's callbacks, backup included.
        _wait_for_line(first, rf"^\[worker 0\] Epoch 2/{EPOCHS}", timeout=150)
        pids = _started_pids(_read(first))
        os.kill(pids["worker 1"], signal.SIGKILL)
        assert _wait(first, timeout=60) == 1
        assert f"worker 1 (pid {pids['worker 1']}) killed by SIGKILL" in _read(first)
        assert _gone(pids.values()), "the launcher left workers running"
    finally:
        _kill_group(first)
    saved = tf.train.load_checkpoint(str(run_dir / "backup" / "chief"))
    backed_up = int(saved.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    assert 0 <= backed_up < EPOCHS - 1
    assert not (run_dir / "weights").exists()

    second = _start(tmp_path, tiny_world_dir, "ft", "second.log", *flags)
    try:
        assert _wait(second, timeout=240) == 0, _read(second)[-3000:]
    finally:
        _kill_group(second)
    text = _read(second)
    assert "(multi_worker, 2 replicas, 2 workers)" in text, text[-3000:]
    assert f"starting at epoch {backed_up + 2}" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["initial_epoch"] == backed_up + 1 and metrics["workers"] == 2
    history = metrics["history"]
    assert len(history["loss"]) == EPOCHS - backed_up - 1
    assert (run_dir / "weights").is_dir()

    # EarlyStopping restored the best epoch's weights: its reported metrics must be what
    # one process computes for those weights (not multiplied by the 2 workers).
    best = int(np.argmax(history["val_recall_at_100"]))
    model, cfg, _ = load_trained_model(str(run_dir))
    single = evaluate_keras_metrics(model, load_meta(cfg.data.tfrecord_dir)["patterns"]["val"],
                                    load_tables(tiny_world_dir).catalog, 128,
                                    cfg.data.history_length)
    for k in (10, 50):
        key = f"factorized_top_k/top_{k}_categorical_accuracy"
        assert 0.0 < single[key] <= 1.0
        assert history[f"val_{key}"][best] == pytest.approx(single[key], abs=1e-6), (k, best)
    assert metrics["validation"]["recall_at_100"] == pytest.approx(
        history["val_recall_at_100"][best], abs=1e-9)


def test_parameter_server_cluster_shards_embeddings(tiny_world_dir, tmp_path):
    """1 worker + 2 PS + this coordinator: the item table is split over both PS tasks,
    validation runs on the coordinator, and the sharded checkpoint loads in one process."""
    from tfrec.data.io import load_tables
    from tfrec.data.prepare import load_meta
    from tfrec.training.trainer import evaluate_keras_metrics, load_trained_model

    proc = _start(tmp_path, tiny_world_dir, "ps", "ps.log", "--cluster", "local:ps=2,workers=1",
                  "--epochs", "2", "--steps-per-epoch", "4",
                  "--set", "train.ps_min_shard_bytes=16384",
                  "--set", "model.factorized_topk_ks=[10]",
                  "--set", "train.histogram_freq=0")
    try:
        assert _wait(proc, timeout=240) == 0, _read(proc)[-3000:]
        text = _read(proc)
        assert _gone(_started_pids(text).values()), "PS servers outlived the coordinator"
    finally:
        _kill_group(proc)
    assert "(parameter_server, 1 replicas, 1 workers, 2 ps)" in text, text[-3000:]
    items = re.search(r"sharded \S*candidate_tower/item/table/embeddings: (.*)", text)
    assert items, text[-3000:]
    assert "task:0" in items.group(1) and "task:1" in items.group(1)
    assert "Failed to remove function remotely" not in text

    run_dir = tmp_path / "work" / "checkpoints" / "ps"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["strategy"] == "parameter_server" and len(metrics["history"]["loss"]) == 2
    validation = metrics["validation"]
    assert 0.0 < validation["recall_at_100"] <= 1.0 and np.isfinite(validation["loss"])
    model, cfg, _ = load_trained_model(str(run_dir))
    single = evaluate_keras_metrics(model, load_meta(cfg.data.tfrecord_dir)["patterns"]["val"],
                                    load_tables(tiny_world_dir).catalog, 128,
                                    cfg.data.history_length)
    key = "factorized_top_k/top_10_categorical_accuracy"
    assert validation[key] == pytest.approx(single[key], abs=1e-6)
