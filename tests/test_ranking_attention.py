"""DIN-style target attention in the ranker: training, export, masking and a planted task."""

import os
import shutil
from copy import deepcopy

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import RankingConfig
from tfrec.features.catalog import CatalogLookup
from tfrec.features.vocab import build_vocabularies
from tfrec.models.ranking import CANDIDATE_INPUTS, RankingModel
from tfrec.models.target_attention import TargetAttention


@pytest.fixture(scope="module")
def attention_run(trained_run, tiny_config, tmp_path_factory):
    """A ranker with target attention on a copy of the shared retrieval run (the shared
    run's own ranker directory stays the one other tests trained)."""
    from tfrec.training.ranking_trainer import train_ranker

    work = tmp_path_factory.mktemp("attention")
    cfg = deepcopy(tiny_config)
    cfg.train.checkpoint_dir = str(work / "checkpoints")
    cfg.train.log_dir = str(work / "logs")
    run_dir = os.path.join(cfg.train.checkpoint_dir, trained_run.run_name)
    shutil.copytree(trained_run.run_dir, run_dir,
                    ignore=shutil.ignore_patterns("ranker", "backup"))
    cfg.override(["ranking.target_attention=true", "ranking.epochs=2",
                  "ranking.learning_rate=0.002"])
    result = train_ranker(cfg, run=trained_run.run_name, retrieval=trained_run.model)
    return {"result": result, "run_dir": run_dir, "work": work}


def _request(tiny_world, histories, candidates):
    n = len(histories)
    return {"user_id": tf.constant(["U0"] * n), "history": tf.constant(histories),
            "device": tf.constant(["mobile"] * n), "hour": tf.constant([20] * n, tf.int64),
            "query": tf.constant([""] * n), "item_id": tf.constant(candidates),
            "retrieval_score": tf.constant(np.linspace(0.1, 0.9, len(candidates[0]),
                                                       dtype=np.float32)[None].repeat(n, 0))}


def test_attention_ranker_trains_exports_and_reloads(attention_run, trained_run, tiny_world):
    from tfrec.config import ExportConfig
    from tfrec.export.exporter import export_ranker
    from tfrec.training.ranking_trainer import load_ranker

    result = attention_run["result"]
    model = result.model
    assert model.target_attention is not None
    assert np.isfinite(result.history["loss"]).all()
    assert result.history["loss"][-1] < result.history["loss"][0]
    ids = tiny_world.catalog["item_id"].tolist()

    # The run directory's config and weights rebuild the same ranker in a new object.
    reloaded, cfg = load_ranker(attention_run["run_dir"])
    assert cfg.ranking.target_attention and reloaded.target_attention is not None
    batch = _request(tiny_world, [[ids[1], ids[2], ""], ["", "", ""]],
                     [[ids[3], ids[4], ids[5], ""], [ids[6], ids[7], "", ""]])
    np.testing.assert_allclose(model.score(model(batch)).numpy(),
                               reloaded.score(reloaded(batch)).numpy(), rtol=1e-5, atol=1e-5)

    # SavedModel: loaded afresh, unknown batch and list sizes, same scores as in memory.
    path = export_ranker(attention_run["run_dir"], tiny_world.catalog,
                         ExportConfig(base_dir=str(attention_run["work"] / "models")),
                         retrieval=trained_run.model, ranker=model)
    served = tf.saved_model.load(path).signatures["serving_default"]
    for histories, candidates in (
            ([[ids[1], ids[2], ids[3]]], [[ids[10], ids[11], ids[12], ids[13], ""]]),
            ([[ids[20], "", ""], [ids[21], ids[22], ""], ["", "", ""]],
             [[ids[30], ids[31]], [ids[32], ""], [ids[33], ids[34]]])):
        request = _request(tiny_world, histories, candidates)
        out = served(query=request["query"], user_id=request["user_id"],
                     history=request["history"], device=request["device"],
                     hour=request["hour"], candidate_ids=request["item_id"])
        valid = out["item_ids"].numpy() != b""
        # The in-memory ranker on the export's order and retrieval scores.
        mine = model.score(model({**request, "item_id": out["item_ids"],
                                  "retrieval_score": tf.where(valid, out["retrieval_scores"],
                                                              0.0)}))
        np.testing.assert_allclose(out["scores"].numpy()[valid], mine.numpy()[valid],
                                   rtol=1e-4, atol=1e-4)


def test_attention_pipeline_exports_with_reasons(attention_run, trained_run, tiny_world):
    """The pipeline SavedModel (retrieval -> ranker -> rules) with leave-one-out reasons,
    whose passes recompute the attention for each shortened history."""
    from tfrec.config import ExportConfig
    from tfrec.export.exporter import export_pipeline

    model, ids = attention_run["result"].model, tiny_world.catalog["item_id"].tolist()
    pipeline = tf.saved_model.load(export_pipeline(
        attention_run["run_dir"], tiny_world.catalog,
        ExportConfig(base_dir=str(attention_run["work"] / "models")),
        retrieval=trained_run.model, ranker=model)).signatures["serving_default"]
    got = pipeline(user_id=tf.constant(["U0", "nobody"]),
                   history=tf.constant([[ids[1], ids[2], ids[3]], ["", "", ""]]),
                   device=tf.constant(["mobile", "desktop"]),
                   hour=tf.constant([9, 21], tf.int64), k=tf.constant([5, 3]),
                   exclude_item_ids=tf.constant([[""], [""]]),
                   purchased_item_ids=tf.constant([[""], [""]]))
    shown = got["item_ids"].numpy() != b""
    assert shown[0].sum() == 5 and shown[1].sum() == 3
    assert (got["reasons"].numpy()[shown] != b"").all()


