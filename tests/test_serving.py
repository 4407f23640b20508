"""End-to-end tests of the serving layer: real SavedModels, real gRPC, real client.

The tiny model below implements the retrieval export contract with the same kinds of
ops as the real one (hash-table lookups, matmul, top_k with a tensor k, asserts).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid

import tfrec  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfrec.serving import (
    ModelManager,
    ModelServer,
    PredictClient,
    ServingError,
    format_results,
    load_model_config,
    parse_model_config,
)
from tfrec.serving import tensors
from tests.helpers import wait_for

MODEL = "retrieval"
NUM_ITEMS = 20
USERS = [f"U{i:06d}" for i in range(1, 6)]
ITEMS = [f"I{i:03d}" for i in range(NUM_ITEMS)]


# -- a small model with the retrieval export contract --------------------------------

class TinyRetrieval(tf.Module):
    """Two-tower-shaped model: lookups, mean-pooled history, dot products, top_k.

    Args:
      dim: Embedding size.
      seed: Seed of the random embedding tables.
      title_prefix: Prefix of item titles, so tests can tell versions apart.
    """

    def __init__(self, dim: int = 8, seed: int = 0, title_prefix: str = "Item"):
        super().__init__()
        rng = np.random.default_rng(seed)
        n = NUM_ITEMS
        self.num_items = n
        self.item_ids = tf.constant(ITEMS)
        self.titles = tf.constant([f"{title_prefix} {i}" for i in range(n)])
        self.item_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(ITEMS, tf.range(n, dtype=tf.int64)), -1)
        self.user_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(USERS, tf.range(len(USERS), dtype=tf.int64)),
            len(USERS))  # unknown users share the last (OOV) row
        table = lambda rows: tf.Variable(rng.normal(size=(rows, dim)).astype(np.float32))
        self.item_emb = table(n)
        self.user_emb = table(len(USERS) + 1)
        self.text_emb = table(16)
        self.device_emb = table(4)
        self.hour_emb = table(24)

    def _query(self, user_id, history, query, device, hour):
        vec = tf.gather(self.user_emb, self.user_index.lookup(user_id))
        seen = self.item_index.lookup(history)  # [B, H], -1 for padding/unknown
        mask = tf.cast(seen >= 0, tf.float32)
        pooled = tf.reduce_sum(tf.gather(self.item_emb, tf.maximum(seen, 0)) * mask[..., None], 1)
        vec += pooled / tf.maximum(tf.reduce_sum(mask, 1, keepdims=True), 1.0)
        has_text = tf.cast(query != "", tf.float32)[:, None]
        vec += tf.gather(self.text_emb, tf.strings.to_hash_bucket_fast(query, 16)) * has_text
        vec += tf.gather(self.device_emb, tf.strings.to_hash_bucket_fast(device, 4))
        vec += tf.gather(self.hour_emb, tf.math.floormod(hour, 24))
        return vec, seen

    def _top_k(self, scores, k):
        message = f"k must be between 1 and {self.num_items}"
        checks = [tf.debugging.assert_greater_equal(k, 1, message=message),
                  tf.debugging.assert_less_equal(k, self.num_items, message=message)]
        with tf.control_dependencies(checks):
            width = tf.reduce_max(k)
        values, index = tf.math.top_k(scores, width)
        valid = (tf.range(width)[None, :] < k[:, None]) & tf.math.is_finite(values)
        return {
            "item_ids": tf.where(valid, tf.gather(self.item_ids, index), ""),
            "scores": tf.where(valid, values, -np.inf),
            "titles": tf.where(valid, tf.gather(self.titles, index), ""),
        }

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None, None], tf.string),
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string),
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.bool)])
    def serve(self, user_id, history, query, device, hour, k, exclude_seen):
        vec, seen = self._query(user_id, history, query, device, hour)
        scores = tf.matmul(vec, self.item_emb, transpose_b=True)
        seen_mask = tf.reduce_max(tf.one_hot(seen, self.num_items), axis=1) > 0
        scores = tf.where(seen_mask & exclude_seen[:, None], -np.inf, scores)
        return self._top_k(scores, k)

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None, None], tf.string),
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string),
        tf.TensorSpec([None], tf.int64)])
    def query_embedding(self, user_id, history, query, device, hour):
        return {"embedding": self._query(user_id, history, query, device, hour)[0]}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string),
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string),
        tf.TensorSpec([None], tf.float32)])
    def candidate_embedding(self, item_id, title, category, brand, price):
        index = self.item_index.lookup(item_id)
        known = tf.cast(index >= 0, tf.float32)[:, None]
        vec = tf.gather(self.item_emb, tf.maximum(index, 0)) * known
        vec += tf.gather(self.text_emb, tf.strings.to_hash_bucket_fast(title, 16))
        vec += tf.gather(self.text_emb, tf.strings.to_hash_bucket_fast(category + brand, 16))
        return {"embedding": vec + 0.001 * price[:, None]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string),
                                  tf.TensorSpec([None], tf.int32)])
    def similar_items(self, item_id, k):
        index = self.item_index.lookup(item_id)
        check = tf.debugging.assert_non_negative(index, message="unknown item id")
        with tf.control_dependencies([check]):
            vec = tf.gather(self.item_emb, index)
        scores = tf.matmul(vec, self.item_emb, transpose_b=True)
        scores = tf.where(tf.one_hot(index, self.num_items) > 0, -np.inf, scores)
        return self._top_k(scores, k)


def save_tiny_model(export_dir: str, **kwargs) -> str:
    """Writes a TinyRetrieval SavedModel with the four contract signatures."""
    module = TinyRetrieval(**kwargs)
    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "query_embedding": module.query_embedding.get_concrete_function(),
        "candidate_embedding": module.candidate_embedding.get_concrete_function(),
        "similar_items": module.similar_items.get_concrete_function(),
    }
    tf.saved_model.save(module, export_dir, signatures=signatures)
    return export_dir


def export_version(base_path: str, version: int, **kwargs) -> str:
    """Exports like the package does: write `.tmp-*` next to it, then rename atomically."""
    os.makedirs(base_path, exist_ok=True)
    tmp = os.path.join(base_path, f".tmp-{uuid.uuid4().hex[:8]}")
    save_tiny_model(tmp, **kwargs)
    final = os.path.join(base_path, str(version))
    os.rename(tmp, final)
    return final


def write_corrupt_version(base_path: str, version: int) -> str:
    """A version directory whose saved_model.pb is garbage, renamed into place."""
    tmp = os.path.join(base_path, f".tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.join(tmp, "variables"))
    with open(os.path.join(tmp, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a protobuf \xff\xfe garbage" * 10)
    final = os.path.join(base_path, str(version))
    os.rename(tmp, final)
    return final


def request_inputs(k=5, hour=9, history=("I001", "I002", ""), batch=1):
    return {
        "user_id": np.array(["U000001", "nobody"][:batch], dtype=object),
        "history": np.array([list(history)] * batch, dtype=object),
        "query": np.array(["red shoes", ""][:batch], dtype=object),
        "device": np.array(["mobile", "desktop"][:batch], dtype=object),
        "hour": np.full([batch], hour, dtype=np.int64),
        "k": np.full([batch], k, dtype=np.int32),
        "exclude_seen": np.array([True, False][:batch]),
    }


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on a free port with version 1 of MODEL, and a client to it."""
    base = str(tmp_path_factory.mktemp("serving"))
    export_version(os.path.join(base, MODEL), 1, seed=1)
    server = ModelServer({MODEL: os.path.join(base, MODEL)}, port=0, poll_seconds=0.2).start()
    client = PredictClient(server.address, timeout=20.0)
    yield server, client
    client.close()
    server.stop(grace=0)


