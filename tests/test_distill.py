"""`tfrec search distill`: a shallower student learns a trained search run's query tower,
is saved as a search run that reloads with the same answers, and exports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tests.test_search import _tiny_config


@pytest.fixture(scope="module")
def teacher(tiny_encoder, tmp_path_factory):
    from tfrec.search.train import train_search

    workdir = str(tmp_path_factory.mktemp("teacher"))
    cfg = dataclasses.replace(_tiny_config(tiny_encoder), epochs=2, ranker_epochs=1,
                              ranker_folds=0)  # the teacher's ranker is not the subject
    train_search(cfg, workdir, log_dir=str(tmp_path_factory.mktemp("teacher_logs")))
    return workdir


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    from tfrec.search.distill import DistillConfig, distill_search

    out = str(tmp_path_factory.mktemp("student"))
    settings = DistillConfig(layers=1, epochs=2, title_queries=200, lr=3e-4)
    return distill_search(teacher, out, settings, latency_queries=5), out


def test_student_is_shallower_and_starts_from_the_teacher(distilled):
    from tfrec.text.hub_export import read_export_info

    result, out = distilled
    info = read_export_info(result["student_encoder"])
    assert info["config"]["num_layers"] == 1
    assert result["distill_queries"] > 200  # training queries + 200 titles
    assert len(result["val_ndcg@10"]) == 3  # before training + 2 epochs
    for side in ("teacher", "student"):
        assert set(result[side]["metrics"]) >= {"bm25", "two_tower", "hybrid",
                                                "two_tower+ranker"}
        assert set(result[side]["latency_ms"]) == {"query_tower", "search"}
    kept = result["kept_gain_over_bm25"]
    assert set(kept) == {"two_tower", "hybrid", "two_tower+ranker"}
    with open(os.path.join(out, "search", "distill.json")) as f:
        saved = json.load(f)
    assert saved["kept_gain_over_bm25"] == pytest.approx(kept, nan_ok=True)


def test_student_run_reloads_with_the_same_answers(distilled):
    from tfrec.search.index import load_search_pipeline

    result, out = distilled
    pipeline = result["pipeline"]
    queries = tf.constant(["red shoes", "无线耳机", "café crème"])
    want = pipeline.search(queries, num_results=5)
    from tfrec.search.config import SearchConfig
    from tfrec.search.train import load_search_data

    saved = SearchConfig.from_yaml(os.path.join(out, "search", "model", "config.yaml"))
    reloaded, cfg = load_search_pipeline(out, load_search_data(saved).catalog)
    assert cfg.encoder == result["student_encoder"]
    got = reloaded.search(queries, num_results=5)
    np.testing.assert_allclose(got["dense_scores"].numpy(), want["dense_scores"].numpy(),
                               atol=1e-4)
    assert (got["product_ids"].numpy() == want["product_ids"].numpy()).all()


def test_cli_distill_exports_and_refuses_bad_settings(teacher, tmp_path):
    base = [sys.executable, "-m", "tfrec.cli", "search", "distill", "--run", teacher]
    proc = subprocess.run(base + ["--workdir", str(tmp_path / "s"), "--layers", "1",
                                  "--epochs", "1", "--set", "title_queries=50", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    assert figures["export"] and os.path.isfile(
        os.path.join(figures["export"], "saved_model.pb"))
    proc = subprocess.run(base + ["--workdir", str(tmp_path / "t"), "--layers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "tfrec: error:" in proc.stderr
    assert "layers must be in [1, 1]" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base[:-1] + [str(tmp_path / "nothing"), "--workdir",
                                       str(tmp_path / "u")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no trained search run" in proc.stderr