def test_attention_follows_the_candidates_category_and_ignores_padding(attention_run,
                                                                       tiny_world):
    model = attention_run["result"].model
    catalog = tiny_world.catalog.reset_index(drop=True)
    candidate = catalog.iloc[0]
    same = catalog[(catalog["category"] == candidate["category"])
                   & (catalog["item_id"] != candidate["item_id"])]["item_id"].tolist()
    other = catalog[catalog["category"] != candidate["category"]]["item_id"].tolist()
    assert same and len(other) >= 4
    history = [same[0], other[0], other[1], ""]
    others = [candidate["item_id"], other[2], other[3]]
    batch = _request(tiny_world, [history], [others])
    x = model.scoring_inputs(batch, training=False)
    target = x["target_history"].numpy()  # [L, D]: one summary per candidate
    assert target.shape == (3, 40)
    assert not np.allclose(target[0], target[1])  # unlike the pooled history pieces
    np.testing.assert_allclose(x["history_items"][0], x["history_items"][1])

    # Replacing the history item of the candidate's category changes its summary.
    replaced = model.scoring_inputs(
        _request(tiny_world, [[other[4], other[0], other[1], ""]], [others]), training=False)
    assert np.abs(replaced["target_history"].numpy()[0] - target[0]).max() > 1e-4

    # Padding appended: identical summaries and scores; no history: zero summaries.
    padded = _request(tiny_world, [history + [""] * 6], [others])
    np.testing.assert_allclose(model.scoring_inputs(padded, training=False)["target_history"],
                               target, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.score(model(padded)), model.score(model(batch)),
                               rtol=1e-6, atol=1e-6)
    empty = model.scoring_inputs(_request(tiny_world, [["", ""]], [others]), training=False)
    np.testing.assert_array_equal(empty["target_history"].numpy(), 0.0)


def test_reasons_and_attributions_with_attention(attention_run, trained_run, tiny_world):
    """Leave-one-out reasons recompute the summary per varied history; integrated
    gradients file it under "history"."""
    from tfrec.export.ranking import RankingCore
    from tfrec.export.reasons import Reasons
    from tfrec.models.attribution import integrated_gradients

    model = attention_run["result"].model
    assert "target_history" not in CANDIDATE_INPUTS
    ids = tiny_world.catalog["item_id"].tolist()
    batch = _request(tiny_world, [[ids[1], ids[2], ids[3]]], [[ids[4], ids[5], ids[6]]])
    parts = integrated_gradients(model, batch, steps=64)
    total = sum(parts[g] for g in ("user", "history", "item", "context", "text", "retrieval"))
    np.testing.assert_allclose(total, parts["score"] - parts["baseline"], atol=0.05)

    reasons = Reasons(RankingCore(trained_run.model, model, tiny_world.catalog))
    request = {k: batch[k] for k in ("user_id", "history", "device", "hour", "query")}
    rows = reasons.core.rows(batch["item_id"])
    effects, _ = reasons.history_effects(request, batch["item_id"], rows)
    # Each leave-one-out effect equals a fresh ranker pass over that shorter history.
    full, _ = reasons._scores(request, batch["item_id"], rows)
    for h in range(3):
        shorter = [i for j, i in enumerate(batch["history"].numpy()[0].tolist()) if j != h]
        dropped, _ = reasons._scores({**request, "history": tf.constant([shorter + [b""]])},
                                     batch["item_id"], rows)
        np.testing.assert_allclose(effects.numpy()[0, h], (full - dropped).numpy()[0],
                                   rtol=1e-4, atol=1e-4)


def _planted_world(seed: int = 0, categories: int = 4, brands: int = 4, per_pair: int = 6):
    """Items of every (category, brand) pair; candidates and history items are disjoint."""
    rows = []
    for c in range(categories):
        for b in range(brands):
            for role in ("cand", "hist"):
                for i in range(per_pair):
                    rows.append({"item_id": f"{role}-c{c}-b{b}-{i}", "title": "thing",
                                 "category": f"cat{c}", "brand": f"brand{b}", "price": 10.0,
                                 "description": ""})
    return pd.DataFrame(rows)


