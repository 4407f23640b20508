"""Shared pytest fixtures."""

import os

import pytest

import tfrec  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any TensorFlow import)
import tensorflow as tf
from tfrec.data.synthetic import World, generate_world

from tests.helpers import small_run_config

TINY_SEED = 42

# Grappler rewrites every function graph on its first call; with the suite's tiny models
# that is about a sixth of an in-process test's time; only a test of a rewrite needs it. The
# processes the tests start (CLI runs, fresh-process loads, servers) keep it, as a user's
# would; TFREC_TEST_GRAPPLER=1 keeps it here too; `graph_optimizer` turns it on for a test.
GRAPPLER = os.environ.get("TFREC_TEST_GRAPPLER") == "1"
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not GRAPPLER})


@pytest.fixture
def graph_optimizer():
    """TensorFlow's graph optimizer on for one test (one that checks a graph rewrite)."""
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not GRAPPLER})


@pytest.fixture(scope="session")
def tiny_world() -> World:
    """The "tiny" synthetic world, generated once per test session (< 1 s)."""
    return generate_world("tiny", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_world_dir(tiny_world, tmp_path_factory) -> str:
    """Directory holding the saved tiny world (tables, ground truth, world.json)."""
    path = tmp_path_factory.mktemp("tiny_world")
    tiny_world.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_config(tiny_world_dir, tmp_path_factory):
    """Config of a small, fast retrieval run on the tiny world."""
    return small_run_config(tiny_world_dir, tmp_path_factory.mktemp("work"), "tiny")


@pytest.fixture(scope="session")
def trained_run(tiny_config):
    """One retrieval training run shared by every test that needs a trained model."""
    from tfrec.training.trainer import train_retrieval

    return train_retrieval(tiny_config)


@pytest.fixture(scope="session")
def exported_model(trained_run, tiny_config, tiny_world):
    """Version 1 of the trained model exported as a SavedModel."""
    from tfrec.export.exporter import export_retrieval

    return export_retrieval(trained_run.run_dir, tiny_world.catalog, tiny_config.export,
                            model=trained_run.model)


@pytest.fixture(scope="session")
def trained_ranker(trained_run, tiny_config):
    """The ranker of the shared retrieval run (bag-of-words text), trained once."""
    from copy import deepcopy

    from tfrec.training.ranking_trainer import train_ranker

    cfg = deepcopy(tiny_config)
    cfg.ranking.epochs = 2
    cfg.ranking.learning_rate = 0.002
    return train_ranker(cfg, run=trained_run.run_name, retrieval=trained_run.model)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_world, tmp_path_factory):
    """(encoder_path, preprocessor_path): a tiny random TF-Hub-format BERT, exported once.

    Its vocabulary holds the tiny world's frequent words, so catalog text and queries
    tokenize into whole words as they would with a real model.
    """
    from tfrec.text.hub_export import build_tiny_encoder
    from tfrec.text.vocab import words_from_texts

    texts = (list(tiny_world.catalog["title"]) + list(tiny_world.catalog["description"])
             + [q for q in tiny_world.events["query"] if q])
    return build_tiny_encoder(str(tmp_path_factory.mktemp("tiny_encoder")),
                              vocab_tokens=words_from_texts(texts, max_words=1000),
                              layers=2, hidden=64, heads=2, seq_length=64, seed=0)