def assert_healthy(client: PredictClient) -> None:
    rows = client.recommend(MODEL, "U000001", history=["I001"], k=3)
    assert len(rows) == 3


def assert_error(code: grpc.StatusCode, *substrings: str):
    class _Check:
        def __enter__(self):
            return self

        def __exit__(self, kind, error, tb):
            assert kind is ServingError, f"expected ServingError, got {kind}: {error}"
            assert error.code == code, str(error)
            for s in substrings:
                assert s in error.message, f"{s!r} not in {error.message!r}"
            return True

    return _Check()


# -- round trips ------------------------------------------------------------------------

def test_serving_default_round_trip(served):
    server, client = served
    response = client.predict_response(MODEL, request_inputs(k=5, batch=2))
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    out = {n: tensors.from_proto(p) for n, p in response.outputs.items()}
    assert set(out) == {"item_ids", "scores", "titles"}
    assert out["item_ids"].shape == (2, 5) and out["scores"].dtype == np.float32
    assert np.all(np.diff(out["scores"], axis=1) <= 0)  # sorted descending
    # Row 0 excludes its history, row 1 does not ask to.
    assert not {b"I001", b"I002"} & set(out["item_ids"][0])

    rows = client.recommend(MODEL, "U000001", history=["I001", "I002"], query="red",
                            device="mobile", hour=20, k=4)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(r["item_id"] in ITEMS and r["title"].startswith("Item ") for r in rows)
    table = format_results(rows)
    assert "item_id" in table and rows[0]["item_id"] in table


