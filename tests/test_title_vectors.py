"""Stored BERT title vectors in the candidate tower: computed once per title, saved with
the run, refreshed for the catalog given at export (new items without retraining)."""

import copy

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401

from tfrec.models.embedding import tower_fn
from tfrec.training.title_vectors import title_vectors

from tests.helpers import fresh_signature


@pytest.fixture(scope="module")
def vectors_run(tiny_config, tiny_encoder, tmp_path_factory):
    from tfrec.training.trainer import train_retrieval

    cfg = copy.deepcopy(tiny_config)
    cfg.model.title_encoder, cfg.model.title_preprocessor = tiny_encoder
    cfg.model.title_vector_cache = str(tmp_path_factory.mktemp("title_cache"))
    cfg.model.title_vector_length = 32
    cfg.train.epochs = 1
    cfg.train.run_name = "tiny-title-vectors"
    cfg.export.base_dir = str(tmp_path_factory.mktemp("title_vector_models"))
    return cfg, train_retrieval(cfg)


def _items(rows: pd.DataFrame) -> dict:
    out = {k: rows[k].to_numpy() for k in ("item_id", "title", "category", "brand")}
    out["price"] = rows["price"].to_numpy(np.float32)
    return out


def test_training_stores_one_vector_per_catalog_item(vectors_run, tiny_world):
    from tfrec.training.trainer import load_trained_model

    cfg, run = vectors_run
    layer = run.model.candidate_tower.title_vectors
    expected = title_vectors(cfg.model, run.model.vocab.catalog_items, tiny_world.catalog)
    stored = layer.vectors.numpy()
    assert stored.shape == (len(tiny_world.catalog) + 1, cfg.model.title_vector_width)
    np.testing.assert_allclose(stored[1:], expected, atol=1e-6)
    assert np.allclose(stored[0], 0.0)  # unknown items
    np.testing.assert_allclose(np.linalg.norm(stored[1:], axis=1), 1.0, atol=1e-4)
    # Two items, same content apart from the title: the title vectors tell them apart.
    rows = tiny_world.catalog.iloc[[0, 0]].copy()
    rows["item_id"] = [tiny_world.catalog["item_id"].iloc[0], tiny_world.catalog["item_id"].iloc[1]]
    embedded = layer(rows["item_id"].to_numpy()).numpy()
    assert np.abs(embedded[0] - embedded[1]).max() > 1e-4
    rebuilt, _, _ = load_trained_model(run.run_dir)  # the vectors come back with the weights
    np.testing.assert_allclose(rebuilt.candidate_tower.title_vectors.vectors.numpy(), stored)


def test_export_embeds_a_new_items_title_without_retraining(vectors_run, tiny_world):
    from tfrec.export.exporter import export_retrieval
    from tfrec.training.trainer import load_trained_model

    cfg, run = vectors_run
    new = tiny_world.catalog.iloc[[3]].copy()
    new["item_id"], new["title"] = "NEW-无线耳机", "Écouteurs sans fil 无线耳机 Pro"
    catalog = pd.concat([tiny_world.catalog, new], ignore_index=True)
    model, _, _ = load_trained_model(run.run_dir)
    path = export_retrieval(run.run_dir, catalog, cfg.export, model=model)
    layer = model.candidate_tower.title_vectors
    vector = layer.vectors.numpy()[int(layer.preprocess(np.array(["NEW-无线耳机"]))[0])]
    np.testing.assert_allclose(vector, title_vectors(cfg.model, ["NEW-无线耳机"], catalog)[0],
                               atol=1e-6)
    assert np.linalg.norm(vector) > 0.99  # the new title was embedded at export
    probe = catalog.iloc[[0, len(catalog) - 1]]
    items = {k: [x.item() if hasattr(x, "item") else x for x in v]
             for k, v in _items(probe).items()}
    served = fresh_signature(path, "candidate_embedding", items)["embedding"]
    np.testing.assert_allclose(served, tower_fn(model.candidate_tower)(_items(probe)), atol=1e-5)


def test_title_vectors_need_an_encoder(tiny_world):
    from tfrec.config import ModelConfig

    with pytest.raises(ValueError, match="model.title_encoder is empty"):
        title_vectors(ModelConfig(), ["I000000"], tiny_world.catalog)
