"""Sequence encoders of the query tower: causal, exportable, and better than pooling
where the order of the history matters."""

import copy

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.data.examples import user_examples
from tfrec.data.io import write_table
from tfrec.evaluation.report import evaluate_period
from tfrec.models.embedding import tower_fn
from tfrec.models.retrieval import TwoTowerModel
from tfrec.models.sequence import causal_mask

from tests.helpers import fresh_signature, small_run_config


def _sequence_model(trained_run, kind: str, **changes) -> TwoTowerModel:
    config = copy.deepcopy(trained_run.model.config)
    config.history_encoder = kind
    for name, value in changes.items():
        setattr(config, name, value)
    return TwoTowerModel(trained_run.model.vocab, config)


def test_causal_mask_sees_only_older_valid_positions():
    valid = tf.constant([[True, True, False]])
    mask = causal_mask(valid).numpy()[0]
    np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_positions_never_read_more_recent_items(trained_run, tiny_world, kind):
    """Position i's state depends on items i.. (older) only: replacing the most recent
    item leaves every older position unchanged, and padding changes nothing."""
    model = _sequence_model(trained_run, kind)
    encoder = model.query_tower.history
    items = tiny_world.catalog["item_id"].to_numpy()
    history = tf.constant([list(items[:5]) + [""] * 3])
    states = encoder.states(encoder.preprocess(history)).numpy()
    changed = tf.constant([[items[9]] + list(items[1:5]) + [""] * 3])
    after = encoder.states(encoder.preprocess(changed)).numpy()
    assert np.abs(states[0, 0] - after[0, 0]).max() > 1e-4
    np.testing.assert_allclose(states[0, 1:5], after[0, 1:5], atol=1e-5)
    shorter = encoder(tf.constant([list(items[:5])]), training=False).numpy()
    np.testing.assert_allclose(encoder(history, training=False).numpy(), shorter, atol=1e-5)
    empty = encoder(tf.zeros([2, 0], tf.string), training=False).numpy()
    assert empty.shape == (2, model.config.history_dim) and np.isfinite(empty).all()


def test_next_item_loss_reads_each_state_against_the_item_after_it(trained_run, tiny_world):
    model = _sequence_model(trained_run, "transformer", history_next_item_weight=1.0)
    encoder = model.query_tower.history
    items = tiny_world.catalog["item_id"].to_numpy()
    idx = encoder.preprocess(tf.constant([list(items[:6]), list(items[6:9]) + [""] * 3]))
    loss = float(encoder.next_item_loss(idx, training=False))
    assert np.isfinite(loss) and loss > 0
    # 5 + 2 (state, next item) pairs over 7 distinct items: an untrained head is near
    # uniform, log(7).
    assert abs(loss - np.log(7)) < 0.5, loss
    none = encoder.preprocess(tf.constant([[items[0], ""], ["", ""]]))
    assert float(encoder.next_item_loss(none, training=False)) == 0.0  # no pairs
    with pytest.raises(ValueError, match="history_next_item_weight"):
        _sequence_model(trained_run, "gru").query_tower.history.next_item_loss(idx)


def test_events_after_the_request_time_cannot_change_the_query(trained_run, tiny_world):
    """The query embedding of an example reads the history before its time: a later
    event of the same user changes nothing."""
    events = tiny_world.events
    model = _sequence_model(trained_run, "transformer")
    before = user_examples(events, history_length=20)
    row = before[before["history"].map(len) >= 3].iloc[0]
    later = pd.DataFrame([{**events.iloc[0].to_dict(), "ts": int(row["ts"]) + 1,
                           "user_id": row["user_id"], "session_id": "later",
                           "event_type": "purchase",
                           "item_id": tiny_world.catalog["item_id"].iloc[-1]}])
    after = user_examples(pd.concat([events, later], ignore_index=True), history_length=20)
    match = after[(after["user_id"] == row["user_id"]) & (after["ts"] == row["ts"])
                  & (after["item_id"] == row["item_id"])].iloc[0]
    embed = tower_fn(model.query_tower)

    def query(r):
        return embed({"user_id": np.array([r["user_id"]], dtype=object),
                      "history": np.array([list(r["history"])], dtype=object),
                      "query": np.array([r["query"]], dtype=object),
                      "device": np.array([r["device"]], dtype=object),
                      "hour": np.array([r["hour"]], np.int64)})

    assert list(match["history"]) == list(row["history"])
    np.testing.assert_allclose(query(match), query(row), atol=1e-6)