def test_variable_k_pads_rows(served):
    _, client = served
    inputs = request_inputs(batch=2)
    inputs["k"] = np.array([2, 4], dtype=np.int32)
    out = client.predict(MODEL, inputs)
    assert out["item_ids"].shape == (2, 4)
    assert list(out["item_ids"][0][2:]) == [b"", b""]
    assert np.all(np.isneginf(out["scores"][0][2:]))


def test_similar_items_and_embeddings(served):
    _, client = served
    rows = client.similar_items(MODEL, "I003", k=5)
    assert len(rows) == 5 and "I003" not in {r["item_id"] for r in rows}

    out = client.predict(MODEL, {k: v for k, v in request_inputs().items()
                                 if k not in ("k", "exclude_seen")}, signature="query_embedding")
    assert out["embedding"].shape == (1, 8)
    out = client.predict(MODEL, {
        "item_id": np.array(["I001", "new"], dtype=object),
        "title": np.array(["a", "b"], dtype=object),
        "category": np.array(["c", "c"], dtype=object),
        "brand": np.array(["x", "y"], dtype=object),
        "price": np.array([9.5, 20.0], dtype=np.float32)}, signature="candidate_embedding")
    assert out["embedding"].shape == (2, 8)


def test_output_filter(served):
    _, client = served
    out = client.predict(MODEL, request_inputs(), output_filter=["item_ids"])
    assert set(out) == {"item_ids"}
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "nope", "item_ids"):
        client.predict(MODEL, request_inputs(), output_filter=["nope"])
    assert_healthy(client)
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "duplicate", "scores"):
        client.predict(MODEL, request_inputs(), output_filter=["scores", "item_ids", "scores"])
    assert_healthy(client)


def test_metadata_and_status(served):
    _, client = served
    meta = client.metadata(MODEL)
    assert set(meta) == {"serving_default", "query_embedding", "candidate_embedding",
                         "similar_items"}
    assert meta["serving_default"]["inputs"]["k"] == ("int32", (None,))
    assert meta["serving_default"]["inputs"]["history"] == ("string", (None, None))
    assert meta["serving_default"]["outputs"]["scores"] == ("float32", (None, None))

    # Raw response: a SignatureDefMap packed in Any, like TF Serving.
    stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = MODEL
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    assert response.metadata["signature_def"].Is(get_model_metadata_pb2.SignatureDefMap.DESCRIPTOR)

    assert client.status(MODEL) == [(1, "AVAILABLE")]
    assert client.wait_until_available(MODEL, timeout=5) == 1
    with assert_error(grpc.StatusCode.NOT_FOUND, "ranking"):
        client.status("ranking")


