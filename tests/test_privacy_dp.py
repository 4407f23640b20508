"""DP-SGD retrieval training (`train.dp`): accounting, exact clipping, noise, CLI, card.

One DP run of the tiny world through the CLI (`tfrec train` then `tfrec export`) is shared
by the module; the clipping checks reuse its trained weights on one real batch.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config

dp_accounting = pytest.importorskip("dp_accounting")

NOISE, CLIP, DELTA, EPOCHS, BATCH = 1.3, 1.0, 1e-4, 2, 256


def tfrec_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tfrec.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dp_run(tiny_world_dir, tmp_path_factory):
    """(workdir, run_dir, export dir) of a DP run trained and exported through the CLI."""
    work = str(tmp_path_factory.mktemp("dp"))
    dp = f"train.dp={{noise_multiplier: {NOISE}, l2_clip: {CLIP}, delta: {DELTA}}}"
    proc = tfrec_cli("train", "--workdir", work, "--data-dir", tiny_world_dir,
                     "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--run-name", "dp",
                     "--set", "data.num_shards=2", "--set", dp,
                     "--set", f"train.log_dir={work}/tb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = tfrec_cli("export", "--workdir", work, "--run", "dp", "--set",
                     f"data.data_dir={tiny_world_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = sorted(glob.glob(os.path.join(work, "models", "retrieval", "*")))
    return work, os.path.join(work, "checkpoints", "dp"), exported[-1]


def _independent_epsilon(q, sigma, steps, delta):
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return accountant.get_epsilon(delta)


def test_epsilon_matches_dp_accounting(dp_run):
    work, run_dir, exported = dp_run
    with open(os.path.join(run_dir, "metrics.json")) as f:
        dp = json.load(f)["dp"]
    with open(os.path.join(work, "tfrecords", "meta.json")) as f:
        examples = json.load(f)["counts"]["train"]
    steps = EPOCHS * (examples // BATCH)  # shuffled batches, the last partial one dropped
    expected = _independent_epsilon(BATCH / examples, NOISE, steps, DELTA)
    assert dp["steps"] == steps
    assert dp["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert (dp["noise_multiplier"], dp["l2_clip"], dp["delta"]) == (NOISE, CLIP, DELTA)
    assert dp["sampling_rate"] == pytest.approx(BATCH / examples)
    assert dp["optimizer"] == "adam" and "training example" in dp["privacy_unit"]
    # TensorBoard: dp/epsilon after each epoch, the last one the run's epsilon
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(work, "tb", "dp", "train"),
                              size_guidance={"tensors": 0}).Reload()
    scalars = {e.step: float(tf.make_ndarray(e.tensor_proto))
               for e in events.Tensors("dp/epsilon")}
    assert sorted(scalars) == list(range(EPOCHS))
    assert scalars[EPOCHS - 1] == pytest.approx(expected, rel=1e-5)
    assert scalars[0] < scalars[EPOCHS - 1]
    # the exported model card carries the same block
    with open(os.path.join(exported, "assets.extra", "tfrec_model.json")) as f:
        card = json.load(f)
    assert card["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert card["privacy"]["delta"] == DELTA


def test_target_epsilon_finds_the_noise_that_reaches_it():
    from tfrec.training.privacy import epsilon, noise_for_epsilon

    sigma = noise_for_epsilon(3.0, 0.01, 2000, 1e-5)
    assert _independent_epsilon(0.01, sigma, 2000, 1e-5) == pytest.approx(3.0, abs=1e-3)
    assert epsilon(sigma * 0.95, 0.01, 2000, 1e-5) > 3.0  # the smallest such noise


@pytest.fixture(scope="module")
def real_batch(dp_run):
    """(model, preprocessed batch of 24 training examples, 16 sampled negatives)."""
    from tfrec.data.io import load_tables
    from tfrec.data.prepare import load_meta
    from tfrec.data.tfrecord import make_dataset
    from tfrec.training.negatives import negatives_dataset
    from tfrec.training.trainer import load_trained_model

    work, run_dir, _ = dp_run
    model, cfg, _ = load_trained_model(run_dir)
    pattern = load_meta(cfg.data.tfrecord_dir)["patterns"]["train"]
    batch = next(iter(make_dataset(pattern, 24, cfg.data.history_length, shuffle=False,
                                   features=model.features, preprocess=model.preprocess)))
    batch.pop("candidate_prob")
    catalog = load_tables(cfg.data.data_dir).catalog
    negatives = next(iter(negatives_dataset(catalog, model, 16, seed=0)))
    return model, batch, negatives


def _slow_gradient(model, example, negatives):
    """One example's gradient, every variable dense (the slow, obvious way)."""
    from tfrec.models.dp import sampled_softmax_losses

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(sampled_softmax_losses(model, example, negatives))
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables)]