@pytest.fixture(scope="module")
def transformer_run(tiny_config, tmp_path_factory):
    from tfrec.training.trainer import train_retrieval

    cfg = copy.deepcopy(tiny_config)
    cfg.model.history_encoder = "transformer"
    cfg.train.epochs = 2
    cfg.train.run_name = "tiny-transformer"
    cfg.export.base_dir = str(tmp_path_factory.mktemp("seq_models"))
    return cfg, train_retrieval(cfg)


def test_transformer_export_reloads_with_the_same_query_embeddings(transformer_run, tiny_world):
    from tfrec.export.exporter import export_retrieval

    cfg, run = transformer_run
    path = export_retrieval(run.run_dir, tiny_world.catalog, cfg.export)
    items = tiny_world.catalog["item_id"].tolist()
    request = {"user_id": ["U000001", "unknown"],
               "history": [items[:4] + [""], ["", "", "", "", ""]],
               "query": ["", "无线耳机 café"], "device": ["mobile", ""], "hour": [9, 23]}
    served = fresh_signature(path, "query_embedding", request)["embedding"]
    local = tower_fn(run.model.query_tower)(
        {k: np.array(v, dtype=np.int64 if k == "hour" else object) for k, v in request.items()})
    np.testing.assert_allclose(served, local, atol=1e-5)


def _stride_walks(catalog: pd.DataFrame, users: pd.DataFrame, steps: int = 40,
                  seed: int = 0) -> pd.DataFrame:
    """Click events of shoppers who walk the catalog with a stride of their own (-3..3,
    never 0): the next item is the last one plus the stride, which the order of the
    last two items tells and a recency-weighted mean only blurs."""
    rng = np.random.default_rng(seed)
    items = catalog["item_id"].to_numpy()
    rows = []
    for user in users["user_id"]:
        stride = int(rng.choice([-3, -2, -1, 1, 2, 3]))
        start = int(rng.integers(len(items)))
        times = np.sort(rng.integers(0, 40 * 86400, steps))
        for t, ts in enumerate(times):
            rows.append((1_704_067_200 + int(ts), user, f"{user}-{t}", "click",
                         items[(start + stride * t) % len(items)], "", "desktop", 0))
    return pd.DataFrame(rows, columns=["ts", "user_id", "session_id", "event_type", "item_id",
                                       "query", "device", "position"])


def test_sequence_models_beat_pooling_on_a_planted_sequential_pattern(tiny_world,
                                                                     tmp_path_factory):
    from tfrec.data.prepare import load_meta
    from tfrec.training.trainer import train_retrieval

    root = tmp_path_factory.mktemp("stride_world")
    data = root / "data"
    data.mkdir()
    events = _stride_walks(tiny_world.catalog, tiny_world.users)
    for name, table in (("catalog", tiny_world.catalog), ("users", tiny_world.users),
                        ("events", events)):
        write_table(table, str(data / f"{name}.parquet"))
    hits = {}
    # The transformer learns the pattern within these 4 epochs with the next-item loss
    # (without it: below pooling at 4 epochs, above it at 10).
    for kind, weight in (("pooled", 0.0), ("gru", 0.0), ("transformer", 1.0)):
        cfg = small_run_config(str(data), root / "work", kind)
        cfg.model.history_encoder = kind
        cfg.model.history_next_item_weight = weight
        run = train_retrieval(cfg)
        split = load_meta(cfg.data.tfrecord_dir)["split"]
        rows = evaluate_period(events, tiny_world.catalog, split["t_test"], split["t_end"],
                               cfg.data.history_length, tower_fn(run.model.query_tower),
                               tower_fn(run.model.candidate_tower), data_dir=None)
        assert rows["two_tower"]["users"] > 200
        hits[kind] = rows["two_tower"]["hit_rate@10"]
    # Users whose top-10 holds one of their next items. Run to run (same seed, threads
    # reorder float sums) pooling scored 0.74-0.80 and the transformer 0.95-0.96 in 4
    # runs; recall@10 (every later item of the walk counts) had margins of 0.03-0.15 and
    # failed a 0.04 margin once in CI.
    assert hits["gru"] > hits["pooled"] + 0.08, hits
    assert hits["transformer"] > hits["pooled"] + 0.08, hits
