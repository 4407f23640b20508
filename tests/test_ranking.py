"""Ranking lists and the multi-task DCN ranker on the tiny synthetic world."""

import os

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import RankingConfig
from tfrec.data.examples import positive_interactions
from tfrec.data.lists import build_ranking_lists, lists_to_arrays
from tfrec.data.split import time_split
from tfrec.metrics.ranking import auc, ndcg_of_scored_lists
from tfrec.features.vocab import build_vocabularies
from tfrec.features.catalog import CatalogLookup, catalog_statistics
from tfrec.models.ranking import RankingModel


@pytest.fixture(scope="module")
def ranking_data(tiny_world):
    events, catalog = tiny_world.events, tiny_world.catalog
    split = time_split(events, 0.1, 0.1)
    positives = positive_interactions(events)
    train_pos = positives[positives["ts"] < split.t_val]
    vocab = build_vocabularies(train_pos, catalog, 20000, 20)
    popularity = train_pos.groupby("item_id").size()
    lists = build_ranking_lists(events, history_length=20, list_size=10)
    train = lists_to_arrays(lists[lists["ts"] < split.t_val], catalog, 10, 20, popularity)
    test = lists_to_arrays(lists[lists["ts"] >= split.t_test], catalog, 10, 20, popularity)
    stats = catalog_statistics(catalog, positives, split.t_val)
    return vocab, lists, train, test, CatalogLookup(catalog, stats)


def test_lists_have_labels_of_their_session_and_no_look_ahead(ranking_data, tiny_world):
    _, lists, _, _, _ = ranking_data
    events = tiny_world.events
    clicks = set(zip(events.loc[events["event_type"] == "click", "session_id"],
                     events.loc[events["event_type"] == "click", "item_id"]))
    positive_ts = positive_interactions(events).groupby(["user_id", "item_id"])["ts"].min()
    for row in lists.sample(200, random_state=0).itertuples():
        assert row.positions == sorted(row.positions) and len(row.items) <= 10
        for item, click in zip(row.items, row.click):
            assert click == float((row.session_id, item) in clicks)
        for item in row.history:  # every history item was interacted with before the session
            assert positive_ts[(row.user_id, item)] < row.ts


