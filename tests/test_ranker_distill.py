"""Ranker distillation: a smaller ranker learns a trained ranker's scores (listwise KL)."""

import os
import shutil
import subprocess
import sys
from copy import deepcopy

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config, RankingConfig

STUDENT = ["ranking.deep_units=[16]", "ranking.cross_layers=1", "ranking.epochs=4",
           "ranking.learning_rate=0.02", "ranking.batch_size=32"]
WEIGHT, T = 10.0, 5.0  # the teacher's scores span ~+-15 here: T spreads its softmax


def numpy_kl(teacher: np.ndarray, student: np.ndarray, valid: np.ndarray, t: float) -> float:
    """Mean over rows of KL(softmax(teacher / t) || softmax(student / t)) over valid items."""
    out = []
    for a, b, v in zip(teacher, student, valid):
        a, b = a[v] / t, b[v] / t
        p = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        log_p = np.log(p)
        log_q = b - b.max() - np.log(np.exp(b - b.max()).sum())
        out.append(float(np.sum(p * (log_p - log_q))))
    return float(np.mean(out))


def test_distill_loss_is_the_listwise_kl_over_real_candidates(trained_ranker, tiny_world):
    from dataclasses import replace

    model = trained_ranker.model
    items = list(tiny_world.catalog["item_id"])
    f = {"user_id": tf.constant(["U0", "nobody"]),
         "history": tf.constant([[items[1], ""], ["", ""]]),
         "device": tf.constant(["mobile", "desktop"]), "hour": tf.constant([3, 20], tf.int64),
         "query": tf.constant(["", ""]),
         "item_id": tf.constant([[items[2], items[3], items[4], ""],
                                 [items[5], items[6], "", ""]]),
         "retrieval_score": tf.constant([[0.5, 0.1, 0.3, 0.0], [0.2, 0.3, 0.0, 0.0]])}
    teacher = np.array([[2.0, -1.0, 0.5, 9.0], [0.0, 3.0, 7.0, -4.0]], np.float32)
    f["teacher_score"] = tf.constant(teacher)
    logits = model.logits(model.scoring_inputs(f, training=False))
    student = model.score(logits).numpy()
    valid = f["item_id"].numpy() != b""
    config = model.config
    try:
        for t in (1.0, 2.5):
            model.config = replace(config, distill_temperature=t)
            got = float(model.distill_loss(f, logits))
            # Padding scores (9.0, 7.0, -4.0 above) must not count.
            assert got == pytest.approx(numpy_kl(teacher, student, valid, t) * t * t, rel=1e-4)
        # A student that already scores like the teacher has nothing left to learn.
        f["teacher_score"] = tf.constant(student)
        assert float(model.distill_loss(f, logits)) == pytest.approx(0.0, abs=1e-5)
    finally:
        model.config = config


def test_bad_distill_settings_are_clear_errors(trained_ranker, tiny_world):
    from tfrec.models.ranking import RankingModel

    model = trained_ranker.model
    for bad in (dict(distill_weight=-1.0), dict(distill_temperature=0.0)):
        with pytest.raises(ValueError, match="distill_weight must be >= 0"):
            RankingModel(model.vocab, RankingConfig(**bad), model.catalog)


@pytest.fixture(scope="module")
def teacher(trained_run, trained_ranker):
    """The shared ranker reloaded with its retrieval-score weight negated: a teacher whose
    order is far from where a student starts (the retrieval order) and from the labels."""
    from tfrec.training.ranking_trainer import load_ranker

    model, _ = load_ranker(trained_run.run_dir)
    for task in model.tasks:
        model.retrieval_scale[task].assign(-model.retrieval_scale[task])
    return model


@pytest.fixture(scope="module")
def students(trained_run, teacher, tiny_config, tmp_path_factory):
    """A smaller ranker distilled from `teacher`, trained on a copy of the shared run
    (which keeps the shared run's ranker untouched)."""
    from tfrec.training.ranking_trainer import train_ranker

    root = tmp_path_factory.mktemp("distill")
    shutil.copytree(trained_run.run_dir, os.path.join(root, "copy"),
                    ignore=shutil.ignore_patterns("ranker"))
    cfg = deepcopy(tiny_config).override(STUDENT + [f"ranking.distill_weight={WEIGHT}",
                                                    f"ranking.distill_temperature={T}"])
    cfg.train.checkpoint_dir = str(root)
    result = train_ranker(cfg, run="copy", retrieval=trained_run.model, teacher=teacher)
    shutil.copytree(os.path.join(root, "copy", "ranker"), os.path.join(root, "distilled"))
    return root, result


def test_distilled_student_learns_its_teachers_order(students, trained_run, teacher,
                                                     trained_ranker, tiny_config):
    import json

    from tfrec.training.ranking_trainer import predict_scores, training_lists

    root, student = students
    arrays, _ = training_lists(tiny_config, trained_run.run_dir, trained_run.model)
    target = predict_scores(teacher, arrays)[0]
    valid = arrays["item_id"] != ""
    # The shared ranker learnt the same labels without the teacher (and is larger).
    kl = {name: numpy_kl(target, predict_scores(model, arrays)[0], valid, T)
          for name, model in (("distilled", student.model), ("labels", trained_ranker.model))}
    assert kl["distilled"] < 0.5 * kl["labels"], kl
    small = sum(int(np.prod(v.shape)) for v in student.model.trainable_weights)
    large = sum(int(np.prod(v.shape)) for v in trained_ranker.model.trainable_weights)
    assert small < large
    with open(os.path.join(root, "distilled", "metrics.json")) as f:
        assert json.load(f)["distilled"] is True


def test_cli_distils_from_a_copied_run(students, tiny_config, tmp_path):
    """The documented flow: copy the run to keep its ranker as the teacher, then train a
    smaller ranker in the run with `--teacher` (another process, the CLI)."""
    import json

    root, _ = students
    shutil.copytree(os.path.join(root, "copy"), os.path.join(root, "copy-teacher"))
    cfg = deepcopy(tiny_config)
    cfg.train.checkpoint_dir = str(root)
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(str(path))
    proc = subprocess.run([sys.executable, "-m", "tfrec", "train-ranker", "--config", str(path),
                           "--run", "copy", "--teacher", "copy-teacher",
                           "--set", "ranking.deep_units=[8]", "--set", "ranking.epochs=1"],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranker trained on" in proc.stdout
    with open(os.path.join(root, "copy", "ranker", "metrics.json")) as f:
        assert json.load(f)["distilled"] is True
    saved = Config.from_yaml(os.path.join(root, "copy", "ranker", "config.yaml"))
    assert list(saved.ranking.deep_units) == [8]  # the student's own architecture


def test_cli_teacher_that_does_not_exist_is_a_clear_error(tiny_config, tmp_path):
    cfg = deepcopy(tiny_config)
    path = tmp_path / "cfg.yaml"
    cfg.to_yaml(str(path))
    proc = subprocess.run([sys.executable, "-m", "tfrec", "train-ranker", "--config", str(path),
                           "--teacher", "no-such-run"], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "tfrec: error:" in proc.stderr, proc.stderr[-2000:]
    assert "training run 'no-such-run' not found" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
