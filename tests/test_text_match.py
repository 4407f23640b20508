"""TextMatch: BERT query-item features for rankers, on the tiny random TF-Hub encoder.

The fresh-process test loads the export with only tensorflow and tensorflow_text, as a
serving process would: no tfrec, no tensorflow_hub, no Keras.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_text  # noqa: F401  (ops of the preprocessor SavedModel)

from tfrec.models.text_match import MODES, TextMatch, encoder_trainable_names
from tfrec.text.embedding import SentenceEncoder

ITEMS = ["grey kettlebell", "Paxus ionic cologne", "wireless headphones", "garden hose"]
QUERIES = ["kettlebell", ""]
INDEX = [[0, 1, -1], [2, -1, 9]]  # -1 pads, 9 is outside the catalog
DIM = 8
TINY_ENCODER_WEIGHTS = 5 + 16 * 2 + 2  # embeddings, 16 per block, pooler


def _model(layer: TextMatch) -> tf.keras.Model:
    query = tf.keras.Input((), dtype=tf.string, name="query")
    index = tf.keras.Input((None,), dtype=tf.int64, name="item_index")
    return tf.keras.Model([query, index], layer(query, index))


@pytest.fixture(scope="module")
def layers(tiny_encoder):
    """One frozen layer per mode, shared by the read-only tests."""
    return {mode: TextMatch(mode, *tiny_encoder, ITEMS, output_dim=DIM, name=f"{mode}_match")
            for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_shapes_empty_query_and_unknown_items(layers, mode):
    layer = layers[mode]
    out = layer(tf.constant(QUERIES), tf.constant(INDEX))
    assert layer.output_size == DIM + 2
    assert out.dtype == tf.float32 and out.shape == (2, 3, DIM + 2)
    out = out.numpy()
    np.testing.assert_array_equal(out[:, :, -1], [[1, 1, 1], [0, 0, 0]])  # has_query
    np.testing.assert_array_equal(out[:, :, -2][[0, 1, 1, 1], [2, 0, 1, 2]], 0.0)
    assert abs(out[0, 0, -2]) > 1e-3  # a real query-item similarity
    bias = layer.projection.bias.numpy()
    unknown = [(0, 2), (1, 1), (1, 2)] + ([(1, 0)] if mode == "fast" else [])
    for b, i in unknown:  # no item text (or, fast mode, no query): zero input, bias out
        np.testing.assert_allclose(out[b, i, :DIM], bias, atol=1e-6)
    if mode == "cross":  # without a query the pair still encodes the item text
        assert np.abs(out[1, 0, :DIM] - bias).max() > 1e-4
    int32 = layer(tf.constant(QUERIES), tf.constant(INDEX, tf.int32)).numpy()
    np.testing.assert_allclose(int32, out, atol=1e-6)


def test_fast_cosine_is_sentence_encoder_cosine(layers, tiny_encoder):
    queries = ["grey kettlebell", "cologne for men", "hose"]
    out = layers["fast"](tf.constant(queries), tf.constant([[0, 1, 2, 3]] * 3)).numpy()
    vectors = SentenceEncoder(*tiny_encoder).encode(queries + ITEMS)
    expected = vectors[:3] @ vectors[3:].T
    np.testing.assert_allclose(out[:, :, -2], expected, atol=1e-5)
    np.testing.assert_allclose(layers["fast"].item_embeddings.numpy(), vectors[3:], atol=1e-5)


def test_trainable_name_selection():
    names = ([f"bert_encoder/layer_{i}/attention/query/kernel:0" for i in range(3)]
             + ["bert_encoder/embeddings/word_embeddings:0", "bert_encoder/pooler/kernel:0"])
    assert encoder_trainable_names(names, 1, True) == {names[2], names[4]}
    assert encoder_trainable_names(names, 2, False) == set(names[1:3])
    assert encoder_trainable_names(names, 0, False) == set(names[:4])
    with pytest.raises(ValueError, match="only 3 transformer layers"):
        encoder_trainable_names(names, 4, True)
    with pytest.raises(ValueError, match="layer_<i>"):
        encoder_trainable_names(["dense/kernel:0"], 1, True)


@pytest.mark.parametrize("mode", MODES)
def test_top_layers_select_trainable_variables_and_gradients(layers, tiny_encoder, mode):
    pooler = 2 if mode == "cross" else 0  # the pooler only trains where its output is used
    assert len(_model(layers[mode]).trainable_variables) == 2  # frozen: projection only
    full = TextMatch(mode, *tiny_encoder, ITEMS, output_dim=DIM, trainable=True)
    assert len(_model(full).trainable_variables) == 2 + TINY_ENCODER_WEIGHTS - 2 + pooler

    layer = TextMatch(mode, *tiny_encoder, ITEMS, output_dim=DIM, trainable=True, top_layers=1)
    model = _model(layer)
    encoder_vars = [v for v in model.trainable_variables if "bert_encoder" in v.name]
    assert len(model.trainable_variables) == 2 + 16 + pooler
    assert all("/layer_1/" in v.name or "/pooler/" in v.name for v in encoder_vars)
    assert len(model.weights) == len(model.trainable_variables) + len(
        model.non_trainable_variables)

    frozen = [w for w in layer.encoder.weights if "layer_0/" in w.name or "word_emb" in w.name]
    before = {w.name: w.numpy().copy() for w in frozen + encoder_vars}
    inputs = [tf.constant(["grey kettlebell", "cologne"]), tf.constant([[0, 1], [1, -1]])]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(inputs, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
    assert all(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in grads)
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, model.trainable_variables))
    for w in frozen:
        np.testing.assert_array_equal(w.numpy(), before[w.name])
    assert all(np.abs(v.numpy() - before[v.name]).max() > 0 for v in encoder_vars)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_precision_policy_keeps_float32_output(layers, tiny_encoder, mode):
    try:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
        layer = TextMatch(mode, *tiny_encoder, ITEMS, output_dim=DIM)
        out = layer(tf.constant(QUERIES), tf.constant(INDEX))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32 and layer.compute_dtype == "float16"
    layer.projection.set_weights(layers[mode].projection.get_weights())
    reference = layers[mode](tf.constant(QUERIES), tf.constant(INDEX))
    # Only the float16 projection differs from the float32 layer.
    np.testing.assert_allclose(layer(tf.constant(QUERIES), tf.constant(INDEX)), reference,
                               atol=5e-3)


def test_bad_arguments(tiny_encoder):
    with pytest.raises(ValueError, match=r"\('fast', 'cross'\)"):
        TextMatch("dual", *tiny_encoder, ITEMS)
    with pytest.raises(ValueError, match="item_texts is empty"):
        TextMatch("fast", *tiny_encoder, [])
    with pytest.raises(ValueError, match="needs trainable=True"):
        TextMatch("cross", *tiny_encoder, ITEMS, top_layers=1)
    with pytest.raises(ValueError, match="only 2 transformer layers"):
        TextMatch("cross", *tiny_encoder, ITEMS, trainable=True, top_layers=3)
    with pytest.raises(ValueError, match="pair_length"):
        TextMatch("cross", *tiny_encoder, ITEMS, pair_length=4)


class _Export(tf.Module):
    """What an exporter does: Keras models inside a tf.Module with a serving function."""

    def __init__(self, models):
        super().__init__()
        self.models = models

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="query"),
                                  tf.TensorSpec([None, None], tf.int64, name="item_index")])
    def serve(self, query, item_index):
        return {mode: model([query, item_index]) for mode, model in self.models.items()}


def test_saved_model_reloads_in_fresh_process(layers, tmp_path):
    export = _Export({mode: _model(layer) for mode, layer in layers.items()})
    query, index = tf.constant(["grey kettlebell", "", "hose"]), tf.constant(
        [[0, 3, -1], [1, 2, 3], [3, 0, 7]], tf.int64)
    expected = {k: v.numpy() for k, v in export.serve(query, index).items()}
    path = str(tmp_path / "text_match")
    tf.saved_model.save(export, path, signatures={"serving_default": export.serve})
    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # noqa: F401
        loaded = tf.saved_model.load(sys.argv[1])
        args = json.loads(sys.argv[2])
        out = loaded.signatures["serving_default"](
            query=tf.constant(args["query"]), item_index=tf.constant(args["index"], tf.int64))
        print(json.dumps({"out": {k: v.numpy().tolist() for k, v in out.items()},
                          "imported": sorted(m for m in ("tfrec", "tensorflow_hub", "tf_keras")
                                             if m in sys.modules)}))
    """)
    args = json.dumps({"query": [q.decode() for q in query.numpy()],
                       "index": index.numpy().tolist()})
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", script, path, args], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    assert set(result["out"]) == set(MODES)
    for mode in MODES:
        np.testing.assert_allclose(np.asarray(result["out"][mode]), expected[mode], atol=1e-6)
