"""Two-tower retrieval: learns, beats popularity, logs to TensorBoard, resumes."""

import copy
import glob
import os
import re

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.prepare import load_meta
from tfrec.evaluation.report import evaluate_period
from tfrec.models.embedding import tower_fn
from tfrec.training.trainer import load_trained_model, train_retrieval


def test_training_beats_popularity_on_test_period(trained_run, tiny_config, tiny_world):
    meta = load_meta(tiny_config.data.tfrecord_dir)
    split = meta["split"]
    model = trained_run.model
    rows = evaluate_period(tiny_world.events, tiny_world.catalog, split["t_test"], split["t_end"],
                           tiny_config.data.history_length, tower_fn(model.query_tower),
                           tower_fn(model.candidate_tower), data_dir=tiny_config.data.data_dir)
    two_tower, popularity, oracle = rows["two_tower"], rows["popularity"], rows["oracle"]
    assert two_tower["users"] > 50
    assert two_tower["recall@100"] > popularity["recall@100"] + 0.03, rows
    assert two_tower["ndcg@10"] > popularity["ndcg@10"], rows
    # The oracle knows the generator's utilities: it bounds what data allows.
    assert oracle["recall@10"] > two_tower["recall@10"], rows


def test_training_improves_validation_recall(trained_run, tiny_config, tiny_world):
    """The kept weights beat the same model untrained on the validation period.

    (Comparing the last epoch with the first failed a CI run: on the tiny world the
    recall peaks after one or two epochs, and the best epoch is what is kept.)
    """
    from tfrec.data.feature_spec import FeatureSpec
    from tfrec.models.retrieval import TwoTowerModel

    history = trained_run.history
    assert "val_recall_at_100" in history and all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < history["loss"][0]
    _, cfg, vocab = load_trained_model(trained_run.run_dir)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    untrained = TwoTowerModel(vocab, cfg.model, features=FeatureSpec.from_config(cfg.features))
    split = load_meta(tiny_config.data.tfrecord_dir)["split"]

    def recall(model):
        rows = evaluate_period(tiny_world.events, tiny_world.catalog, split["t_val"],
                               split["t_test"], cfg.data.history_length,
                               tower_fn(model.query_tower), tower_fn(model.candidate_tower),
                               data_dir=tiny_config.data.data_dir)
        return rows["two_tower"]["recall@100"]

    before, after = recall(untrained), recall(trained_run.model)
    assert after > before + 0.05, (before, after)


def test_run_directory_rebuilds_the_same_model(trained_run, tiny_world):
    model, cfg, vocab = load_trained_model(trained_run.run_dir)
    assert cfg.train.run_name == "tiny"
    assert len(vocab.items) > 0 and len(vocab.text_tokens) > 0
    features = {"item_id": tiny_world.catalog["item_id"].to_numpy()[:5],
                "title": tiny_world.catalog["title"].to_numpy()[:5],
                "category": tiny_world.catalog["category"].to_numpy()[:5],
                "brand": tiny_world.catalog["brand"].to_numpy()[:5],
                "price": tiny_world.catalog["price"].to_numpy(np.float32)[:5]}
    original = tower_fn(trained_run.model.candidate_tower)(features)
    rebuilt = tower_fn(model.candidate_tower)(features)
    np.testing.assert_allclose(original, rebuilt, atol=1e-5)


def test_cold_start_items_get_content_embeddings(trained_run, tiny_world):
    """Two unseen ids with the same content embed alike; different content differs."""
    catalog = tiny_world.catalog
    rows = catalog.iloc[[0, 0, 1]]
    features = {"item_id": np.array(["NEW-1", "NEW-2", "NEW-3"], dtype=object),
                "title": rows["title"].to_numpy(), "category": rows["category"].to_numpy(),
                "brand": rows["brand"].to_numpy(), "price": rows["price"].to_numpy(np.float32)}
    emb = tower_fn(trained_run.model.candidate_tower)(features)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
    assert np.linalg.norm(emb[0] - emb[2]) > 1e-3