def _planted_lists(n: int, rng: np.random.Generator, categories: int = 4, brands: int = 4,
                   per_pair: int = 6):
    """History: two (category, brand) pairs P, Q as [P, Q, Q, P]; candidates: two items of
    each of P, Q and the swapped pairs. Clicked: the candidates whose pair is in the history.

    Every candidate has category share 1/2 and brand share 1/2, and the pooled category
    and brand embeddings are the same whether the history holds (ca, bx), (cb, by) or
    (ca, by), (cb, bx) (up to recency weights 1.729 vs 1.71): only matching category AND
    brand on the same history item tells clicked from not.
    """
    def item(role, c, b):
        return f"{role}-c{c}-b{b}-{rng.integers(per_pair)}"

    out = {k: [] for k in ("user_id", "history", "device", "hour", "query", "item_id",
                           "click", "position")}
    for _ in range(n):
        ca, cb = rng.choice(categories, 2, replace=False)
        bx, by = rng.choice(brands, 2, replace=False)
        p, q = (ca, bx), (cb, by)
        out["history"].append([item("hist", *p), item("hist", *q), item("hist", *q),
                               item("hist", *p)])
        pairs = [p, q, (ca, by), (cb, bx)] * 2
        order = rng.permutation(8)
        out["item_id"].append([item("cand", *pairs[i]) for i in order])
        out["click"].append([float(i % 4 < 2) for i in order])
        out["user_id"].append(f"u{rng.integers(10 ** 6)}")
    out["device"], out["hour"], out["query"] = ["mobile"] * n, [12] * n, [""] * n
    out["position"] = [list(range(8))] * n
    types = {"hour": np.int64, "click": np.float32, "position": np.int64}
    return {k: np.asarray(v, dtype=types.get(k, object)) for k, v in out.items()}


@pytest.fixture(scope="module")
def planted():
    """(train, test, vocab, catalog lookup) of the planted same-item match task."""
    catalog = _planted_world()
    candidates = catalog[catalog["item_id"].str.startswith("cand")]["item_id"].tolist()
    # History items are not in the id vocabulary (the OOV row), so their ids cannot carry
    # the pair: only their category and brand embeddings can.
    vocab = build_vocabularies(pd.DataFrame({"user_id": ["u"] * len(candidates),
                                             "item_id": candidates, "query": ""}),
                               catalog, 1000, 4, items=candidates)
    rng = np.random.default_rng(0)
    return _planted_lists(1500, rng), _planted_lists(400, rng), vocab, CatalogLookup(catalog)


def _pair_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of (clicked, not clicked) pairs of a list ordered right, mean over lists."""
    right = (scores[:, :, None] > scores[:, None, :]) & (labels[:, :, None] > labels[:, None, :])
    pairs = (labels > 0).sum(1) * (labels == 0).sum(1)
    return float(np.mean(right.sum((1, 2)) / pairs))


def _train_planted(planted, attention: bool):
    train, test, vocab, catalog = planted
    tf.keras.utils.set_random_seed(3)
    config = RankingConfig(target_attention=attention, purchase_weight=0.0,
                           use_retrieval_score=False, position_debias=False,
                           learning_rate=0.01, epochs=5)
    model = RankingModel(vocab, config, catalog)
    model.adapt_numeric(train)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    model.fit(tf.data.Dataset.from_tensor_slices(train).shuffle(2000, seed=1).batch(100),
              epochs=config.epochs, verbose=0)
    inputs = {k: tf.constant(v) for k, v in test.items() if k not in ("click", "position")}
    return model, inputs, test["click"]


def test_pooled_history_cannot_learn_the_planted_match(planted):
    """Without target attention the planted task is out of reach (lists at chance), so
    the next test measures the attention, not the shares or the pooled history."""
    model, inputs, labels = _train_planted(planted, attention=False)
    assert abs(_pair_accuracy(model(inputs)["click"].numpy(), labels) - 0.5) < 0.08


def test_target_attention_learns_a_same_item_category_and_brand_match(planted):
    """Clicks go to candidates whose category AND brand belong to ONE history item; the
    attention ranker orders nearly every list right, through its target_history piece."""
    model, inputs, labels = _train_planted(planted, attention=True)
    x = model.scoring_inputs(inputs, training=False)
    assert _pair_accuracy(model.logits(x)["click"].numpy(), labels) > 0.9
    # Without the attention's summary the same trained ranker is back at chance.
    ablated = dict(x, target_history=tf.zeros_like(x["target_history"]))
    assert abs(_pair_accuracy(model.logits(ablated)["click"].numpy(), labels) - 0.5) < 0.1


def test_target_attention_setting_and_bad_values(planted):
    from tfrec.config import Config

    cfg = Config().override(["ranking.target_attention=true"])
    assert cfg.ranking.target_attention is True and Config().ranking.target_attention is False
    with pytest.raises(ValueError, match="ranking.target_attention must be true/false"):
        Config().override(["ranking.target_attention=maybe"])
    _, _, vocab, catalog = planted
    with pytest.raises(ValueError, match="ranking.target_attention must be true or false"):
        RankingModel(vocab, RankingConfig(target_attention="yes"), catalog)
    with pytest.raises(ValueError, match="normalization must be one of"):
        TargetAttention(normalization="l1")
    with pytest.raises(ValueError, match="hidden units >= 1"):
        TargetAttention(units=())
    layer = TargetAttention((16, 8), "softmax")
    assert TargetAttention.from_config(layer.get_config()).units == (16, 8)
