"""LoRA adapters: start as the pretrained encoder, train only themselves, merge exactly,
and a LoRA search run trains, saves merged, reloads and exports without adapter ops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.text.bert import build_encoder
from tfrec.text.config import BertConfig
from tfrec.text.lora import LoRADense, add_lora, lora_layers, merge_lora

INPUTS = {"input_word_ids": tf.constant([[2, 5, 7, 9], [3, 4, 0, 0]]),
          "input_mask": tf.constant([[1, 1, 1, 1], [1, 1, 0, 0]]),
          "input_type_ids": tf.zeros([2, 4], tf.int32)}


def small_encoder():
    return build_encoder(BertConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=2,
                                    intermediate_size=64), seed=0)


def test_adapters_start_at_the_pretrained_encoder_and_train_alone():
    encoder = small_encoder()
    before = encoder(INPUTS)["sequence_output"].numpy()
    total = sum(int(np.prod(v.shape)) for v in encoder.weights)
    adapters = add_lora(encoder, rank=4, alpha=8.0,
                        targets=("query", "value", "intermediate", "output"), top_layers=2)
    assert len(adapters) == 8
    np.testing.assert_array_equal(encoder(INPUTS)["sequence_output"].numpy(), before)
    names = [v.name for v in encoder.trainable_weights]
    assert names and all("lora_" in n for n in names)
    assert not any("layer_0/" in n for n in names)  # top_layers=2: blocks 1 and 2 only
    trained = sum(int(np.prod(v.shape)) for v in encoder.trainable_weights)
    assert trained < 0.1 * total
    # A step moves only the adapters.
    frozen = {v.name: v.numpy() for v in encoder.weights if "lora_" not in v.name}
    with tf.GradientTape() as tape:
        # Not the squared norm: LayerNorm outputs keep theirs whatever the weights.
        out = encoder(INPUTS, training=True)["sequence_output"]
        loss = tf.reduce_sum(out * tf.random.stateless_normal(tf.shape(out), [3, 4]))
    grads = tape.gradient(loss, encoder.trainable_weights)
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, encoder.trainable_weights))
    for v in encoder.weights:
        if v.name in frozen:
            np.testing.assert_array_equal(v.numpy(), frozen[v.name], err_msg=v.name)
    assert not np.allclose(encoder(INPUTS)["sequence_output"].numpy(), before)


def test_merge_gives_the_adapted_outputs_and_drops_the_adapter_ops():
    encoder = small_encoder()
    adapters = add_lora(encoder, rank=2, alpha=4.0, targets=("key", "attention_output",
                                                               "intermediate"))
    for a in adapters:  # as if trained: B away from its zero start
        a.lora_b.assign(tf.random.stateless_normal(a.lora_b.shape, [1, 2], stddev=0.2))
    fn = tf.function(lambda x: encoder(x)["sequence_output"])
    adapted = fn(INPUTS).numpy()
    spec = {k: tf.TensorSpec([None, None], tf.int32) for k in INPUTS}
    assert any("lora_" in v.name for v in fn.get_concrete_function(spec).variables)
    assert merge_lora(encoder) == len(adapters)
    merged_fn = tf.function(lambda x: encoder(x)["sequence_output"])
    np.testing.assert_allclose(merged_fn(INPUTS).numpy(), adapted, atol=1e-5)
    assert not any("lora_" in v.name for v in merged_fn.get_concrete_function(spec).variables)
    assert all(not a.lora_b.numpy().any() for a in adapters)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2, alpha=0.0), "alpha must be > 0"),
    (dict(rank=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_adapter_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRADense(tf.keras.layers.Dense(4), **kwargs)


def test_bad_targets_and_layers():
    with pytest.raises(ValueError, match="choose one or more of"):
        add_lora(small_encoder(), 2, targets=("qkv",))
    with pytest.raises(ValueError, match="top_layers=5 but the encoder has 3 blocks"):
        add_lora(small_encoder(), 2, top_layers=5)


@pytest.fixture(scope="module")
def lora_search(tiny_encoder, tmp_path_factory):
    from tfrec.search.train import train_search

    from tests.test_search import _tiny_config

    cfg = dataclasses.replace(_tiny_config(tiny_encoder), lora_rank=4, lora_alpha=8.0,
                              lora_targets=("query", "value", "intermediate"), epochs=2,
                              ranker_epochs=1, ranker_folds=0)
    workdir = str(tmp_path_factory.mktemp("lora_search"))
    return train_search(cfg, workdir, log_dir=str(tmp_path_factory.mktemp("lora_logs"))), \
        workdir


def test_lora_search_run_trains_few_weights_and_reloads_merged(lora_search):
    from tfrec.search.export import export_search
    from tfrec.search.index import load_search_pipeline

    run, workdir = lora_search
    encoder = run.pipeline.two_tower.query_encoder
    adapters = lora_layers(encoder.encoder)
    assert len(adapters) == 2 * 3 and all(a.merged for a in adapters)
    trained = sum(int(np.prod(a.lora_a.shape)) + int(np.prod(a.lora_b.shape))
                  for a in adapters)
    base = sum(int(np.prod(v.shape)) for v in encoder.encoder.weights) - trained
    assert trained < 0.05 * base
    assert run.history["two_tower_val_ndcg@10"]  # validation measured per epoch
    assert np.isfinite(run.metrics["two_tower"]["ndcg@10"])
    # The saved run (merged weights, zero adapters) answers as the trained pipeline.
    queries = tf.constant(["red shoes", "无线耳机", "café"])
    want = run.pipeline.search(queries, num_results=5)
    pipeline, cfg = load_search_pipeline(workdir, run.data.catalog)
    assert cfg.lora_rank == 4
    got = pipeline.search(queries, num_results=5)
    np.testing.assert_allclose(got["dense_scores"].numpy(), want["dense_scores"].numpy(),
                               atol=1e-4)
    assert (got["product_ids"].numpy() == want["product_ids"].numpy()).all()
    path = export_search(pipeline, str(workdir) + "/models", num_results=5)
    loaded = tf.saved_model.load(path)
    assert not any("lora_" in v.name for v in
                   loaded.signatures["serving_default"].variables)


def test_lora_needs_fine_tuning(tiny_encoder):
    from tfrec.search.model import query_encoder_of

    from tests.test_search import _tiny_config

    cfg = dataclasses.replace(_tiny_config(tiny_encoder), lora_rank=4, fine_tune=False)
    with pytest.raises(ValueError, match="needs fine_tune=True"):
        query_encoder_of(cfg)
