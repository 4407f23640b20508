"""Small helpers shared by test modules."""

import time


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05):
    """Polls `condition` until it returns something truthy (returned), or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def serve_models(models: dict, timeout: float = 60.0):
    """Generator for module fixtures: a real server on 127.0.0.1 and a client to it.

    Args:
      models: model name -> `<base>/<name>` directory of versions.
      timeout: client deadline per call, seconds.
    """
    from tfrec.serving import ModelServer, PredictClient

    server = ModelServer(models, port=0, poll_seconds=0).start()
    client = PredictClient(server.address, timeout=timeout)
    try:
        yield client
    finally:
        client.close()
        server.stop(grace=0)


def assert_invalid_argument(call, *substrings):
    """`call()` fails with gRPC INVALID_ARGUMENT whose message holds every substring."""
    import grpc
    import pytest

    from tfrec.serving import ServingError

    with pytest.raises(ServingError) as info:
        call()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT, str(info.value)
    for s in substrings:
        assert s in info.value.message, f"{s!r} not in {info.value.message!r}"


def small_run_config(data_dir: str, work, run_name: str):
    """Config of a small, fast retrieval run on the world in `data_dir`, writing under
    the directory `work` (a pathlib.Path)."""
    from tfrec.config import Config

    cfg = Config()
    cfg.data.data_dir = data_dir
    cfg.data.tfrecord_dir = str(work / "tfrecords")
    cfg.data.num_shards = 2
    cfg.train.checkpoint_dir = str(work / "checkpoints")
    cfg.train.log_dir = str(work / "tensorboard_logs")
    cfg.train.epochs = 4
    cfg.train.batch_size = 256
    cfg.train.run_name = run_name
    cfg.export.base_dir = str(work / "models")
    return cfg


_FRESH_SIGNATURE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  (the text ops TF Serving links)

path, name, inputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
signature = tf.saved_model.load(path).signatures[name]
specs = signature.structured_input_signature[1]
out = signature(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()})
print("RESULT" + json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


def fresh_signature(path: str, name: str, inputs: dict, timeout: float = 300.0) -> dict:
    """Outputs (numpy arrays) of signature `name` of the SavedModel at `path`, loaded in a
    fresh process with TensorFlow and TF Text only; `inputs` are JSON-able lists."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np

    out = subprocess.run([sys.executable, "-c", _FRESH_SIGNATURE, path, name, json.dumps(inputs)],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    return {k: np.array(v) for k, v in json.loads(out.stdout.split("RESULT", 1)[1]).items()}