def test_clipped_sum_equals_individually_clipped_gradients(real_batch):
    from tfrec.models.dp import noisy_clipped_mean, sampled_softmax_losses

    model, batch, negatives = real_batch
    variables = model.trainable_variables
    size = int(batch["weight"].shape[0])
    slow = [_slow_gradient(model, tf.nest.map_structure(lambda t: t[i:i + 1], batch),
                           negatives) for i in range(size)]
    slow_norms = np.array([np.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
                           for grads in slow])
    clip = float(np.median(slow_norms))  # about half the examples clipped
    expected = [sum(grads[j] * min(1.0, clip / n) for grads, n in zip(slow, slow_norms)) / size
                for j in range(len(variables))]
    # chunk 5: chunks of unequal sizes, and examples repeat rows (words, trigrams, items)
    grads, norms, _ = tf.function(lambda b: noisy_clipped_mean(
        lambda x: sampled_softmax_losses(model, x, negatives), b, variables, clip,
        noise_multiplier=0.0, chunk=5))(batch)
    np.testing.assert_allclose(norms.numpy(), slow_norms, rtol=1e-4)
    assert 0 < (slow_norms > clip).sum() < size
    for got, want, var in zip(grads, expected, variables):
        # float32 sums of many terms in another order: tolerance on the variable's scale
        want = want.numpy()
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4,
                                   atol=1e-5 * max(float(np.abs(want).max()), 1e-6),
                                   err_msg=var.name)


def test_noise_has_std_sigma_times_clip_over_batch(real_batch):
    from tfrec.models.dp import noisy_clipped_mean, sampled_softmax_losses

    model, batch, negatives = real_batch
    variables = model.trainable_variables
    loss_fn = lambda x: sampled_softmax_losses(model, x, negatives)  # noqa: E731
    step = tf.function(lambda b, sigma: noisy_clipped_mean(loss_fn, b, variables, 0.5,
                                                           sigma, chunk=24)[0])
    clean = step(batch, 0.0)
    noisy = step(batch, 2.0)
    noise = np.concatenate([(n - c).numpy().ravel() for n, c in zip(noisy, clean)])
    size = int(batch["weight"].shape[0])
    assert noise.size > 100_000  # every coordinate, embedding tables included
    assert np.std(noise) * size == pytest.approx(2.0 * 0.5, rel=0.02)
    assert abs(np.mean(noise) * size) < 0.01


def test_dp_config_from_yaml_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  dp:\n    target_epsilon: 3\n    delta: 1e-6\n")
    cfg = Config.from_yaml(str(path))
    assert (cfg.train.dp.target_epsilon, cfg.train.dp.delta) == (3.0, 1e-6)
    cfg.to_yaml(str(path))
    assert Config.from_yaml(str(path)).train.dp == cfg.train.dp
    assert Config().override(["train.dp=null"]).train.dp is None


@pytest.mark.parametrize("setting, message", [
    ("train.dp={noise_multiplier: 1, target_epsilon: 3}", "exactly one of noise_multiplier"),
    ("train.dp={noise_multiplier: 1, delta: 2}", "train.dp.delta must be in (0, 1)"),
    ("train.dp={noise_multiplier: 1, l2_clip: 0}", "train.dp.l2_clip must be > 0"),
    ("train.dp={noise_multiplier: 1, clip: 1}", "unknown config field train.dp.clip"),
    ("train.dp=3", "train.dp must be a mapping"),
])
def test_bad_dp_settings_are_config_errors(setting, message):
    from tfrec.training.privacy import check_dp

    with pytest.raises(ValueError) as info:
        check_dp(Config().override([setting]), "float32")
    assert message in str(info.value)


def test_settings_dp_cannot_run_with_are_refused():
    from tfrec.training.privacy import check_dp

    for setting, message in [("train.strategy=mirrored", "train.strategy"),
                             ("model.num_hard_negatives=4", "model.num_hard_negatives"),
                             ("model.factorized_topk_ks=[10]", "model.factorized_topk_ks")]:
        cfg = Config().override(["train.dp={noise_multiplier: 1}", setting])
        with pytest.raises(ValueError) as info:
            check_dp(cfg, "float32")
        assert message in str(info.value)
    with pytest.raises(ValueError, match="train.mixed_precision"):
        check_dp(Config().override(["train.dp={noise_multiplier: 1}"]), "mixed_float16")


def test_bad_dp_setting_on_the_command_line(tmp_path, tiny_world_dir):
    proc = tfrec_cli("train", "--workdir", str(tmp_path), "--data-dir", tiny_world_dir,
                     "--set", "train.dp={noise_multiplier: 1.1, delta: 0}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tfrec: error: train.dp.delta must be in (0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recall_falls_as_epsilon_falls(dp_run, tiny_config, tmp_path_factory):
    """Clipping alone (epsilon inf) > the module's run (sigma 1.3) > sigma 16 (epsilon ~0.1),
    same data, epochs and batch: validation recall@100 follows epsilon."""
    from copy import deepcopy

    from tfrec.config import DPConfig
    from tfrec.training.trainer import train_retrieval

    work = tmp_path_factory.mktemp("dp_recall")
    recall = {}
    for sigma in (0.0, 16.0):
        cfg = deepcopy(tiny_config)
        cfg.train.checkpoint_dir, cfg.train.log_dir = str(work / "ckpt"), str(work / "tb")
        cfg.train.epochs, cfg.train.batch_size = EPOCHS, BATCH
        cfg.train.run_name = f"sigma-{sigma:g}"
        cfg.train.dp = DPConfig(noise_multiplier=sigma, l2_clip=CLIP, delta=DELTA)
        recall[sigma] = train_retrieval(cfg).val_metrics["recall_at_100"]
    with open(os.path.join(dp_run[1], "metrics.json")) as f:
        recall[NOISE] = json.load(f)["validation"]["recall_at_100"]
    # measured: 0.39 (clip only), 0.25 (sigma 1), 0.20 (sigma 16) on this world
    assert recall[0.0] > recall[NOISE] + 0.05, recall
    assert recall[NOISE] > recall[16.0], recall
