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


def test_draw_shares_are_the_records_candidate_prob(tiny_world_dir, tmp_path):
    """An item gets one probability in the logQ correction, in the batch or drawn: the
    draws' shares equal the candidate_prob the training records carry, also when
    `data.train_days` keeps only recent training examples."""
    from tfrec.data.examples import positive_interactions
    from tfrec.data.io import load_tables
    from tfrec.data.prepare import prepare_dataset
    from tfrec.data.tfrecord import make_dataset
    from tfrec.training.negatives import draw_shares

    meta = prepare_dataset(tiny_world_dir, str(tmp_path / "records"), history_length=4,
                           num_shards=1, train_days=5)
    tables = load_tables(tiny_world_dir)
    shares = draw_shares(positive_interactions(tables.events), tables.catalog,
                         int(meta["split"]["t_val"]))
    seen = {}
    for batch in make_dataset(meta["patterns"]["train"], 512, 4, shuffle=False):
        seen.update(zip((v.decode() for v in batch["item_id"].numpy()),
                        batch["candidate_prob"].numpy().tolist()))
    assert len(seen) > 10
    np.testing.assert_allclose([seen[i] for i in seen], shares[list(seen)].to_numpy(),
                               rtol=1e-6)
    assert shares.sum() == pytest.approx(1.0)
