"""tf.distribute strategy selection from config, and device set-up.

Device layout (logical CPUs, mixed precision) must be fixed before TensorFlow creates
its runtime, so `configure_devices` runs first thing in a training process. Multi-worker
and parameter-server clusters come from TF_CONFIG (set by a scheduler, or by
`tfrec.training.cluster` for local clusters).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Tuple

import tfrec  # noqa: F401
import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "parameter_server", "tpu")
PS_MIN_SHARD_BYTES = 256 << 10  # TF's default: smaller variables stay whole on one PS


def configure_devices(cpu_devices: int = 0) -> None:
    """Splits the CPU into `cpu_devices` logical devices (>1), e.g. to test Mirrored.

    Args:
      cpu_devices: number of logical CPU devices; 0 or 1 leaves the CPU as one device.
    """
    if cpu_devices and cpu_devices > 1:
        cpus = tf.config.list_physical_devices("CPU")
        try:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
        except RuntimeError as e:
            raise RuntimeError(
                "logical CPU devices must be configured before TensorFlow is initialised; "
                "pass --cpu-devices on a fresh process") from e


def resolve_precision(mode: str = "auto") -> str:
    """The towers' dtype policy: mixed_float16 on GPUs (auto), float32 otherwise.

    Args:
      mode: "auto", "mixed_float16", "mixed_bfloat16" or "float32".
    """
    if mode == "auto":
        mode = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    if mode not in ("float32", "mixed_float16", "mixed_bfloat16"):
        raise ValueError(f"unknown mixed precision mode {mode!r}; "
                         "use auto, float32, mixed_float16 or mixed_bfloat16")
    return mode


def make_strategy(name: str = "default", tpu: Optional[str] = None,
                  ps_min_shard_bytes: int = PS_MIN_SHARD_BYTES) -> tf.distribute.Strategy:
    """Builds the distribution strategy named in the config.

    Args:
      name: one of STRATEGIES. "mirrored" uses every GPU, or every logical CPU when no
        GPU is present; "multi_worker" reads the cluster from TF_CONFIG;
        "parameter_server" reads it from TF_CONFIG too, this process being the
        coordinator (task "chief").
      tpu: TPU address (grpc://...) or name for "tpu".
      ps_min_shard_bytes: parameter_server only: variables are split across PS tasks
        in shards of at least this many bytes (large embedding tables get sharded).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if tf_config() is None:
            log.warning("multi_worker without TF_CONFIG: running as a single worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "parameter_server":
        return _parameter_server_strategy(ps_min_shard_bytes)
    if name == "tpu":
        if not tpu:
            raise ValueError("strategy 'tpu' needs a TPU address: --tpu grpc://HOST:8470 or a name")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the process that writes logs, checkpoints and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def tf_config() -> Optional[dict]:
    """The parsed TF_CONFIG environment variable, or None when it is unset or empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
        raise ValueError("TF_CONFIG must be a JSON object with a 'cluster' mapping of job "
                         "names to address lists and a 'task' {type, index}")
    return config


def task_role() -> Tuple[Optional[str], int]:
    """(task type, index) of this process in TF_CONFIG, (None, 0) outside a cluster."""
    config = tf_config() or {}
    task = config.get("task") or {}
    return task.get("type"), int(task.get("index", 0))


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes taking part in synchronous training (1 outside multi-worker)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
        return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))
    return 1


def _parameter_server_strategy(min_shard_bytes: int) -> tf.distribute.Strategy:
    """ParameterServerStrategy over TF_CONFIG with size-based variable sharding.

    Variables above `min_shard_bytes` (the id embedding tables of a large catalog) are
    split into up to one shard per PS task, so no single PS has to hold a whole table.
    """
    config = tf_config()
    cluster = (config or {}).get("cluster", {})
    if not cluster.get("ps") or not cluster.get("worker"):
        raise ValueError(
            "strategy 'parameter_server' needs TF_CONFIG with 'worker' and 'ps' jobs and this "
            "process as task 'chief' (the coordinator); for a cluster on this machine run "
            "`tfrec train --cluster local:ps=1,workers=2`")
    task_type, _ = task_role()
    if task_type != "chief":
        raise ValueError(f"the parameter_server coordinator must be TF_CONFIG task 'chief', "
                         f"this process is {task_type!r}; on worker and ps hosts "
                         "`tfrec train --strategy parameter_server` serves instead of training")
    if min_shard_bytes < 1:
        raise ValueError(f"ps_min_shard_bytes must be >= 1, got {min_shard_bytes}")
    # Workers report errors to the coordinator instead of retrying forever.
    os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=min_shard_bytes, max_shards=len(cluster["ps"]))
    return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
