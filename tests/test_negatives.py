"""Uniform catalog negatives beside the in-batch ones (`model.catalog_negatives`)."""

import copy
from collections import Counter

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf


@pytest.fixture(scope="module")
def untrained(trained_run, tiny_config, tiny_world):
    """(model without dropout, preprocessed batch of 24 examples, catalog)."""
    from tfrec.data.prepare import load_meta
    from tfrec.data.tfrecord import make_dataset
    from tfrec.training.trainer import build_model

    cfg = copy.deepcopy(tiny_config)
    cfg.model.id_dropout = 0.0  # training=True must encode what the reference encodes
    model = build_model(trained_run.model.vocab, cfg)
    pattern = load_meta(cfg.data.tfrecord_dir)["patterns"]["train"]
    batch = next(iter(make_dataset(pattern, 24, cfg.data.history_length, shuffle=False,
                                   features=model.features, preprocess=model.preprocess)))
    return model, batch, tiny_world.catalog


def test_draws_are_uniform_over_the_catalog(untrained):
    from tfrec.training.negatives import negatives_dataset

    model, _, catalog = untrained
    shares = pd.Series(np.arange(1, len(catalog) + 1, dtype=float), catalog["item_id"])
    draws = negatives_dataset(catalog, model, 64, seed=3, shares=shares).take(200)
    counts, seen = Counter(), 0
    for neg in draws:
        ids = [v.decode() for v in neg["item_id"].numpy()]
        counts.update(ids)
        seen += len(ids)
        np.testing.assert_allclose(neg["draw_prob"].numpy(), 1.0 / len(catalog))
        np.testing.assert_allclose(neg["candidate_prob"].numpy(), shares[ids].to_numpy())
        assert neg["item_key"].dtype == tf.int64
    assert seen == 64 * 200 and set(counts) <= set(catalog["item_id"])
    expected = seen / len(catalog)
    chi2 = sum((counts.get(i, 0) - expected) ** 2 / expected for i in catalog["item_id"])
    # Chi-square with n - 1 degrees of freedom: mean n - 1, sd sqrt(2(n - 1)).
    dof = len(catalog) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof)
    same = [next(iter(negatives_dataset(catalog, model, 8, seed=3)))["item_id"].numpy()
            for _ in range(2)]
    np.testing.assert_array_equal(*same)  # seeded


def test_loss_is_the_softmax_over_the_batch_and_the_draws(untrained):
    """Each example's positive against the other positives and the uniform draws, every
    logit corrected by log(the item's probability under the mixture): (rows x its share
    + draws / catalog size) / (rows + draws); a draw (or another positive) of the
    example's own item does not count against it."""
    from tfrec.models.retrieval import NEGATIVES, PREPROCESSED
    from tfrec.training.negatives import negatives_dataset

    model, batch, catalog = untrained
    shares = pd.Series(np.linspace(1e-4, 0.05, len(catalog)), catalog["item_id"])
    neg = next(iter(negatives_dataset(catalog, model, 200, seed=0, shares=shares)))
    loss = float(model.compute_loss({**batch, NEGATIVES: neg}, training=True))

    q = model.query_tower.encode(batch["query_inputs"], training=False).numpy()
    c = model.candidate_tower.encode(batch[PREPROCESSED], training=False).numpy()
    n = model.candidate_tower.encode(neg[PREPROCESSED], training=False).numpy()
    rows, draws = len(q), len(n)
    logits = q @ np.concatenate([c, n]).T / model.config.temperature
    counts = np.concatenate([batch["candidate_prob"].numpy(),
                             shares[[v.decode() for v in neg["item_id"].numpy()]].to_numpy()]
                            ) * rows + draws / len(catalog)
    counts /= rows + draws  # the mixture's probabilities (TFRS clips them to <= 1)
    logits -= np.log(counts)
    keys = np.concatenate([batch["item_key"].numpy(), neg["item_key"].numpy()])
    hits = (keys[None, :] == batch["item_key"].numpy()[:, None])
    hits[np.arange(rows), np.arange(rows)] = False
    assert hits[:, rows:].any(), "no draw hit a positive: the masking goes unchecked"
    logits[hits] = -np.inf
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1,
                                                                                keepdims=True)
                            ) - logits.max(1, keepdims=True)
    weight = batch["weight"].numpy() if "weight" in batch else np.ones(rows)
    expected = float(-(weight * log_p[np.arange(rows), np.arange(rows)]).sum())
    assert loss == pytest.approx(expected, rel=1e-4)
    without = float(model.compute_loss(batch, training=True))
    assert without < loss  # more negatives, more to beat
    # Evaluation keeps the in-batch loss: the validation figures stay comparable.
    assert float(model.compute_loss({**batch, NEGATIVES: neg}, training=False)) == \
        pytest.approx(without, rel=1e-5)


def test_catalog_negatives_errors(untrained, tiny_config):
    from tfrec.training.negatives import check_negatives, negatives_dataset

    model, _, catalog = untrained
    cfg = copy.deepcopy(tiny_config)
    assert check_negatives(cfg) == 256  # the default
    cfg.model.catalog_negatives = 128
    assert check_negatives(cfg) == 128
    for bad in (-1, 2.5, True, "64"):
        cfg.model.catalog_negatives = bad
        with pytest.raises(ValueError, match="model.catalog_negatives must be an integer"):
            check_negatives(cfg)
    with pytest.raises(ValueError, match=">= 1"):
        negatives_dataset(catalog, model, 0, seed=0)
    with pytest.raises(ValueError, match="empty catalog"):
        negatives_dataset(catalog.iloc[:0], model, 8, seed=0)
    partial = pd.Series(0.5, catalog["item_id"].iloc[:2])
    with pytest.raises(ValueError, match="shares has no value for catalog items"):
        negatives_dataset(catalog, model, 8, seed=0, shares=partial)