# -- errors -----------------------------------------------------------------------------

def test_error_statuses(served):
    _, client = served
    with assert_error(grpc.StatusCode.NOT_FOUND, "Servable not found", "Latest(ranking)"):
        client.predict("ranking", request_inputs())
    assert_healthy(client)
    with assert_error(grpc.StatusCode.NOT_FOUND, "Specific(retrieval, 7)"):
        client.predict(MODEL, request_inputs(), version=7)
    assert_healthy(client)
    with assert_error(grpc.StatusCode.FAILED_PRECONDITION, "nope", "similar_items"):
        client.predict(MODEL, request_inputs(), signature="nope")
    assert_healthy(client)
    # Client-sent names are cut in error messages: a 100 KB name does not come back.
    huge = "m" * 100_000
    for call, code in ((lambda: client.predict(huge, request_inputs()), "NOT_FOUND"),
                       (lambda: client.predict(MODEL, request_inputs(), signature=huge),
                        "FAILED_PRECONDITION")):
        with pytest.raises(ServingError) as caught:
            call()
        assert caught.value.code.name == code, caught.value
        assert "...(100000 chars)" in caught.value.message
        assert len(caught.value.message) < 1000
    assert_healthy(client)

    inputs = request_inputs()
    del inputs["exclude_seen"]
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "missing input", "exclude_seen",
                      "expected inputs"):
        client.predict(MODEL, inputs)
    assert_healthy(client)
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "unexpected input", "color"):
        client.predict(MODEL, {**request_inputs(), "color": np.array(["red"], dtype=object)})
    assert_healthy(client)

    inputs = request_inputs()
    inputs["k"] = np.array([5], dtype=np.int64)
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT,
                      "input 'k' has dtype DT_INT64 but signature expects DT_INT32"):
        client.predict(MODEL, inputs)
    assert_healthy(client)

    inputs = request_inputs()
    inputs["history"] = np.array(["I001", "I002"], dtype=object)  # rank 1, needs rank 2
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "input 'history'", "rank"):
        client.predict(MODEL, inputs)
    assert_healthy(client)

    for k in (0, NUM_ITEMS + 1):
        with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "k must be between 1 and 20"):
            client.predict(MODEL, request_inputs(k=k))
        assert_healthy(client)
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "unknown item id"):
        client.similar_items(MODEL, "I999", k=3)
    assert_healthy(client)


def test_batch_size_mismatch_and_internal_errors(served, monkeypatch):
    server, client = served
    inputs = request_inputs(batch=2)
    inputs["user_id"] = np.array(["U000001"], dtype=object)
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "same batch size", "user_id=1"):
        client.predict(MODEL, inputs)

    # A model failing with a non-TF exception answers INTERNAL; the server survives.
    manager = server.managers[MODEL]
    loaded = manager.get()

    def broken(**kwargs):
        raise RuntimeError("disk on fire")

    signature = dataclasses.replace(loaded.signatures["similar_items"], function=broken)
    patched = dataclasses.replace(
        loaded, signatures={**loaded.signatures, "similar_items": signature})
    monkeypatch.setattr(manager, "get", lambda version=None: patched)
    with assert_error(grpc.StatusCode.INTERNAL, "RuntimeError", "disk on fire"):
        client.similar_items(MODEL, "I001", k=2)
    monkeypatch.undo()
    assert_healthy(client)


