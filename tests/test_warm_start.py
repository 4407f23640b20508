"""Warm-start training on a second period of data, and the export gate.

Period 1 is the tiny world cut at 80% of its time range (fewer users, items and words);
period 2 is the whole world. A run trained on period 1 starts the period-2 run: its
vocabularies grow, trained rows are kept, and a deliberately worse candidate is refused
by `tfrec export --gate` while an equal one passes, with both figures in the card.
"""

from __future__ import annotations

import json
import os
from copy import deepcopy

import numpy as np
import pytest

import tfrec  # noqa: F401

from tfrec.data.io import write_table
from tfrec.features.vocab import Vocabularies


@pytest.fixture(scope="module")
def periods(tiny_world, tiny_world_dir, tiny_config, tmp_path_factory):
    """(config of period 1, config of period 2) sharing one checkpoint and export dir."""
    root = tmp_path_factory.mktemp("periods")
    events = tiny_world.events
    cut = int(events["ts"].min() + 0.8 * (events["ts"].max() - events["ts"].min()))
    first = root / "data1"
    first.mkdir()
    write_table(tiny_world.catalog, str(first / "catalog.parquet"))
    write_table(tiny_world.users, str(first / "users.parquet"))
    write_table(events[events["ts"] < cut].reset_index(drop=True), str(first / "events.parquet"))
    cfg1 = deepcopy(tiny_config)
    cfg1.data.data_dir, cfg1.data.tfrecord_dir = str(first), str(root / "tf1")
    cfg1.train.checkpoint_dir = str(root / "checkpoints")
    cfg1.train.log_dir = str(root / "logs")
    cfg1.export.base_dir = str(root / "models")
    cfg1.train.run_name, cfg1.train.epochs = "period1", 1
    cfg1.ranking.epochs = 1
    cfg2 = deepcopy(cfg1)
    cfg2.data.data_dir, cfg2.data.tfrecord_dir = tiny_world_dir, str(root / "tf2")
    cfg2.train.run_name, cfg2.train.epochs = "period2", 1
    return cfg1, cfg2


@pytest.fixture(scope="module")
def runs(periods):
    """The period-1 run (with its ranker) and the period-2 run warm-started from it."""
    from tfrec.training.ranking_trainer import train_ranker
    from tfrec.training.trainer import train_retrieval

    cfg1, cfg2 = periods
    first = train_retrieval(deepcopy(cfg1))
    train_ranker(deepcopy(cfg1), run="period1", retrieval=first.model, max_users=80)
    warm = deepcopy(cfg2)
    warm.train.warm_start, warm.data.train_days = "period1", 4.0
    second = train_retrieval(warm)
    ranker = train_ranker(warm, run="period2", retrieval=second.model, max_users=80)
    return first, second, ranker


def test_warm_start_grows_vocabularies_and_keeps_trained_rows(runs, periods):
    from tfrec.training.trainer import build_model
    from tfrec.training.warm_start import transfer_weights

    first, second, ranker = runs
    old, new = Vocabularies.load(first.run_dir), Vocabularies.load(second.run_dir)
    for name in ("users", "items", "text_tokens"):
        assert getattr(new, name)[:len(getattr(old, name))] == getattr(old, name), name
    assert len(new.users) > len(old.users) and len(new.items) > len(old.items)
    assert new.price_boundaries == old.price_boundaries

    metrics = json.load(open(os.path.join(second.run_dir, "metrics.json")))
    assert metrics["warm_start"]["from"].endswith("period1")
    assert metrics["warm_start"]["grown"] >= 2 and metrics["warm_start"]["new_rows"] > 0
    assert metrics["train_steps"] > 0 and np.isfinite(second.val_metrics["recall_at_100"])
    ranker_metrics = json.load(open(os.path.join(ranker.ranker_dir, "metrics.json")))
    assert ranker_metrics["warm_start"]["copied"] > 0
    assert ranker_metrics["warm_start"]["grown"] >= 2  # user and item tables

    # Row by row: a freshly built period-2 model gets period 1's rows.
    model = build_model(new, periods[1])
    model.build_from_features()
    before = model.query_tower.user.embedding.embeddings.numpy().copy()
    transfer_weights(first.model, model)
    table = model.query_tower.user.embedding.embeddings.numpy()
    trained = first.model.query_tower.user.embedding.embeddings.numpy()
    np.testing.assert_array_equal(table[:len(trained)], trained)
    # New users start as the trained OOV bucket (row 0), not as random rows.
    assert not np.allclose(before[len(trained):], trained[0])
    np.testing.assert_array_equal(table[len(trained):],
                                  np.broadcast_to(trained[0], table[len(trained):].shape))


def test_warm_start_refuses_another_model_config(runs, periods):
    from tfrec.training.trainer import build_model
    from tfrec.training.warm_start import transfer_weights

    cfg = deepcopy(periods[1])
    cfg.model.embedding_dim = 2 * cfg.model.embedding_dim
    model = build_model(Vocabularies.load(runs[1].run_dir), cfg)
    model.build_from_features()
    with pytest.raises(ValueError, match="model config differs"):
        transfer_weights(runs[0].model, model)


def test_export_gate_refuses_a_worse_candidate_and_passes_an_equal_one(runs, periods, capsys):
    from tfrec import workflow
    from tfrec.cli import main
    from tfrec.export.gate import GateRefused
    from tfrec.export.versioned import list_versions
    from tfrec.training.trainer import train_retrieval

    _, second, _ = runs
    cfg = deepcopy(periods[1])
    first_export = workflow.export(cfg, run="period2", gate=0.01)  # nothing served yet
    card = json.load(open(os.path.join(first_export, "assets.extra", "tfrec_model.json")))
    assert card["gate"]["current_version"] is None and card["gate"]["passed"]

    worse = deepcopy(cfg)
    worse.train.run_name, worse.train.epochs = "worse", 1
    worse.train.steps_per_epoch, worse.train.learning_rate = 1, 1e-6
    bad = train_retrieval(worse)
    model_dir = os.path.join(cfg.export.base_dir, cfg.export.model_name)
    with pytest.raises(GateRefused, match="below version 1") as info:
        workflow.export(cfg, run="worse", model=bad.model, gate=0.01)
    assert "nothing was exported" in str(info.value)
    assert list_versions(model_dir) == [1]
    assert main(["export", "--run", "worse", "--gate", "--retrieval-only",
                 "--set", f"train.checkpoint_dir={cfg.train.checkpoint_dir}",
                 "--base-dir", cfg.export.base_dir]) == 2
    assert "tfrec: error: export gate:" in capsys.readouterr().err
    assert list_versions(model_dir) == [1]

    path = workflow.export(cfg, run="period2", model=second.model, gate=0.01)
    gate = json.load(open(os.path.join(path, "assets.extra", "tfrec_model.json")))["gate"]
    assert gate["current_version"] == 1 and gate["passed"]
    assert gate["candidate"] == pytest.approx(gate["current"], abs=1e-6)
    assert gate["metric"] == "recall@100" and gate["users"] > 0
