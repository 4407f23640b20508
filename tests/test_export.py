"""Exported SavedModel: reload in a fresh TensorFlow-only process, atomic versions."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tfrec.export.versioned import list_versions, save_versioned

FRESH_PROCESS = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # the text case-folding op, as TF Serving links it

    path, history_item, catalog_item = sys.argv[1], sys.argv[2], sys.argv[3]
    m = tf.saved_model.load(path)
    out = {"signatures": sorted(m.signatures.keys())}
    rec = m.signatures["serving_default"](
        user_id=tf.constant(["U000001", "never-seen-user"]),
        history=tf.constant([[history_item, ""], ["", ""]]),
        query=tf.constant(["", "wireless headphones"]), device=tf.constant(["mobile", "app"]),
        hour=tf.constant([9, 23], tf.int64), k=tf.constant([5, 3], tf.int32),
        exclude_seen=tf.constant([True, False]))
    out["item_ids"] = rec["item_ids"].numpy().astype(str).tolist()
    out["titles"] = rec["titles"].numpy().astype(str).tolist()
    out["scores"] = rec["scores"].numpy().tolist()
    q = m.signatures["query_embedding"](
        user_id=tf.constant(["U000001"]), history=tf.constant([[history_item]]),
        query=tf.constant([""]), device=tf.constant(["desktop"]), hour=tf.constant([12], tf.int64))
    out["query_shape"] = q["embedding"].shape.as_list()
    c = m.signatures["candidate_embedding"](
        item_id=tf.constant(["brand-new-item"]), title=tf.constant(["red running shoes"]),
        category=tf.constant(["fashion>sneakers"]), brand=tf.constant(["acme"]),
        price=tf.constant([59.0]))
    out["candidate_norm"] = float(np.linalg.norm(c["embedding"].numpy()))
    s = m.signatures["similar_items"](item_id=tf.constant([catalog_item]), k=tf.constant([4]))
    out["similar"] = s["item_ids"].numpy().astype(str).tolist()
    try:
        m.signatures["serving_default"](
            user_id=tf.constant(["u"]), history=tf.constant([[""]]), query=tf.constant([""]),
            device=tf.constant([""]), hour=tf.constant([1], tf.int64),
            k=tf.constant([0]), exclude_seen=tf.constant([False]))
        out["k0"] = "no error"
    except tf.errors.InvalidArgumentError as e:
        out["k0"] = e.message
    out["modules"] = sorted(n for n in sys.modules if n.split(".")[0] in
                            ("tfrec", "tensorflow_recommenders", "tf_keras"))
    out["functions"] = sorted(n for n in dir(m) if isinstance(
        getattr(m, n, None), tf.types.experimental.PolymorphicFunction))
    print("RESULT" + json.dumps(out))
""")


def test_export_layout_and_reload_in_fresh_process(exported_model, tiny_world, trained_run):
    assert os.path.basename(exported_model) == "1"
    assert os.path.exists(os.path.join(exported_model, "saved_model.pb"))
    assert os.path.exists(os.path.join(exported_model, "assets.extra", "tfrec_model.json"))
    # TF Serving warm-up requests for every signature: similar_items refuses unknown ids,
    # so its sample carries a catalog item id.
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    warmup = os.path.join(exported_model, "assets.extra", "tf_serving_warmup_requests")
    warmed = {prediction_log_pb2.PredictionLog.FromString(r.numpy())
              .predict_log.request.model_spec.signature_name
              for r in tf.data.TFRecordDataset(warmup)}
    assert warmed == {"serving_default", "query_embedding", "candidate_embedding",
                      "similar_items"}, warmed
    catalog = tiny_world.catalog
    history_item, catalog_item = catalog["item_id"].iloc[3], catalog["item_id"].iloc[7]
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, exported_model, history_item,
                           catalog_item], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["signatures"] == ["candidate_embedding", "query_embedding", "serving_default",
                                 "similar_items"]
    assert out["modules"] == [], "the fresh process must need TensorFlow (+ TF Text ops) only"
    assert out["functions"] == [], "each serving graph is saved once, as a signature"
    ids = set(catalog["item_id"])
    titles = dict(zip(catalog["item_id"], catalog["title"]))
    first, second = out["item_ids"]
    assert len(first) == 5 and all(i in ids for i in first)
    assert history_item not in first, "exclude_seen must drop history items"
    assert [titles[i] for i in first] == out["titles"][0]
    assert out["scores"][0] == sorted(out["scores"][0], reverse=True)
    # Row 2 asked for k=3: padded to the batch's width with "" / -inf.
    assert all(i in ids for i in second[:3]) and second[3:] == ["", ""]
    assert out["scores"][1][3] == -np.inf
    assert out["query_shape"] == [1, trained_run.model.config.embedding_dim]
    assert abs(out["candidate_norm"] - 1.0) < 1e-4
    assert len(out["similar"][0]) == 4 and catalog_item not in out["similar"][0]
    assert "k must be >= 1" in out["k0"]