def test_tensor_helpers():
    spec = tf.TensorSpec([None, 3], tf.float32)
    tensors.check_against_spec(tf.make_tensor_proto(np.zeros([2, 3], np.float32)), spec, "x")
    with pytest.raises(tensors.TensorError, match=r"shape \[2,4\] but signature expects \[\?,3\]"):
        tensors.check_against_spec(tf.make_tensor_proto(np.zeros([2, 4], np.float32)), spec, "x")
    # A single value fills the shape (what make_tensor_proto emits for a scalar + shape).
    filled = tensors.to_ndarray(tf.make_tensor_proto(7, dtype=tf.int32, shape=[3]), "k")
    assert filled.tolist() == [7, 7, 7]
    strings = tensors.to_ndarray(tf.make_tensor_proto(["a", ""]), "s")
    assert strings.tolist() == [b"a", b""]
    with pytest.raises(tensors.TensorError, match="no dtype"):
        tensors.to_ndarray(tensor_pb2.TensorProto(), "x")


def test_short_tf_message():
    from tfrec.serving.server import short_tf_message

    error = tf.errors.InvalidArgumentError(None, None, (
        "Graph execution error:\n\nDetected at node 'a/Assert' defined at (most recent call "
        "last):\n  File \"x.py\", line 3, in f\n    g()\nNode: 'a/Assert'\nassertion failed: "
        "[k must be between 1 and 20]\n\t [[{{node a/Assert}}]] [Op:__inference_f_12]"))
    assert short_tf_message(error) == "assertion failed: [k must be between 1 and 20]"


def test_malformed_tensor_and_unimplemented(served):
    _, client = served
    inputs = request_inputs()
    bad = tf.make_tensor_proto(np.array(["a", "b"], dtype=object))
    bad.tensor_shape.dim[0].size = 3  # 2 values for 3 elements
    inputs["user_id"] = bad
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "input 'user_id'", "holds 3"):
        client.predict(MODEL, inputs)
    inputs["user_id"] = np.array(["U000001"], dtype=object)
    bad = tf.make_tensor_proto(np.array([9], dtype=np.int64))
    bad.tensor_content = b"\x00" * 12  # 12 bytes for one int64
    inputs["hour"] = bad
    with assert_error(grpc.StatusCode.INVALID_ARGUMENT, "input 'hour'", "tensor_content"):
        client.predict(MODEL, inputs)
    assert_healthy(client)

    stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Predict" in info.value.details()
    models = model_service_pb2_grpc.ModelServiceStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_healthy(client)


def test_raw_request_defaults_to_serving_default(served):
    _, client = served
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL  # no signature_name, no version
    for name, value in request_inputs(k=2).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)
    response = stub.Predict(request, timeout=10)
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == 1


# -- hot version switch -----------------------------------------------------------------