@pytest.mark.parametrize("loss", ["softmax", "pointwise"])
def test_ranker_learns_to_order_shown_items(ranking_data, loss):
    vocab, _, train, test, catalog = ranking_data
    config = RankingConfig(loss=loss, epochs=3, learning_rate=0.002, use_retrieval_score=False)
    model = RankingModel(vocab, config, catalog)
    model.adapt_numeric(train)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    data = tf.data.Dataset.from_tensor_slices(train).shuffle(5000, seed=1).batch(64)
    history = model.fit(data, epochs=config.epochs, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    logits = model.predict(tf.data.Dataset.from_tensor_slices(test).batch(256), verbose=0)
    padded = test["position"] < 0
    ranker = np.where(padded, -1e9, np.asarray(model.score(logits)))
    popularity = np.where(padded, -1e9, test["popularity"])
    assert (ndcg_of_scored_lists(ranker, test["click"])
            > ndcg_of_scored_lists(popularity, test["click"]) + 0.03)
    valid = ~padded
    assert auc(test["click"][valid], logits["click"][valid]) > 0.6
    assert auc(test["purchase"][valid], logits["purchase"][valid]) > 0.6


def test_position_only_shapes_training_logits(ranking_data):
    vocab, _, train, _, catalog = ranking_data
    model = RankingModel(vocab, RankingConfig(id_dropout=0.0), catalog)  # no other randomness
    batch = {k: v[:4] for k, v in train.items()}
    shifted = dict(batch, position=np.zeros_like(batch["position"]))
    serve_a = model(batch, training=False)["click"].numpy()
    serve_b = model(shifted, training=False)["click"].numpy()
    np.testing.assert_allclose(serve_a, serve_b)  # serving ignores position
    model(batch, training=True)  # builds the position tower (used in training only)
    model.position_bias.embeddings.assign(tf.random.normal(model.position_bias.embeddings.shape))
    train_a = model(batch, training=True)["click"].numpy()
    train_b = model(shifted, training=True)["click"].numpy()
    assert not np.allclose(train_a, train_b)


def test_bad_list_size_is_rejected(tiny_world):
    with pytest.raises(ValueError, match="list_size must be >= 1"):
        build_ranking_lists(tiny_world.events, list_size=0)


def test_ranker_run_logs_metrics_and_reloads(trained_ranker, trained_run, tiny_config):
    from tfrec.training.ranking_trainer import load_ranker

    result = trained_ranker
    for task in ("click", "purchase"):
        for name in ("ndcg_at_10", "mrr", "auc", "gauc"):
            value = result.val_metrics[f"{task}_{name}"]
            assert 0.0 <= value <= 1.0, (task, name, value)
    assert result.history["val_click_ndcg_at_10"]  # per epoch, in the Keras logs
    events = tf.compat.v1.train.summary_iterator  # real TensorBoard event files
    files = [os.path.join(d, f) for d, _, fs in os.walk(result.tensorboard_dir) for f in fs
             if f.startswith("events.out.tfevents")]
    tags = {v.tag for path in files for e in events(path) for v in e.summary.value}
    # Keras writes val_* logs to the validation writer without the prefix.
    assert {"epoch_loss", "epoch_click_ndcg_at_10", "epoch_purchase_gauc",
            "epoch_score_ndcg_at_10"} <= tags, tags

    reloaded, _ = load_ranker(trained_run.run_dir)
    # The numeric features' scaling was set from the training lists and saved with them.
    assert not np.allclose(result.model.numeric_std.numpy(), 1.0)
    np.testing.assert_allclose(reloaded.numeric_mean.numpy(), result.model.numeric_mean.numpy())
    batch = {"user_id": tf.constant(["U0", "nobody"]),
             "history": tf.constant([["I000001", ""], ["", ""]]),
             "device": tf.constant(["mobile", "desktop"]), "hour": tf.constant([3, 20], tf.int64),
             "query": tf.constant(["", "running shoes"]),
             "item_id": tf.constant([["I000002", "I000003", ""], ["I000004", "unknown", ""]]),
             "retrieval_score": tf.constant([[0.5, 0.1, 0.0], [0.2, 0.3, 0.0]])}
    np.testing.assert_allclose(result.model.score(result.model(batch)).numpy(),
                               reloaded.score(reloaded(batch)).numpy(), rtol=1e-5, atol=1e-5)


def test_reranked_row_reorders_the_retrieval_candidates(trained_ranker, trained_run, tiny_config, tiny_world):
    """The re-ranked row is evaluated with the same code and candidates as retrieval."""
    from tfrec.data.prepare import load_meta
    from tfrec.evaluation.report import evaluate_period
    from tfrec.models.embedding import tower_fn

    split = load_meta(tiny_config.data.tfrecord_dir)["split"]
    model = trained_run.model
    rows = evaluate_period(tiny_world.events, tiny_world.catalog, int(split["t_test"]),
                           int(split["t_end"]), 20, tower_fn(model.query_tower),
                           tower_fn(model.candidate_tower), ks=(10, 100),
                           ranker=trained_ranker.model, candidates=100)
    retrieval, ranked = rows["two_tower"], rows["two_tower+ranker"]
    # Same top-100 candidates re-ordered: recall@100 is unchanged, the top-10 differs.
    assert ranked["recall@100"] == pytest.approx(retrieval["recall@100"])
    for name, row in rows.items():
        if name in ("cold items", "warm items"):  # the ranked lists on new / known items
            assert row["users"] > 0 and 0.0 <= row["recall@100"] <= 1.0
            continue
        assert 0.0 <= row["purchase_rate@10"] <= 0.1
    assert ranked["ndcg@10"] > 0.9 * retrieval["ndcg@10"]  # gain: tests/test_rerank_gain.py


def test_mixed_precision_ranker_trains_and_reloads_in_float32(ranking_data, tiny_world,
                                                              tmp_path):
    """The GPU path on CPU: dense layers in float16, logits float32, loss scaling, one real
    training step; the float32 weights load into a float32 ranker with the same scores."""
    from tfrec.config import Config
    from tfrec.training.ranking_trainer import build_ranker

    vocab, _, train, _, catalog = ranking_data
    stats = catalog_statistics(tiny_world.catalog, positive_interactions(tiny_world.events),
                               int(tiny_world.events["ts"].median()))
    cfg = Config()
    mixed = build_ranker(vocab, cfg, tiny_world.catalog, stats, precision="mixed_float16")
    batch = {k: v[:32] for k, v in train.items() if k != "popularity"}
    mixed.adapt_numeric(batch)
    logits = mixed({k: tf.constant(v) for k, v in batch.items()})
    assert all(v.dtype == tf.float32 for v in logits.values())
    assert mixed.deep.layers[0].compute_dtype == "float16"
    assert mixed.crosses[0].compute_dtype == "float16"
    assert isinstance(mixed.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    history = mixed.fit(tf.data.Dataset.from_tensor_slices(batch).batch(16), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert tf.keras.mixed_precision.global_policy().name == "float32"

    plain = build_ranker(vocab, cfg, tiny_world.catalog, stats)
    inputs = {k: tf.constant(v) for k, v in batch.items() if k in
              ("user_id", "history", "device", "hour", "query", "item_id")}
    plain(inputs)
    mixed.save_weights(str(tmp_path / "ranker"))  # the checkpoint load_ranker reads
    plain.load_weights(str(tmp_path / "ranker")).expect_partial()
    np.testing.assert_allclose(plain.score(plain(inputs)).numpy(),
                               mixed.score(mixed(inputs)).numpy(), rtol=0.02, atol=0.05)


def test_lazy_adam_ranker_leaves_item_rows_no_batch_touched(ranking_data, tiny_world):
    """ranking.optimizer=lazy_adam: the step updates the item rows of its lists only, so
    its cost follows the batch, not the catalog (Adam decays every row every step)."""
    from tfrec.config import Config
    from tfrec.training.optimizers import LazyAdam
    from tfrec.training.ranking_trainer import build_ranker

    vocab, _, train, _, _ = ranking_data
    stats = catalog_statistics(tiny_world.catalog, positive_interactions(tiny_world.events),
                               int(tiny_world.events["ts"].median()))
    moved, kinds = {}, {}
    lists = {k: v[:32] for k, v in train.items() if k != "popularity"}
    first = {k: v[:16] for k, v in lists.items()}
    second = {k: v[16:] for k, v in lists.items()}
    for name in ("lazy_adam", "adam"):
        cfg = Config()
        cfg.ranking.optimizer = name
        tf.keras.utils.set_random_seed(0)
        model = build_ranker(vocab, cfg, tiny_world.catalog, stats)
        model.adapt_numeric(lists)
        # Two steps on the first lists (here the first leaves the item table unchanged),
        # then one on the second.
        model.fit(tf.data.Dataset.from_tensor_slices(first).batch(16), epochs=2, verbose=0)
        table = model.item.trainable_weights[0]
        before = table.numpy().copy()
        model.fit(tf.data.Dataset.from_tensor_slices(second).batch(16), verbose=0)
        moved[name] = int(np.any(table.numpy() != before, axis=1).sum())
        kinds[name] = type(model.optimizer)
    assert kinds["lazy_adam"] is LazyAdam
    # Step 2 moves the second batch's rows only; Adam also moves the first batch's
    # rows with their momentum (a whole-table update).
    assert 0 < moved["lazy_adam"] < moved["adam"], moved
    cfg.ranking.optimizer = "adamw"
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        build_ranker(vocab, cfg, tiny_world.catalog, stats)


def test_bad_ranker_configs_are_clear_errors(ranking_data):
    vocab, _, _, _, catalog = ranking_data
    with pytest.raises(ValueError, match="text_mode must be one of"):
        RankingModel(vocab, RankingConfig(text_mode="tfidf"), catalog)
    with pytest.raises(ValueError, match="every task weight is 0"):
        RankingModel(vocab, RankingConfig(click_weight=0.0, purchase_weight=0.0), catalog)
    with pytest.raises(ValueError, match="needs a TextMatch"):
        RankingModel(vocab, RankingConfig(text_mode="fast"), catalog)
    import pandas as pd
    with pytest.raises(ValueError, match="missing column"):
        CatalogLookup(pd.DataFrame({"item_id": ["a"]}))


def test_ranker_trains_every_epoch_unless_given_a_patience(trained_run, tiny_config, tmp_path):
    """The ranker's first epochs barely move it, so by default no epoch count stops it
    early; `ranking.patience` stops it after that many epochs without a better score."""
    import shutil
    from copy import deepcopy

    from tfrec.training.ranking_trainer import train_ranker

    shutil.copytree(trained_run.run_dir, tmp_path / "copy",
                    ignore=shutil.ignore_patterns("ranker"))
    cfg = deepcopy(tiny_config)
    cfg.train.checkpoint_dir = str(tmp_path)
    cfg.ranking.epochs, cfg.ranking.learning_rate = 4, 0.0  # the score never improves
    every = train_ranker(cfg, run="copy", retrieval=trained_run.model, max_users=40)
    assert len(every.history["loss"]) == 4
    cfg.ranking.patience = 1
    stopped = train_ranker(cfg, run="copy", retrieval=trained_run.model, max_users=40)
    assert len(stopped.history["loss"]) == 2
    cfg.ranking.patience = 0
    with pytest.raises(ValueError, match="ranking.patience must be an integer >= 1 or null"):
        train_ranker(cfg, run="copy", retrieval=trained_run.model)
