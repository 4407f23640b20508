"""Reliability of the embedded model server under bad input, concurrency and change.

Runs the real exported retrieval model over real gRPC on loopback: a bad-input sweep,
server-side batching (same answers, merged batches, error isolation), hot reload under
load, refused partial versions, deadlines and the /metrics endpoint. Traffic is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import tfrec  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tfrec.serving import ModelServer, PredictClient, ServingError
from tfrec.serving.batching import (
    BatchError,
    Batcher,
    BatchingOptions,
    parse_batching_parameters,
)
from tfrec.serving.monitoring import UNKNOWN, parse_exposition
from tests.helpers import wait_for

MODEL = "retrieval"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OK, INVALID, NOT_FOUND = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.NOT_FOUND)
# Batches wait up to 100 ms: long enough for concurrent test threads to meet in one.
TEST_BATCHING = BatchingOptions(max_batch_size=8, batch_timeout_micros=100_000,
                                num_batch_threads=2, pad_variable_length_inputs=True)


# -- helpers ----------------------------------------------------------------------------

def strings(*values) -> np.ndarray:
    return np.array(values, dtype=object)


def recommend_inputs(user="U000001", history=("",), query="", device="mobile", hour=9, k=5,
                     exclude_seen=True, rows=1):
    return {
        "user_id": strings(*[user] * rows),
        "history": np.array([list(history)] * rows, dtype=object),
        "query": strings(*[query] * rows),
        "device": strings(*[device] * rows),
        "hour": np.full([rows], hour, dtype=np.int64),
        "k": np.full([rows], k, dtype=np.int32),
        "exclude_seen": np.full([rows], exclude_seen),
    }


def copy_version(source: str, base: str, version: int) -> str:
    """Copies a version directory into place atomically, as `tfrec export` writes one."""
    os.makedirs(base, exist_ok=True)
    tmp = os.path.join(base, f".tmp-copy-{version}")
    shutil.copytree(source, tmp)
    final = os.path.join(base, str(version))
    os.rename(tmp, final)
    return final


def scrape(server: ModelServer) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_exposition(response.read().decode("utf-8"))


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def merged_batches(samples: dict, signature: str = "serving_default") -> float:
    """Model calls that served more than one request."""
    labels = dict(model=MODEL, signature=signature)
    return (sample(samples, "tfrec_serving_batch_requests_count", **labels)
            - sample(samples, "tfrec_serving_batch_requests_bucket", le="1", **labels))


def status_of(call) -> tuple:
    """(code, message) of a call; OK with "" when it succeeds."""
    try:
        call()
    except ServingError as e:
        return e.code, e.message
    return OK, ""


def assert_healthy(client: PredictClient, items) -> None:
    rows = client.recommend(MODEL, "U000001", history=[items[0]], k=3)
    assert len(rows) == 3 and rows[0]["item_id"] in set(items)


def assert_same_answers(got: dict, want: dict) -> None:
    """Ids and titles identical; scores equal up to float summation order."""
    assert set(got) == set(want)
    for name in ("item_ids", "titles"):
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_facts(tiny_world):
    items = list(tiny_world.catalog["item_id"].astype(str))
    users = list(tiny_world.users["user_id"].astype(str))
    return items, users


@pytest.fixture(scope="module")
def model_base(exported_model, tmp_path_factory) -> str:
    """A private base path holding the exported model as version 1."""
    base = str(tmp_path_factory.mktemp("reliability") / MODEL)
    copy_version(exported_model, base, 1)
    return base


def _server(base: str, **kwargs) -> ModelServer:
    kwargs.setdefault("max_message_mb", 12)
    return ModelServer({MODEL: base}, port=0, poll_seconds=0, monitoring_port=0,
                       **kwargs).start()


@pytest.fixture(scope="module")
def plain(model_base):
    server = _server(model_base)
    client = PredictClient(server.address, timeout=30.0)
    yield server, client
    client.close()
    server.stop(grace=0)


@pytest.fixture(scope="module")
def batched(model_base):
    server = _server(model_base, batching=TEST_BATCHING, max_workers=16)
    client = PredictClient(server.address, timeout=30.0)
    yield server, client
    client.close()
    server.stop(grace=0)


# -- bad input sweep ----------------------------------------------------------------------

def _raw_predict(client: PredictClient, **spec) -> None:
    """Predict with model_spec fields PredictClient does not expose (version_label)."""
    request = predict_pb2.PredictRequest()
    for field, value in spec.items():
        if field == "version_label":
            request.model_spec.version_label = value
        else:
            setattr(request.model_spec, field, value)
    for name, value in recommend_inputs().items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)
    try:
        stub.Predict(request, timeout=30)
    except grpc.RpcError as e:
        raise ServingError(e.code(), e.details() or "") from None


def bad_input_cases(items, num_items):
    """(name, call(client), expected code, substrings of the message)."""
    good = recommend_inputs(history=(items[0], items[1]))

    def with_(signature="serving_default", **changes):
        inputs = {**good, **changes}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return lambda c: c.predict(MODEL, inputs, signature=signature)

    def candidate(**changes):
        inputs = {"item_id": strings(items[0]), "title": strings("red shoe"),
                  "category": strings("shoes"), "brand": strings("acme"),
                  "price": np.array([9.5], np.float32), **changes}
        return lambda c: c.predict(MODEL, inputs, signature="candidate_embedding")

    def similar(item, k):
        return lambda c: c.predict(MODEL, {"item_id": strings(item),
                                           "k": np.array([k], np.int32)},
                                   signature="similar_items")

    malformed = tf.make_tensor_proto(strings("a", "b"))
    malformed.tensor_shape.dim[0].size = 3  # 2 values for 3 elements
    ten_mb = "x" * (10 * 1024 * 1024)
    return [
        ("k int64", with_(k=np.array([5], np.int64)), INVALID, ["input 'k'", "DT_INT64"]),
        ("hour int32", with_(hour=np.array([9], np.int32)), INVALID, ["input 'hour'", "DT_INT64"]),
        ("user_id number", with_(user_id=np.array([7], np.int64)), INVALID, ["input 'user_id'"]),
        ("exclude_seen int", with_(exclude_seen=np.array([1], np.int32)), INVALID,
         ["input 'exclude_seen'", "DT_BOOL"]),
        ("price float64", candidate(price=np.array([9.5], np.float64)), INVALID,
         ["input 'price'", "DT_DOUBLE"]),
        ("history rank 1", with_(history=strings(items[0])), INVALID, ["input 'history'", "rank"]),
        ("user_id rank 2", with_(user_id=np.array([["U1"]], object)), INVALID,
         ["input 'user_id'", "rank"]),
        ("k scalar", with_(k=np.array(5, np.int32)), INVALID, ["input 'k'", "rank"]),
        ("batch sizes differ", with_(device=strings("mobile", "desktop")), INVALID,
         ["same batch size", "device=2"]),
        ("empty batch", with_(**{n: v[:0] for n, v in good.items()}), INVALID, ["batch size 0"]),
        ("missing input", with_(exclude_seen=None), INVALID, ["missing input", "exclude_seen"]),
        ("unexpected input", with_(color=strings("red")), INVALID, ["unexpected input", "color"]),
        ("malformed tensor", with_(user_id=malformed), INVALID, ["input 'user_id'", "holds 3"]),
        ("unknown signature", with_(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION,
         ['"nope"', "similar_items"]),
        ("unknown model", lambda c: c.predict("ranking", good), NOT_FOUND,
         ["Servable not found", "Latest(ranking)"]),
        ("unknown version", lambda c: c.predict(MODEL, good, version=99), NOT_FOUND,
         ["Specific(retrieval, 99)"]),
        ("version label", lambda c: _raw_predict(c, name=MODEL, version_label="stable"), INVALID,
         ["version_label"]),
        ("unknown output", lambda c: c.predict(MODEL, good, output_filter=["nope"]), INVALID,
         ["nope", "item_ids"]),
        ("empty strings", with_(user_id=strings(""), query=strings(""), device=strings(""),
                                history=np.array([["", ""]], object)), OK, []),
        ("10 MB query", with_(query=strings(ten_mb)), INVALID,
         ["input 'query'", "10485760 bytes", "max_string_bytes"]),
        ("message over 12 MiB", with_(query=strings("y" * (13 * 1024 * 1024))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),
        # 40-byte protos declaring huge shapes with one broadcast value: refused from the
        # header (before, [100000] rows cost ~27 s and 4 GB).
        ("100000 rows from one value", with_(user_id=tf.make_tensor_proto("U1", shape=[100000])),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["input 'user_id'", "100000 rows",
                                              "max_request_rows"]),
        ("5M elements from one value",
         with_(history=tf.make_tensor_proto(items[0], shape=[1, 5_000_000])),
         grpc.StatusCode.RESOURCE_EXHAUSTED, ["input 'history'", "5000000 elements",
                                              "max_tensor_elements"]),
        ("k = 0", with_(k=np.array([0], np.int32)), INVALID, ["k must be >= 1"]),
        ("k < 0", with_(k=np.array([-3], np.int32)), INVALID, ["k must be >= 1"]),
        ("k > catalog", with_(k=np.array([num_items + 1], np.int32)), INVALID,
         [f"k must be <= {num_items}"]),
        ("similar k = 0", similar(items[0], 0), INVALID, ["k must be >= 1"]),
        ("similar unknown item", similar("I_NOPE", 3), INVALID, ["unknown item_id"]),
        ("NaN price", candidate(price=np.array([np.nan], np.float32)), INVALID,
         ["input 'price'", "nan", "non-finite"]),
        ("Inf price", candidate(price=np.array([np.inf], np.float32)), INVALID,
         ["input 'price'", "non-finite"]),
    ]


@pytest.mark.parametrize("mode", ["plain", "batched"])
def test_bad_input_sweep(mode, request, world_facts):
    server, client = request.getfixturevalue(mode)
    items, _ = world_facts
    failures = []
    for name, call, code, substrings in bad_input_cases(items, len(items)):
        got, message = status_of(lambda: call(client))
        if got != code or any(s not in message for s in substrings):
            failures.append(f"{name}: expected {code.name} with {substrings}, got "
                            f"{got.name}: {message[:300]}")
        assert_healthy(client, items)  # the server keeps answering good requests
    assert not failures, "\n".join(failures)


# -- batching ---------------------------------------------------------------------------

def _request_pool(items, users, n, seed=0):
    """Mixed requests: history widths 1-4, k 5 or 10, some searches, some 2-row batches."""
    rng = np.random.default_rng(seed)
    pool = []
    for i in range(n):
        rows = 2 if i % 5 == 0 else 1
        width = 1 + i % 4
        pool.append({
            "user_id": strings(*rng.choice(users, rows)),
            "history": np.array([list(rng.choice(items, width)) for _ in range(rows)], object),
            "query": strings(*(["running shoes" if i % 3 == 0 else ""] * rows)),
            "device": strings(*(["mobile" if i % 2 else "desktop"] * rows)),
            "hour": np.full([rows], i % 24, np.int64),
            "k": np.full([rows], 5 if i % 2 else 10, np.int32),
            "exclude_seen": np.full([rows], i % 4 != 1),
        })
    return pool


def _concurrently(address: str, jobs, threads: int):
    """Runs job(client) callables on `threads` threads, each with its own channel.

    Returns the results (or ServingError) in job order.
    """
    results = [None] * len(jobs)
    barrier = threading.Barrier(threads)

    def worker(t):
        with PredictClient(address, timeout=60.0) as client:
            barrier.wait()
            for i in range(t, len(jobs), threads):
                try:
                    results[i] = jobs[i](client)
                except ServingError as e:
                    results[i] = e

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "client threads hung"
    return results


def test_batching_gives_the_same_answers(plain, batched, world_facts):
    items, users = world_facts
    _, plain_client = plain
    server, _ = batched
    pool = _request_pool(items, users, 48)
    expected = [plain_client.predict(MODEL, inputs) for inputs in pool]
    before = scrape(server)
    got = _concurrently(server.address, [lambda c, x=x: c.predict(MODEL, x) for x in pool], 8)
    for want, answer in zip(expected, got):
        assert not isinstance(answer, ServingError), answer
        assert_same_answers(answer, want)
    after = scrape(server)
    assert merged_batches(after) - merged_batches(before) > 0, "no request was merged"
    ok = dict(method="Predict", model=MODEL, signature="serving_default", code="OK")
    assert sample(after, "tfrec_serving_requests_total", **ok) - sample(
        before, "tfrec_serving_requests_total", **ok) == len(pool)
    rows = dict(model=MODEL, signature="serving_default")
    assert sample(after, "tfrec_serving_batch_size_sum", **rows) - sample(
        before, "tfrec_serving_batch_size_sum", **rows) == sum(len(x["k"]) for x in pool)


def test_bad_request_inside_a_batch_fails_alone(plain, batched, world_facts):
    items, _ = world_facts
    _, plain_client = plain
    server, client = batched

    def similar(ids, ks):
        return {"item_id": strings(*ids), "k": np.array(ks, np.int32)}

    good = [similar([items[i]], [5]) for i in range(2, 7)]
    bad = [similar(["I_NOPE"], [5]), similar([items[0], items[1]], [0, 5])]
    jobs = good + bad  # 8 rows with the same largest k: one full batch when merged
    expected = [plain_client.predict(MODEL, x, signature="similar_items") for x in good]
    for attempt in range(3):  # normally merged on the first try; threads may straggle
        before = server.metrics.batch_retries.value(MODEL, "similar_items")
        got = _concurrently(server.address, [
            lambda c, x=x: c.predict(MODEL, x, signature="similar_items") for x in jobs],
            len(jobs))
        for want, answer in zip(expected, got[:len(good)]):
            assert not isinstance(answer, ServingError), answer
            assert_same_answers(answer, want)
        assert isinstance(got[-2], ServingError) and got[-2].code == INVALID
        assert "unknown item_id" in got[-2].message
        assert isinstance(got[-1], ServingError) and got[-1].code == INVALID
        assert "k must be >= 1" in got[-1].message
        if server.metrics.batch_retries.value(MODEL, "similar_items") > before:
            break
    else:
        pytest.fail("the bad requests never shared a batch with good ones")
    assert_healthy(client, items)


# -- deadlines --------------------------------------------------------------------------

def test_deadlines(plain, batched, world_facts, monkeypatch):
    items, _ = world_facts
    for server, client in (plain, batched):
        code, _ = status_of(lambda: client.predict(MODEL, recommend_inputs(), timeout=0.0005))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert_healthy(client, items)

    # A request alone in its batch waits for the batch timeout (3 s here): its 0.5 s
    # deadline expires in the queue and the server answers DEADLINE_EXCEEDED itself.
    server, client = batched
    monkeypatch.setattr(server.batcher, "options",
                        dataclasses.replace(TEST_BATCHING, batch_timeout_micros=3_000_000))
    labels = ("Predict", MODEL, "serving_default", "DEADLINE_EXCEEDED")
    before = server.metrics.requests.value(*labels)
    start = time.monotonic()
    code, _ = status_of(lambda: client.predict(MODEL, recommend_inputs(k=7), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 2.5
    wait_for(lambda: server.metrics.requests.value(*labels) > before, timeout=5)
    monkeypatch.undo()
    assert_healthy(client, items)


def test_a_cancelled_call_is_not_counted_ok(batched, world_facts, monkeypatch):
    """The client cancels while its request waits for a batch; the server finishes the
    work later, and must count the call CANCELLED, not OK (the batcher already did; the
    same guard now covers every handler)."""
    items, _ = world_facts
    server, client = batched
    monkeypatch.setattr(server.batcher, "options",
                        dataclasses.replace(TEST_BATCHING, batch_timeout_micros=1_500_000))
    labels = ("Predict", MODEL, "serving_default")
    before = {c: server.metrics.requests.value(*labels, c) for c in ("OK", "CANCELLED")}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    for name, value in recommend_inputs(k=6).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)
    future = stub.Predict.future(request, timeout=30)
    time.sleep(0.3)  # in the batch queue by now
    assert future.cancel()
    wait_for(lambda: server.metrics.requests.value(*labels, "CANCELLED") > before["CANCELLED"],
             timeout=10)
    assert server.metrics.requests.value(*labels, "OK") == before["OK"]
    monkeypatch.undo()
    assert_healthy(client, items)


# -- metrics --------------------------------------------------------------------------------

def test_metrics_count_the_requests_sent(plain, world_facts):
    items, _ = world_facts
    server, client = plain
    before = scrape(server)
    for i in range(5):
        client.recommend(MODEL, "U000001", history=[items[i]], k=3)
    for i in range(3):
        client.similar_items(MODEL, items[i], k=2)
    for _ in range(2):
        status_of(lambda: client.predict(MODEL, recommend_inputs(k=0)))
    status_of(lambda: client.predict("nope", recommend_inputs()))
    status_of(lambda: client.predict(MODEL, recommend_inputs(), signature="nope"))
    client.status(MODEL)
    after = scrape(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "tfrec_serving_requests_total"
    predict = dict(method="Predict", model=MODEL)
    assert delta(requests, **predict, signature="serving_default", code="OK") == 5
    assert delta(requests, **predict, signature="similar_items", code="OK") == 3
    assert delta(requests, **predict, signature="serving_default", code="INVALID_ARGUMENT") == 2
    assert delta(requests, method="Predict", model=UNKNOWN, signature=UNKNOWN,
                 code="NOT_FOUND") == 1
    assert delta(requests, **predict, signature=UNKNOWN, code="FAILED_PRECONDITION") == 1
    assert delta(requests, method="GetModelStatus", model=MODEL, signature="", code="OK") == 1
    assert delta("tfrec_serving_request_latency_seconds_count", **predict,
                 signature="serving_default") == 7
    assert delta("tfrec_serving_request_latency_seconds_bucket", **predict,
                 signature="serving_default", le="+Inf") == 7
    # Without batching every successful model call serves one request.
    assert delta("tfrec_serving_batch_requests_bucket", model=MODEL,
                 signature="serving_default", le="1") == 5
    assert sample(after, "tfrec_serving_model_version", model=MODEL) == 1
    assert sample(after, "tfrec_serving_model_versions_failed", model=MODEL) == 0

    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert error.value.code == 404


def test_reply_over_the_message_limit_is_refused_and_counted(model_base, world_facts):
    """A reply gRPC cannot send is RESOURCE_EXHAUSTED with the limit named, and the
    metrics count it so (they counted OK while the client got an error)."""
    items, _ = world_facts
    server = _server(model_base, max_message_mb=2 / 1024)  # 2 KiB: requests fit, big replies not
    client = PredictClient(server.address, timeout=30.0)
    try:
        client.recommend(MODEL, "U000001", history=[items[0]], k=2)  # small: fine
        before = scrape(server)
        code, message = status_of(lambda: client.predict(
            MODEL, recommend_inputs(k=50, rows=4)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
        assert "max_message_mb" in message and "output_filter" in message
        after = scrape(server)
        labels = dict(method="Predict", model=MODEL, signature="serving_default")
        for name, want in (("OK", 0), ("RESOURCE_EXHAUSTED", 1)):
            got = (sample(after, "tfrec_serving_requests_total", **labels, code=name)
                   - sample(before, "tfrec_serving_requests_total", **labels, code=name))
            assert got == want, (name, got)
    finally:
        client.close()
        server.stop(grace=0)


# -- hot reload under load ------------------------------------------------------------------

def test_hot_reload_under_load_and_refused_versions(exported_model, tmp_path, world_facts):
    items, _ = world_facts
    base = str(tmp_path / MODEL)
    copy_version(exported_model, base, 1)
    server = ModelServer({MODEL: base}, port=0, poll_seconds=0.2, monitoring_port=0,
                         batching=BatchingOptions(max_batch_size=8, batch_timeout_micros=2000,
                                                  num_batch_threads=2)).start()
    stop = threading.Event()
    seen = [[] for _ in range(2)]  # client threads: continuous, but leave CPU to the loader
    errors = []

    def traffic(t):
        with PredictClient(server.address, timeout=60.0) as client:
            n = 0
            while not stop.is_set():
                inputs = recommend_inputs(user=f"U{n % 50:06d}", history=(items[n % 20],), k=5)
                try:
                    response = client.predict_response(MODEL, inputs)
                except ServingError as e:
                    errors.append(e)
                else:
                    seen[t].append(response.model_spec.version.value)
                n += 1
                time.sleep(0.002)

    threads = [threading.Thread(target=traffic, args=(t,)) for t in range(len(seen))]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(seen), timeout=30)

        copy_version(exported_model, base, 2)  # a new export appears under load
        wait_for(lambda: all(s and s[-1] == 2 for s in seen), timeout=60)

        # A version copied without its variables (an interrupted copy) and one with a
        # garbage saved_model.pb are refused; version 2 keeps serving.
        partial = os.path.join(base, "3")
        os.makedirs(partial)
        shutil.copy(os.path.join(exported_model, "saved_model.pb"), partial)
        garbage = os.path.join(base, ".tmp-garbage")
        os.makedirs(os.path.join(garbage, "variables"))
        with open(os.path.join(garbage, "saved_model.pb"), "wb") as f:
            f.write(b"\x00not a SavedModel\xff" * 64)
        os.rename(garbage, os.path.join(base, "4"))
        with PredictClient(server.address, timeout=30.0) as client:
            wait_for(lambda: dict(client.status(MODEL)) == {
                1: "END", 2: "AVAILABLE", 3: "END", 4: "END"}, timeout=30)
            states = server.managers[MODEL].version_states()
            assert "incomplete version directory" in states[3].error_message
            assert "saved_model.pb" in states[4].error_message
            mark = [len(s) for s in seen]
            wait_for(lambda: all(len(s) > m + 3 for s, m in zip(seen, mark)), timeout=30)
            assert all(set(s[m:]) == {2} for s, m in zip(seen, mark))
            samples = scrape(server)
            assert sample(samples, "tfrec_serving_model_version", model=MODEL) == 2
            assert sample(samples, "tfrec_serving_model_versions_failed", model=MODEL) == 2

            # Finishing the interrupted copy changes its files: it is retried and served.
            shutil.rmtree(os.path.join(base, "4"))
            for name in os.listdir(exported_model):
                source, target = os.path.join(exported_model, name), os.path.join(partial, name)
                if os.path.isdir(source):
                    shutil.copytree(source, target)
                elif not os.path.exists(target):
                    shutil.copy(source, target)
            wait_for(lambda: all(s[-1] == 3 for s in seen), timeout=60)
            assert_healthy(client, items)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        server.stop(grace=0)
    assert not errors, f"{len(errors)} failed requests during reload, first: {errors[0]}"
    for versions in seen:
        assert versions == sorted(versions), "a client went back to an older version"
        assert {1, 2, 3} <= set(versions)


# -- batcher, batching parameters, CLI ------------------------------------------------------

def _echo(inputs):
    """A fake model: rows times two, and the width of `history`."""
    x = inputs["x"]
    return {"y": x * 2, "width": np.full([len(x)], inputs["history"].shape[1])}


def test_batcher_merges_pads_and_isolates_errors():
    calls = []

    def run(inputs):
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return _echo(inputs)

    retries = []
    options = BatchingOptions(max_batch_size=8, batch_timeout_micros=200_000,
                              num_batch_threads=1, pad_variable_length_inputs=True)
    batcher = Batcher(options, on_retry=retries.append).start()
    try:
        group = ("m", 1, "sig")

        def submit(x, width=1, k=5):
            return batcher.submit(group, {"x": np.array(x), "k": np.full(len(x), k, np.int32),
                                          "history": np.full((len(x), width), b"a", object)},
                                  run)

        tasks = [submit([1], 1), submit([2, 3], 3), submit([4], 1, k=9)]
        for task in tasks:
            assert task.wait(10)
        assert tasks[0].result()["y"].tolist() == [2]
        assert tasks[0].result()["width"].tolist() == [3]  # merged: padded to the widest
        assert tasks[1].result()["y"].tolist() == [4, 6]
        assert tasks[2].result()["y"].tolist() == [8]  # another largest k: its own batch
        assert sorted(calls) == [1, 3] and not retries

        calls.clear()
        tasks = [submit([1]), submit([-1]), submit([2, 3])]
        for task in tasks:
            assert task.wait(10)
        with pytest.raises(ValueError, match="negative"):
            tasks[1].result()
        assert tasks[0].result()["y"].tolist() == [2]
        assert tasks[2].result()["y"].tolist() == [4, 6]
        assert retries == [group]
        assert calls == [4, 1, 1, 2]  # the merged call failed: each request re-run alone

        # A request bigger than max_batch_size runs alone.
        big = submit(list(range(20)))
        assert big.wait(10) and len(big.result()["y"]) == 20
    finally:
        batcher.stop()


def test_batcher_deadline_queue_full_and_stop():
    release = threading.Event()

    def slow(inputs):
        release.wait(10)
        return {"y": inputs["x"]}

    options = BatchingOptions(max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1,
                              num_batch_threads=1)
    batcher = Batcher(options).start()
    group = ("m", 1, "sig")
    try:
        first = batcher.submit(group, {"x": np.array([1])}, slow)
        wait_for(lambda: batcher.queued_requests() == 0, timeout=5)  # first is running
        expired = batcher.submit(group, {"x": np.array([2])}, slow,
                                 deadline=time.monotonic() + 0.05)
        with pytest.raises(BatchError) as full:
            batcher.submit(group, {"x": np.array([3])}, slow)
        assert full.value.code == grpc.StatusCode.UNAVAILABLE
        assert "max_enqueued_batches" in full.value.message
        time.sleep(0.1)
        release.set()
        assert first.wait(10) and first.result()["y"].tolist() == [1]
        assert expired.wait(10)
        with pytest.raises(BatchError) as late:
            expired.result()
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        release.clear()
        batcher.submit(group, {"x": np.array([4])}, slow)
        wait_for(lambda: batcher.queued_requests() == 0, timeout=5)
        queued = batcher.submit(group, {"x": np.array([5])}, slow)
        threading.Timer(0.2, release.set).start()
    finally:
        batcher.stop()
    assert queued.wait(1)
    with pytest.raises(BatchError, match="shutting down"):
        queued.result()


def test_batching_parameters_file(tmp_path):
    options = parse_batching_parameters(os.path.join(REPO, "serving", "batching_parameters.txt"))
    assert options == BatchingOptions(max_batch_size=64, batch_timeout_micros=2000,
                                      num_batch_threads=4, max_enqueued_batches=100,
                                      pad_variable_length_inputs=True)
    path = tmp_path / "batching.txt"
    path.write_text("# comment\nmax_batch_size { value: 16 }\nallowed_batch_sizes: 8\n"
                    "allowed_batch_sizes: 16\n")
    assert parse_batching_parameters(str(path)).max_batch_size == 16
    path.write_text("max_batch_sise { value: 16 }\n")
    with pytest.raises(ValueError, match="max_batch_sise.*known fields"):
        parse_batching_parameters(str(path))
    path.write_text("num_batch_threads { value: 0 }\n")
    with pytest.raises(ValueError, match="num_batch_threads must be >= 1"):
        parse_batching_parameters(str(path))
    with pytest.raises(FileNotFoundError):
        parse_batching_parameters(str(tmp_path / "missing.txt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_with_batching_and_metrics(model_base, world_facts, monkeypatch, capsys):
    """`tfrec serve` flags, in process: the checks run where the command waits for Ctrl-C."""
    from tfrec import cli

    items, _ = world_facts
    port, metrics_port = _free_port(), _free_port()
    checked = []

    def while_serving():
        with PredictClient(f"127.0.0.1:{port}", timeout=30.0) as client:
            assert_healthy(client, items)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            samples = parse_exposition(response.read().decode())
        assert sample(samples, "tfrec_serving_requests_total", method="Predict", model=MODEL,
                      signature="serving_default", code="OK") == 1
        assert sample(samples, "tfrec_serving_model_version", model=MODEL) == 1
        checked.append(True)

    monkeypatch.setattr(cli, "_wait_for_stop", while_serving)
    code = cli.main(["serve", "--base-dir", os.path.dirname(model_base), "--model-name", MODEL,
                     "--port", str(port), "--poll-seconds", "0", "--max-message-mb", "8",
                     "--batching-parameters-file",
                     os.path.join(REPO, "serving", "batching_parameters.txt"),
                     "--monitoring-port", str(metrics_port)])
    out = capsys.readouterr().out
    assert code == 0 and checked
    assert "batching: max_batch_size=64 batch_timeout_micros=2000" in out
    assert f"metrics at http://127.0.0.1:{metrics_port}/metrics" in out


# -- abandoned work ---------------------------------------------------------------------

class _CostlyModel(tf.Module):
    """A signature whose cost the request sets: `steps` matmul rounds over `x`."""

    @tf.function(input_signature=[tf.TensorSpec([None, 128], tf.float32),
                                  tf.TensorSpec([None], tf.int32)])
    def serve(self, x, steps):
        def body(i, y):
            return i + 1, tf.tanh(tf.matmul(y, tf.ones([128, 128])) / 128.0)
        _, y = tf.while_loop(lambda i, y: i < tf.reduce_max(steps), body, (0, x))
        return {"y": y}


@pytest.fixture(scope="module")
def costly_model(tmp_path_factory) -> str:
    base = str(tmp_path_factory.mktemp("costly"))
    module = _CostlyModel()
    tf.saved_model.save(module, os.path.join(base, "1"),
                        signatures={"serving_default": module.serve})
    return base


def costly_inputs(steps: int) -> dict:
    return {"x": np.ones([16, 128], np.float32), "steps": np.full([16], steps, np.int32)}


@pytest.mark.parametrize("batching", [None, dataclasses.replace(
    TEST_BATCHING, batch_timeout_micros=1000, width_inputs=("steps",))], ids=["plain", "batched"])
def test_abandoned_calls_stop(costly_model, batching):
    """Eight clients with short deadlines send requests that cost seconds each; their
    model calls stop when the deadlines pass, so a cheap request behind them is answered
    at once (before: it waited for all eight calls to run to the end)."""
    with ModelServer({"costly": costly_model}, port=0, max_workers=2, poll_seconds=0,
                     batching=batching) as server, PredictClient(server.address) as client:
        client.predict("costly", costly_inputs(1), timeout=30)  # warm
        steps = 2000
        start = time.monotonic()
        client.predict("costly", costly_inputs(steps), timeout=60)
        while time.monotonic() - start < 1.0:  # make one costly call take >= 1 s
            steps *= 2
            start = time.monotonic()
            client.predict("costly", costly_inputs(steps), timeout=60)
        costly_seconds = time.monotonic() - start

        codes = []
        threads = [threading.Thread(target=lambda: codes.append(status_of(
            lambda: client.predict("costly", costly_inputs(steps), timeout=0.2))[0]))
            for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(0.1)
        start = time.monotonic()
        client.predict("costly", costly_inputs(1), timeout=60)
        cheap_seconds = time.monotonic() - start
        for thread in threads:
            thread.join(60)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 8
        # Before, the cheap call waited for 8 costly calls on 2 threads (>= 4 costly_seconds).
        assert cheap_seconds < costly_seconds, (cheap_seconds, costly_seconds)
        wait_for(lambda: server.metrics.abandoned.value("costly", "serving_default") >= 1,
                 timeout=10)