def test_hot_swap_and_corrupt_version(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tfrec.serving")
    base = str(tmp_path / MODEL)
    export_version(base, 1, seed=1, title_prefix="Item")
    os.makedirs(os.path.join(base, ".tmp-in-progress"))  # ignored: not an integer name
    with ModelServer({MODEL: base}, port=0, poll_seconds=0.2) as server, \
            PredictClient(server.address, timeout=20.0) as client:
        assert client.recommend(MODEL, "U000001", k=3)[0]["title"].startswith("Item ")

        export_version(base, 2, seed=2, title_prefix="V2")

        def version():
            return client.predict_response(MODEL, request_inputs()).model_spec.version.value

        wait_for(lambda: version() == 2, timeout=15)
        rows = client.recommend(MODEL, "U000001", k=3)
        assert all(r["title"].startswith("V2 ") for r in rows)
        assert client.status(MODEL) == [(1, "END"), (2, "AVAILABLE")]
        with assert_error(grpc.StatusCode.NOT_FOUND, "Specific(retrieval, 1)"):
            client.predict(MODEL, request_inputs(), version=1)

        write_corrupt_version(base, 3)
        wait_for(lambda: dict(client.status(MODEL)).get(3) == "END", timeout=15)
        time.sleep(1.0)  # several polls: a failed version must not be retried
        failures = [r for r in caplog.records if "failed to load version 3" in r.getMessage()]
        assert len(failures) == 1
        assert version() == 2
        assert client.recommend(MODEL, "U000001", k=3)[0]["title"].startswith("V2 ")

        models = model_service_pb2_grpc.ModelServiceStub(client._channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL
        request.model_spec.version.value = 3
        status = models.GetModelStatus(request, timeout=5).model_version_status[0]
        assert status.status.error_code != 0 and "saved_model.pb" in status.status.error_message


# -- model manager and config -----------------------------------------------------------

def test_manager_start_errors_and_late_model(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelManager(MODEL, missing).start()
    empty = tmp_path / "empty"
    (empty / ".tmp-abc").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no servable version"):
        ModelManager(MODEL, str(empty)).start()
    write_corrupt_version(str(empty), 1)
    with pytest.raises(RuntimeError, match="load errors"):
        ModelManager(MODEL, str(empty), poll_seconds=0).start()

    # A server that fails to load its models releases the port it bound first.
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelServer({MODEL: missing}, port=port, poll_seconds=0).start()
    export_version(str(tmp_path / "good"), 1, seed=1)
    ModelServer({MODEL: str(tmp_path / "good")}, port=port, poll_seconds=0).start().stop(0)

    # Started before the first export: NOT_FOUND until a version appears.
    late = str(tmp_path / "late")
    with ModelServer({MODEL: late}, port=0, poll_seconds=0.2, require_models=False) as server, \
            PredictClient(server.address) as client:
        with assert_error(grpc.StatusCode.NOT_FOUND, "Latest(retrieval)"):
            client.predict(MODEL, request_inputs())
        export_version(late, 4, seed=4)
        assert client.wait_until_available(MODEL, timeout=15) == 4
        assert_healthy(client)


def test_manager_policies(tmp_path):
    base = str(tmp_path / MODEL)
    export_version(base, 1, seed=1)
    os.symlink(os.path.join(base, "1"), os.path.join(base, "2"))  # cheap second version
    latest = ModelManager(MODEL, base, poll_seconds=0).start()
    assert latest.versions() == [2] and latest.get().version == 2
    every = ModelManager(MODEL, base, poll_seconds=0, version_policy="all").start()
    assert every.versions() == [1, 2]
    pinned = ModelManager(MODEL, base, poll_seconds=0, version_policy="specific",
                          versions=[1]).start()
    assert pinned.versions() == [1]
    assert set(pinned.get(1).signatures) >= {"serving_default", "similar_items"}
    assert "serving_default" in pinned.get(1).signature_defs
    for manager in (latest, every, pinned):
        manager.stop()
    with pytest.raises(ValueError, match="version_policy"):
        ModelManager(MODEL, base, version_policy="newest")


def test_load_model_config(tmp_path):
    config = tmp_path / "models.config"
    config.write_text("""
model_config_list {
  config {
    name: "retrieval"
    base_path: "models/retrieval"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
  # config { name: "ranking" base_path: "/models/ranking" }
  config { name: "abs" base_path: "/srv/models/abs" }
}
""")
    assert load_model_config(str(config)) == {
        "retrieval": str(tmp_path / "models" / "retrieval"), "abs": "/srv/models/abs"}
    entry = parse_model_config(str(config))[0]
    assert (entry.version_policy, entry.num_versions) == ("latest", 2)

    repo_config = os.path.join(os.path.dirname(__file__), "..", "serving", "models.config")
    assert load_model_config(repo_config) == {"retrieval": "/models/retrieval",
                                              "ranker": "/models/ranker",
                                              "pipeline": "/models/pipeline"}

    config.write_text("model_config_list { config { name: 'x' base_pth: 'y' } }")
    with pytest.raises(ValueError, match="not a valid ModelServerConfig"):
        load_model_config(str(config))
    config.write_text("model_config_list { config { name: 'x' } }")
    with pytest.raises(ValueError, match="base_path is required"):
        load_model_config(str(config))
    with pytest.raises(FileNotFoundError):
        load_model_config(str(tmp_path / "nope.config"))


def test_exports_carry_warmup_requests_that_the_server_replays(tmp_path):
    """save_versioned writes TF Serving's warm-up file (a request per signature that
    answers a sample input); the server replays it before the version serves, and a
    warm-up request that fails keeps the version from loading, as in TF Serving."""
    from tensorflow_serving.apis import prediction_log_pb2

    from tfrec.export.versioned import save_versioned
    from tfrec.export.warmup import WARMUP_FILE, warmup_requests, write_warmup
    from tfrec.serving.model_manager import VersionState

    module = TinyRetrieval(seed=1)
    signatures = {"serving_default": module.serve.get_concrete_function(),
                  "similar_items": module.similar_items.get_concrete_function(),
                  "query_embedding": module.query_embedding.get_concrete_function(),
                  "candidate_embedding": module.candidate_embedding.get_concrete_function()}
    path = save_versioned(module, signatures, str(tmp_path), MODEL)
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in
               tf.data.TFRecordDataset(os.path.join(path, "assets.extra", WARMUP_FILE))]
    names = sorted(r.predict_log.request.model_spec.signature_name for r in records)
    # similar_items refuses the sample id "x" (unknown item): no warm-up request for it.
    assert names == ["candidate_embedding", "query_embedding", "serving_default"], names
    assert all(r.predict_log.request.model_spec.name == MODEL for r in records)

    base = str(tmp_path / MODEL)
    bad = warmup_requests(MODEL, {"serving_default": signatures["serving_default"]})
    bad[0].model_spec.signature_name = "nope"
    version = export_version(base, 2, seed=2)
    write_warmup(version, bad)
    server = ModelServer({MODEL: base}, port=0, poll_seconds=0).start()
    client = PredictClient(server.address, timeout=20.0)
    try:
        manager = server.managers[MODEL]
        assert manager.versions() == [1] and manager.get().warmup_requests == 3
        state = manager.version_states()[2]
        assert state.state == VersionState.END and "nope" in state.error_message, state
        assert_healthy(client)
    finally:
        client.close()
        server.stop(grace=0)


def test_version_directories_that_are_not_int64_are_ignored(tmp_path):
    """20 digits (beyond int64) and non-ASCII digits are not versions, as in TF Serving:
    the model keeps serving version 1 and its status stays readable."""
    base = str(tmp_path / MODEL)
    export_version(base, 1, seed=1)
    for name in ("9" * 20, "\u0661\u0662", "\uff13"):  # 20 nines, Arabic-Indic 12, fullwidth 3
        save_tiny_model(os.path.join(base, name), seed=2)
    server = ModelServer({MODEL: base}, port=0, poll_seconds=0.2).start()
    client = PredictClient(server.address, timeout=20.0)
    try:
        assert client.status(MODEL) == [(1, "AVAILABLE")]
        assert_healthy(client)
        export_version(base, 2, seed=3)  # a real new version is still picked up
        wait_for(lambda: dict(client.status(MODEL)).get(2) == "AVAILABLE", timeout=30)
        assert max(v for v, _ in client.status(MODEL)) == 2
        assert_healthy(client)
    finally:
        client.close()
        server.stop(grace=0)
    from tfrec.export.versioned import list_versions, next_version
    assert list_versions(base) == [1, 2] and next_version(base) == 3


def test_server_rejects_busy_port(served, tmp_path):
    server, _ = served
    other = ModelServer({MODEL: server.managers[MODEL].base_path}, port=server.port,
                        poll_seconds=0)
    with pytest.raises(OSError, match="cannot bind"):
        other.start()
    # The port is checked before any model loads: a base path with no version at all
    # still fails on the port, at once.
    empty = str(tmp_path)
    late = ModelServer({MODEL: empty}, port=server.port, poll_seconds=0)
    with pytest.raises(OSError, match="cannot bind"):
        late.start()