def _scalar_tags(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])


def test_tensorboard_logs_have_expected_tags(trained_run, tiny_config):
    run = trained_run.tensorboard_dir
    train_tags, train_histograms = _scalar_tags(os.path.join(run, "train"))
    val_tags, _ = _scalar_tags(os.path.join(run, "validation"))
    assert {"epoch_loss", "epoch_learning_rate"} <= train_tags, train_tags
    assert {"epoch_loss", "epoch_recall_at_10", "epoch_recall_at_100",
            "epoch_ndcg_at_10"} <= val_tags, val_tags
    # histogram_freq=1 writes weight histograms (tf_keras stores them as tensors).
    assert any("kernel" in t or "embeddings" in t for t in train_tags | train_histograms)
    # HParams summary in the run root, projector config with titles as metadata.
    root_tags, _ = _scalar_tags(run)
    assert any(t.startswith("_hparams_") for t in root_tags), root_tags
    with open(os.path.join(run, "projector_config.pbtxt")) as f:
        assert "metadata.tsv" in f.read()
    with open(os.path.join(run, "metadata.tsv"), encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert header == ["title", "item_id", "category", "brand"]
    with open(os.path.join(run, "item_embeddings.tsv")) as f:
        vectors = [line.split("\t") for line in f]
    assert len(vectors) == len(rows) > 0 and all(len(r) == len(header) for r in rows)
    assert len(vectors[0]) == tiny_config.model.embedding_dim
    # No checkpoint beside the sub-runs: TensorBoard would lend it to train/validation.
    assert not glob.glob(os.path.join(run, "*.ckpt*")) and not glob.glob(
        os.path.join(run, "checkpoint"))


@pytest.mark.parametrize("strategy", ["default", "one_device"])
def test_training_resumes_from_backup_after_a_crash(tiny_config, strategy):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.strategy = strategy
    cfg.train.run_name = f"resume-{strategy}"
    cfg.train.epochs = 3
    cfg.train.early_stopping_patience = 10

    class Crash(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt("simulated crash in epoch 3")

    with pytest.raises(KeyboardInterrupt):
        train_retrieval(cfg, extra_callbacks=[Crash()])
    backup = os.path.join(cfg.train.checkpoint_dir, cfg.train.run_name, "backup")
    assert os.listdir(backup), "BackupAndRestore left no state behind"

    class Epochs(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_epoch_begin(self, epoch, logs=None):
            self.seen.append(epoch)

    epochs = Epochs()
    result = train_retrieval(cfg, extra_callbacks=[epochs])
    assert epochs.seen == [2], f"resumed run should only train epoch 3, ran {epochs.seen}"
    assert os.path.isdir(os.path.join(result.run_dir, "weights"))


def test_a_backup_of_another_configuration_is_set_aside(tmp_path, caplog):
    """An interrupted run's backup resumes the same configuration; another one (e.g. a
    ranker retrained in another text mode) starts fresh instead of failing to restore."""
    from tfrec.training.callbacks import BackupAndRestore, config_fingerprint
    from tfrec.config import RankingConfig

    backup = tmp_path / "backup"
    same = config_fingerprint(RankingConfig())
    assert same == config_fingerprint(RankingConfig(epochs=9)), "more epochs still resume"
    assert same == config_fingerprint(RankingConfig(patience=2, max_candidates=50)), \
        "another stopping rule or serving limit still resumes"
    other = config_fingerprint(RankingConfig(text_mode="fast"))
    BackupAndRestore(str(backup), same)
    (backup / "chief").mkdir()
    (backup / "chief" / "state").write_text("epoch 2")
    BackupAndRestore(str(backup), same)
    assert (backup / "chief" / "state").exists()
    with caplog.at_level("WARNING"):
        BackupAndRestore(str(backup), other)
    assert not (backup / "chief").exists() and "another configuration" in caplog.text
    assert (backup / "fingerprint.txt").read_text() == other


def test_factorized_topk_metrics_match_numpy(trained_run, tiny_config, tiny_world):
    """TFRS FactorizedTopK over the catalog index == top-k accuracy computed by hand."""
    from tfrec.data.tfrecord import make_dataset
    from tfrec.models.retrieval import TwoTowerModel
    from tfrec.training.callbacks import refresh_index
    from tfrec.training.trainer import WEIGHTS_DIR, WEIGHTS_PREFIX

    config = copy.deepcopy(trained_run.model.config)
    config.factorized_topk_ks = (10, 50)
    model = TwoTowerModel(trained_run.model.vocab, config)
    model.build_from_features()
    model.load_weights(os.path.join(trained_run.run_dir, WEIGHTS_DIR, WEIGHTS_PREFIX)
                       ).expect_partial()
    model.compile(optimizer="adagrad")
    refresh_index(model, tiny_world.catalog)
    pattern = load_meta(tiny_config.data.tfrecord_dir)["patterns"]["val"]
    dataset = make_dataset(pattern, 128, tiny_config.data.history_length, shuffle=False)
    metrics = model.evaluate(dataset, return_dict=True, verbose=0)

    hits10 = hits50 = total = 0
    catalog = tiny_world.catalog
    items = {k: catalog[k].to_numpy() for k in ("item_id", "title", "category", "brand")}
    items["price"] = catalog["price"].to_numpy(np.float32)
    item_emb = tower_fn(model.candidate_tower)(items)
    for batch in dataset:
        query = tower_fn(model.query_tower)({k: batch[k].numpy() for k in
                                             ("user_id", "history", "query", "device", "hour")})
        scores = query @ item_emb.T
        order = np.argsort(-scores, axis=1)
        ids = items["item_id"][order]
        truth = batch["item_id"].numpy().astype(str)
        weight = batch["weight"].numpy()  # TFRS weights metrics like the loss
        hits10 += sum(w * (t in row[:10]) for t, row, w in zip(truth, ids, weight))
        hits50 += sum(w * (t in row[:50]) for t, row, w in zip(truth, ids, weight))
        total += weight.sum()
    assert metrics["factorized_top_k/top_10_categorical_accuracy"] == pytest.approx(
        hits10 / total, abs=0.01)
    assert metrics["factorized_top_k/top_50_categorical_accuracy"] == pytest.approx(
        hits50 / total, abs=0.01)


def _strip(x: np.ndarray) -> list:
    """Rows of a -1-padded [B, G] array without their padding."""
    return [list(row[row >= 0]) for row in x]


def test_validation_loss_is_one_whole_pass_every_epoch(trained_run, tiny_config, tiny_world):
    """The trainer keeps one validation iterator over a repeated dataset (a new one per
    epoch re-instantiates the preprocessing); every epoch must still evaluate exactly
    the validation set once: the kept epoch's val_loss equals a fresh evaluation."""
    from tfrec.training.trainer import evaluate_keras_metrics

    history = trained_run.history
    assert len(history["val_loss"]) >= 2, "needs several epochs to test the kept iterator"
    monitor = "val_" + tiny_config.train.early_stopping_metric
    kept = int(np.argmax(history[monitor]))
    fresh = evaluate_keras_metrics(
        trained_run.model, load_meta(tiny_config.data.tfrecord_dir)["patterns"]["val"],
        tiny_world.catalog, tiny_config.train.batch_size, tiny_config.data.history_length)
    assert fresh["loss"] == pytest.approx(history["val_loss"][kept], rel=1e-5)


def test_calls_of_several_steps_train_on_every_batch_of_every_epoch(tiny_config,
                                                                   tmp_path):
    """With `train.steps_per_execution` > 1 the trainer declares the epoch's batches, so
    the last call of each epoch runs what is left and every epoch trains on all of them
    (Keras refuses several steps per call over a dataset of unknown length). The batches
    carry uniform catalog draws (`model.catalog_negatives`): zipped with an endless
    stream, the epoch keeps its length."""
    cfg = copy.deepcopy(tiny_config)
    cfg.train.steps_per_execution, cfg.train.epochs = 16, 2
    cfg.model.catalog_negatives = 32
    cfg.train.early_stopping_patience, cfg.train.histogram_freq = 5, 0
    cfg.train.checkpoint_dir, cfg.train.log_dir = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    cfg.train.run_name = "calls16"
    run = train_retrieval(cfg)
    assert int(run.model._steps_per_execution.numpy()) == 16
    examples = int(load_meta(cfg.data.tfrecord_dir)["counts"]["train"])
    per_epoch = examples // cfg.train.batch_size  # drop_remainder: >= 2 batches
    assert examples >= 2 * cfg.train.batch_size
    assert per_epoch % 16 != 0  # a short last call
    assert int(run.model.optimizer.iterations.numpy()) == 2 * per_epoch


def test_steps_per_execution_errors(tiny_config):
    from tfrec.training.trainer import steps_per_execution

    cfg = copy.deepcopy(tiny_config)
    assert tiny_config.train.steps_per_execution == 1  # the default: short runs trace less
    cfg.train.steps_per_execution = 16
    assert steps_per_execution(cfg, single_replica=True) == 16
    assert steps_per_execution(cfg, single_replica=False) == 1  # several replicas: one step a call
    cfg.train.profile_steps = (2, 3)  # the profiler counts calls: trace the steps asked for
    assert steps_per_execution(cfg, single_replica=True) == 1
    for bad in (0, -3, 2.5, True):
        cfg.train.steps_per_execution = bad
        with pytest.raises(ValueError, match="train.steps_per_execution must be an integer"):
            steps_per_execution(cfg, single_replica=True)


def test_early_stopping_patience_below_one_is_refused(tiny_config):
    from tfrec.training.trainer import early_stopping_patience

    cfg = copy.deepcopy(tiny_config)
    assert early_stopping_patience(cfg) == 2
    for bad in (0, -1, 1.5, True):
        cfg.train.early_stopping_patience = bad
        with pytest.raises(ValueError, match=r"train.early_stopping_patience must be an "
                                             r"integer >= 1 .*got " + re.escape(repr(bad))):
            early_stopping_patience(cfg)
    cfg.train.early_stopping_patience = 0
    cfg.train.run_name = "patience_zero"
    with pytest.raises(ValueError, match="train.early_stopping_patience"):
        train_retrieval(cfg)
    # Refused before any data or run directory is touched.
    assert not os.path.exists(os.path.join(cfg.train.checkpoint_dir, "patience_zero"))


def test_preprocessed_input_cache_reshuffles_and_matches_uncached(trained_run, tiny_config):
    """`make_dataset(cache=True, preprocess=...)` keeps integer examples after the first
    epoch; later epochs are reshuffled and re-padded, with the same examples and values
    as preprocessing every epoch."""
    from tfrec.data.tfrecord import make_dataset

    model = trained_run.model
    pattern = load_meta(tiny_config.data.tfrecord_dir)["patterns"]["train"]
    history = tiny_config.data.history_length

    def epoch(ds):
        batches = list(ds)
        keys = np.concatenate([b["item_key"].numpy() for b in batches])
        users = np.concatenate([b["query_inputs"]["user"].numpy() for b in batches])
        grams = sum((_strip(b["candidate_inputs"]["title"]["grams"].numpy())
                     for b in batches), [])
        return keys, users, grams, batches

    plain = epoch(make_dataset(pattern, 64, history, shuffle=False, deterministic=True,
                               preprocess=model.preprocess))
    cached_ds = make_dataset(pattern, 64, history, shuffle=False, deterministic=True,
                             preprocess=model.preprocess, cache=True)
    first, second = epoch(cached_ds), epoch(cached_ds)
    for got in (first, second):
        np.testing.assert_array_equal(got[0], plain[0])
        np.testing.assert_array_equal(got[1], plain[1])
        assert got[2] == plain[2]
    # Padding is -1 and only as wide as the batch needs.
    grams = first[3][0]["candidate_inputs"]["title"]["grams"].numpy()
    assert (grams >= 0).any(axis=0)[-1], "a column of padding only"

    shuffled = make_dataset(pattern, 64, history, shuffle=True, seed=3,
                            preprocess=model.preprocess, cache=True)
    a, b = epoch(shuffled), epoch(shuffled)
    assert not np.array_equal(a[0], b[0]), "examples must be reshuffled every epoch"
    assert sorted(a[0].tolist()) == sorted(b[0].tolist()) == sorted(plain[0].tolist())


def test_ids_only_configuration(tiny_config, tiny_world, trained_run):
    """`model.query_features` / `candidate_features` pick the inputs each tower reads; the
    signatures keep every input, so serving code does not change."""
    from tfrec.models.retrieval import TwoTowerModel

    config = copy.deepcopy(trained_run.model.config)
    config.query_features, config.candidate_features = ("user_id",), ("item_id",)
    config.hidden_units = ()
    model = TwoTowerModel(trained_run.model.vocab, config)
    assert [k for k, _, _ in model.query_tower.parts] == ["user"]
    assert [k for k, _, _ in model.candidate_tower.parts] == ["item"]
    names = {v.name for v in model.trainable_variables}
    assert not any("text" in n or "history" in n or "price" in n for n in names), names
    catalog = tiny_world.catalog.head(5)
    items = {k: catalog[k].to_numpy() for k in ("item_id", "title", "category", "brand")}
    items["price"] = catalog["price"].to_numpy(np.float32)
    emb = tower_fn(model.candidate_tower)(items)
    items["title"] = np.asarray(["无线耳机 café"] * 5, dtype=object)
    np.testing.assert_array_equal(tower_fn(model.candidate_tower)(items), emb)
    pre = next(iter(tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in items.items()})
                    .map(model.candidate_tower.preprocess)))
    assert set(pre) == {"item"}  # nothing else is preprocessed in tf.data either

    config.query_features = ("user_id", "mood")
    with pytest.raises(ValueError, match=r"model.query_features: unknown feature\(s\) \['mood'\]"):
        TwoTowerModel(trained_run.model.vocab, config)


NO_PROJECTION_PROCESS = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  (TF Text ops, as TF Serving links them)

m = tf.saved_model.load(sys.argv[1])
users, items = json.loads(sys.argv[2]), json.loads(sys.argv[3])
n = len(users)
q = m.signatures["query_embedding"](
    user_id=tf.constant(users), history=tf.constant([[""]] * n), query=tf.constant([""] * n),
    device=tf.constant([""] * n), hour=tf.constant([0] * n, tf.int64))["embedding"]
c = m.signatures["candidate_embedding"](
    item_id=tf.constant(items), title=tf.constant(["无线耳机 café"] * len(items)),
    category=tf.constant([""] * len(items)), brand=tf.constant([""] * len(items)),
    price=tf.constant([0.0] * len(items)))["embedding"]
print("RESULT" + json.dumps({"query": q.numpy().tolist(), "candidate": c.numpy().tolist()}))
"""


def test_towers_without_projection_are_their_trained_id_embeddings(tiny_config, tiny_world,
                                                                    trained_run, tmp_path):
    """`model.projection=false`: each tower's vector is its (normalised) id embedding, with
    no output Dense; it trains, and the export serves the same vectors in a fresh process."""
    import json
    import subprocess
    import sys

    from tfrec.config import ExportConfig
    from tfrec.data.tfrecord import make_dataset
    from tfrec.export.exporter import export_retrieval
    from tfrec.training.trainer import build_model

    cfg = copy.deepcopy(tiny_config)
    m = cfg.model
    m.query_features, m.candidate_features = ("user_id",), ("item_id",)
    m.hidden_units, m.projection, m.id_dropout, m.catalog_negatives = (), False, 0.0, 0
    m.id_embedding_dim = m.embedding_dim
    cfg.train.learning_rate = 0.01
    model = build_model(trained_run.model.vocab, cfg)
    model.build_from_features()
    assert model.query_tower.mlp is None and model.candidate_tower.mlp is None
    assert not any("mlp" in v.name for v in model.trainable_variables)
    tables = [model.query_tower.user.embedding.embeddings,
              model.candidate_tower.item.embedding.embeddings]
    before = [t.numpy().copy() for t in tables]
    pattern = load_meta(cfg.data.tfrecord_dir)["patterns"]["train"]
    ds = make_dataset(pattern, 64, cfg.data.history_length, shuffle=False,
                      features=model.features, preprocess=model.preprocess).take(8)
    fit = model.fit(ds, epochs=2, verbose=0).history["loss"]
    assert fit[1] < fit[0], fit
    assert all(np.abs(t.numpy() - b).max() > 0 for t, b in zip(tables, before))

    catalog = tiny_world.catalog
    users = [str(tiny_world.users["user_id"].iloc[0]), "用户-é-never-seen"]
    items = [str(catalog["item_id"].iloc[0]), str(catalog["item_id"].iloc[5])]
    layer = model.query_tower.user
    want_q = tf.math.l2_normalize(tf.gather(tables[0], layer.preprocess(tf.constant(users))), -1)
    query = {"user_id": np.asarray(users, dtype=object),
             "history": np.asarray([[""]] * 2, dtype=object),
             "query": np.asarray(["", ""], dtype=object),
             "device": np.asarray(["", ""], dtype=object), "hour": np.zeros(2, np.int64)}
    got_q = tower_fn(model.query_tower)(query)
    np.testing.assert_allclose(got_q, want_q.numpy(), atol=1e-6)
    rows = model.candidate_tower.item.preprocess(tf.constant(items))
    want_c = tf.math.l2_normalize(tf.gather(tables[1], rows), -1).numpy()

    export = ExportConfig(base_dir=str(tmp_path), model_name="ids", index="exact")
    path = export_retrieval(trained_run.run_dir, catalog, export, model=model)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", NO_PROJECTION_PROCESS, path,
                           json.dumps(users), json.dumps(items)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(out["query"], got_q, atol=1e-5)
    np.testing.assert_allclose(out["candidate"], want_c, atol=1e-5)


def test_towers_without_projection_errors(tiny_config, trained_run):
    from tfrec.config import FeaturesConfig
    from tfrec.data.feature_spec import FeatureSpec
    from tfrec.models.retrieval import TwoTowerModel

    vocab = trained_run.model.vocab
    config = copy.deepcopy(tiny_config.model)
    config.projection = False
    config.hidden_units = (32,)
    with pytest.raises(ValueError, match=r"model.projection=false .* no hidden layers; set "
                                         r"model.hidden_units=\[\] \(got \[32\]\)"):
        TwoTowerModel(vocab, config)
    config.hidden_units = ()
    with pytest.raises(ValueError, match=r"set model.query_features=\[user_id\] \(got "
                                         r"\['user_id', 'history', 'query'"):
        TwoTowerModel(vocab, config)
    config.query_features, config.candidate_features = ("user_id",), ("item_id",)
    config.id_embedding_dim, config.embedding_dim = 16, 32
    with pytest.raises(ValueError, match=r"model.id_embedding_dim \(16\) must equal "
                                         r"model.embedding_dim \(32\)"):
        TwoTowerModel(vocab, config)
    config.id_embedding_dim = 32
    TwoTowerModel(vocab, config)  # ids only, equal widths: fine
    # A declared catalog column would widen the candidate tower.
    spec = FeatureSpec.from_config(FeaturesConfig(item_numeric=("rating",)))
    with pytest.raises(ValueError, match=r"the candidate tower would also read "
                                         r"\['declared column rating'\]"):
        TwoTowerModel(vocab, config, features=spec)