def test_versions_are_written_atomically_and_never_overwritten(tmp_path):
    import tensorflow as tf

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def double(self, x):
            return {"y": 2 * x}

    module = Tiny()
    sig = {"serving_default": module.double.get_concrete_function()}
    first = save_versioned(module, sig, str(tmp_path), "m")
    second = save_versioned(module, sig, str(tmp_path), "m")
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert list_versions(str(tmp_path / "m")) == [1, 2]
    with pytest.raises(FileExistsError, match="already exists"):
        save_versioned(module, sig, str(tmp_path), "m", version=2)
    with pytest.raises(ValueError, match="invalid model name"):
        save_versioned(module, sig, str(tmp_path), "../escape")

    # A failing save leaves no temp directory and no version behind.
    class Broken(tf.Module):
        pass

    with pytest.raises(Exception):
        save_versioned(Broken(), {"serving_default": lambda x: x}, str(tmp_path), "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["1", "2"]


def test_signature_modules_are_saved_with_their_signatures_only(tmp_path):
    """A SignatureModule's tf.function attributes are neither traced again by the save nor
    stored beside the signatures: the SavedModel holds each serving graph once."""
    import tensorflow as tf

    from tfrec.export.versioned import SignatureModule

    traces = []

    class Tiny(SignatureModule):
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(3.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def triple(self, x):
            traces.append(1)
            return {"y": self.scale * x}

    module = Tiny()
    path = save_versioned(module, {"serving_default": module.triple.get_concrete_function()},
                          str(tmp_path), "m")
    assert len(traces) == 1, "the save traced the function again"
    loaded = tf.saved_model.load(path)
    assert not hasattr(loaded, "triple")
    y = loaded.signatures["serving_default"](x=tf.constant([1.0, 2.0]))["y"]
    np.testing.assert_allclose(y.numpy(), [3.0, 6.0])  # the variable is saved


SCORE_PROCESS = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # the text case-folding op, as TF Serving links it

    m = tf.saved_model.load(sys.argv[1])
    raw = dict(np.load(sys.argv[2], allow_pickle=True))
    def embed(name):
        fn = m.signatures[name]
        args = {k: tf.constant(raw[k]) for k in fn.structured_input_signature[1]}
        return fn(**args)["embedding"].numpy()
    q, c = embed("query_embedding"), embed("candidate_embedding")
    print("RESULT" + json.dumps({"scores": (q @ c.T).tolist()}))
""")


def test_exported_model_scores_like_the_training_step(exported_model, trained_run,
                                                      tiny_config, tmp_path):
    """Training reads integers preprocessed in tf.data; serving takes raw strings through
    the same layers inside the SavedModel. Same raw examples -> the same scores."""
    import tensorflow as tf

    from tfrec.data.tfrecord import make_dataset
    from tfrec.training.trainer import ensure_prepared

    model = trained_run.model
    meta = ensure_prepared(tiny_config)
    raw = next(iter(make_dataset(meta["patterns"]["val"], 16, tiny_config.data.history_length,
                                 shuffle=False, deterministic=True, features=model.features)))
    raw = {k: v.numpy() for k, v in raw.items()}
    # Unicode and unseen text on both sides: Chinese, accents, an empty query.
    raw["query"][:4] = [t.encode() for t in ("无线耳机", "café crème", "", "Kopfhörer 4K")]
    raw["title"][:3] = [t.encode() for t in ("蓝牙 耳机 黑色", "chaussures de randonnée", "")]
    train_path = (tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in raw.items()})
                  .map(model.preprocess))
    pre = next(iter(train_path))
    assert pre["query_inputs"]["user"].dtype == tf.int64  # integers reach the step
    q = model.query_tower.encode(pre["query_inputs"], training=False).numpy()
    c = model.candidate_tower.encode(pre["candidate_inputs"], training=False).numpy()
    np.savez(tmp_path / "raw.npz", **raw)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.run([sys.executable, "-c", SCORE_PROCESS, exported_model,
                           str(tmp_path / "raw.npz")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.asarray(json.loads(proc.stdout.split("RESULT", 1)[1])["scores"])
    assert served.shape == (16, 16)
    np.testing.assert_allclose(served, q @ c.T, atol=1e-5)
