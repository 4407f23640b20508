"""Loads the versions of one model from `<base_path>/<version>/` and hot-swaps new ones.

Mirrors TF Serving's file-system source: integer directories are versions, a new
version replaces the old one only after it loaded, and a broken export never takes
down the version that is serving.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import threading
import types
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

logger = logging.getLogger(__name__)

POLICIES = ("latest", "all", "specific")
# Libraries whose import registers custom ops some exported models use.
_OP_LIBRARIES = ("tensorflow_text",)
# ASCII digits only (Python's \d also takes other scripts' digits) and within int64, as
# TF Serving parses version directories; anything else is not a version.
_VERSION_DIR = re.compile(r"[0-9]+")
_MAX_VERSION = 2 ** 63 - 1
_DATA_SHARD = re.compile(r"variables\.data-(\d+)-of-(\d+)")
_ops_lock = threading.Lock()
_ops_imported = False


class ServableNotFoundError(LookupError):
    """The requested model or version is not being served (maps to NOT_FOUND)."""


class VersionState(enum.IntEnum):
    """Same numbers as `tensorflow.serving.ModelVersionStatus.State`."""

    UNKNOWN = 0
    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """Lifecycle state of one version; a failed load is END with an error code."""

    state: VersionState
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclasses.dataclass(frozen=True)
class Signature:
    """One callable signature of a loaded version.

    Attributes:
      name: Signature key, e.g. "serving_default".
      function: The concrete function; call it with keyword tensors.
      inputs: Input alias -> TensorSpec, from `structured_input_signature`.
      outputs: Output alias -> TensorSpec, from `structured_outputs`.
    """

    name: str
    function: tf.types.experimental.ConcreteFunction
    inputs: Mapping[str, tf.TensorSpec]
    outputs: Mapping[str, tf.TensorSpec]


@dataclasses.dataclass(frozen=True)
class LoadedVersion:
    """Everything kept for a version that is serving.

    Attributes:
      version: Integer version (the directory name).
      path: The version directory.
      obj: The object returned by `tf.saved_model.load` (owns the variables).
      signatures: Signature key -> `Signature`.
      signature_defs: Signature key -> SignatureDef proto from `saved_model.pb`.
      warmup_requests: Warm-up requests replayed before the version served.
    """

    version: int
    path: str
    obj: object
    signatures: Mapping[str, Signature]
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    warmup_requests: int = 0  # replayed from assets.extra before serving


def import_op_libraries() -> None:
    """Imports optional custom-op libraries once, so models using their ops load."""
    global _ops_imported
    with _ops_lock:
        if _ops_imported:
            return
        for module in _OP_LIBRARIES:
            try:
                __import__(module)
            except ImportError:
                logger.debug("optional op library %s is not installed", module)
        _ops_imported = True


def list_versions(base_path: str) -> Dict[int, str]:
    """Version -> directory for every integer-named subdirectory of `base_path`.

    Other names (e.g. `.tmp-*` directories of an export in progress, numbers beyond
    int64, non-ASCII digits) are ignored, as TF Serving ignores them.
    """
    versions = {}
    with os.scandir(base_path) as entries:
        for entry in entries:
            if (_VERSION_DIR.fullmatch(entry.name) and int(entry.name) <= _MAX_VERSION
                    and entry.is_dir()):
                versions[int(entry.name)] = entry.path
    return versions


def fingerprint(path: str) -> Tuple:
    """(relative path, size, mtime) of every file under a version directory.

    A failed version is retried only when this changes, e.g. a copy finished.
    """
    items = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + [""]:
            full = os.path.join(root, name) if name else root
            try:
                st = os.stat(full)
            except OSError:
                continue
            items.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(items)


def read_signature_defs(path: str) -> Dict[str, meta_graph_pb2.SignatureDef]:
    """Parses the SignatureDefs of `saved_model.pb` (or `.pbtxt`) in a version directory.

    Raises:
      FileNotFoundError: neither file exists (partial or wrong export).
      ValueError: the file is not a SavedModel proto.
    """
    meta_graph = read_meta_graph(path)
    return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}


def check_complete(path: str, meta_graph: meta_graph_pb2.MetaGraphDef) -> None:
    """Refuses a version directory whose variables or assets files are missing.

    An interrupted or still-running copy would otherwise cost a full (slow) load
    attempt before failing with an obscure restore error.

    Args:
      path: The version directory.
      meta_graph: Its MetaGraph (`read_meta_graph`).

    Raises:
      FileNotFoundError: naming every missing file.
    """
    missing = []
    has_variables = any(node.WhichOneof("kind") == "variable"
                        for node in meta_graph.object_graph_def.nodes)
    if has_variables:
        variables = os.path.join(path, "variables")
        if not os.path.isfile(os.path.join(variables, "variables.index")):
            missing.append("variables/variables.index")
        names = os.listdir(variables) if os.path.isdir(variables) else []
        shards = [m for m in map(_DATA_SHARD.fullmatch, names) if m]
        if not shards:
            missing.append("variables/variables.data-*")
        else:
            total = int(shards[0].group(2))
            missing += [f"variables/variables.data-{i:05d}-of-{total:05d}" for i in range(total)
                        if f"variables.data-{i:05d}-of-{total:05d}" not in names]
    for asset in meta_graph.asset_file_def:
        if not os.path.isfile(os.path.join(path, "assets", asset.filename)):
            missing.append(f"assets/{asset.filename}")
    if missing:
        raise FileNotFoundError(
            f"incomplete version directory {path}: missing {', '.join(missing)}; copy an "
            f"export under a temporary name and rename it into place when complete")


def read_meta_graph(path: str) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraph tagged "serve" of `saved_model.pb` (or `.pbtxt`) in a version directory.

    Raises:
      FileNotFoundError: neither file exists (partial or wrong export).
      ValueError: the file is not a SavedModel proto.
    """
    saved_model = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    pbtxt = os.path.join(path, "saved_model.pbtxt")
    if os.path.exists(pb):
        with open(pb, "rb") as f:
            data = f.read()
        try:
            saved_model.ParseFromString(data)
        except Exception as e:
            raise ValueError(f"{pb} is not a valid SavedModel proto: {e}") from e
    elif os.path.exists(pbtxt):
        from google.protobuf import text_format

        with open(pbtxt) as f:
            try:
                text_format.Parse(f.read(), saved_model)
            except text_format.ParseError as e:
                raise ValueError(f"{pbtxt} is not a valid SavedModel text proto: {e}") from e
    else:
        raise FileNotFoundError(f"no saved_model.pb or saved_model.pbtxt in {path}")
    if not saved_model.meta_graphs:
        raise ValueError(f"SavedModel in {path} contains no MetaGraph")
    # TF2 exports have one MetaGraph; TF Serving uses the one tagged "serve".
    return next((m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags),
                saved_model.meta_graphs[0])


def _spec_of(value: object, name: str) -> tf.TensorSpec:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"output {name!r} is not a tensor ({type(value).__name__})")
    return tf.TensorSpec(shape, dtype, name=name)


def load_version(version: int, path: str) -> LoadedVersion:
    """Loads one version directory and collects its signatures.

    Args:
      version: The version number (directory name).
      path: The version directory.
    """
    import_op_libraries()
    meta_graph = read_meta_graph(path)
    check_complete(path, meta_graph)
    signature_defs = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    obj = tf.saved_model.load(path, tags=["serve"])
    signatures = {}
    for key, fn in obj.signatures.items():
        _, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        if not isinstance(outputs, Mapping):
            raise ValueError(f"signature {key!r} of {path} must return a dict of named outputs")
        signatures[key] = Signature(
            name=key,
            function=fn,
            inputs=types.MappingProxyType(dict(kwargs)),
            outputs=types.MappingProxyType({k: _spec_of(v, k) for k, v in outputs.items()}))
    if not signatures:
        raise ValueError(f"SavedModel in {path} has no signatures to serve")
    replayed = replay_warmup(path, signatures)
    return LoadedVersion(version, path, obj, types.MappingProxyType(signatures),
                         types.MappingProxyType(signature_defs), replayed)


WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_REQUESTS = 1000  # TF Serving's bound on the records of one file


def replay_warmup(path: str, signatures: Mapping[str, Signature]) -> int:
    """Runs the version's warm-up requests (TF Serving's file) before it takes traffic.

    The first calls of a loaded model pay for graph set-up; replaying them here keeps
    that off the first shoppers' requests. As in TF Serving, a request that fails makes
    the version fail to load.

    Returns:
      The number of requests replayed (0 without a warm-up file).

    Raises:
      ValueError: a record that is not a Predict request, names an unknown signature or
        input, or has more than MAX_WARMUP_REQUESTS records; tf.errors.OpError: the model
        fails on a request.
    """
    file = os.path.join(path, WARMUP_FILE)
    if not os.path.isfile(file):
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(file):
        count += 1
        if count > MAX_WARMUP_REQUESTS:
            raise ValueError(f"{file} holds more than {MAX_WARMUP_REQUESTS} warm-up requests")
        log_proto = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if not log_proto.HasField("predict_log"):
            raise ValueError(f"warm-up record {count} of {file} is not a Predict request "
                             f"(only predict_log is served here)")
        request = log_proto.predict_log.request
        name = request.model_spec.signature_name or "serving_default"
        signature = signatures.get(name)
        if signature is None:
            raise ValueError(f"warm-up record {count} of {file} names signature {name!r}, "
                             f"which the model does not have ({sorted(signatures)})")
        unknown = sorted(set(request.inputs) - set(signature.inputs))
        if unknown:
            raise ValueError(f"warm-up record {count} of {file}: unknown input(s) {unknown} "
                             f"of signature {name!r}")
        signature.function(**{k: tf.constant(tf.make_ndarray(v), dtype=signature.inputs[k].dtype)
                              for k, v in request.inputs.items()})
    return count


def _error_code(e: BaseException) -> grpc.StatusCode:
    if isinstance(e, tf.errors.OpError):
        return grpc_code(e.error_code)
    if isinstance(e, FileNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.UNKNOWN


def grpc_code(number: int) -> grpc.StatusCode:
    """gRPC code with the same number as a TF error code (they share numbering)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


class ModelManager:
    """Serves the versions of one model and polls its base path for new ones.

    Readers never block on loading: the served set is an immutable mapping replaced
    in one assignment once every new version in it has loaded.

    Args:
      name: Model name clients put in `model_spec.name`.
      base_path: Directory holding `<version>/` SavedModel directories.
      poll_seconds: Seconds between scans of `base_path`; <= 0 scans only at start.
      version_policy: "latest" (the `num_versions` highest loadable versions),
        "all" (every version on disk) or "specific" (those in `versions`).
      num_versions: Versions kept by the "latest" policy.
      versions: Version numbers served by the "specific" policy.
    """

    def __init__(self, name: str, base_path: str, poll_seconds: float = 1.0,
                 version_policy: str = "latest", num_versions: int = 1,
                 versions: Optional[Iterable[int]] = None):
        if not name:
            raise ValueError("model name must be a non-empty string")
        if version_policy not in POLICIES:
            raise ValueError(
                f"unknown version_policy {version_policy!r} for model {name!r}; "
                f"expected one of {POLICIES}")
        if version_policy == "latest" and num_versions < 1:
            raise ValueError(f"num_versions must be >= 1 for model {name!r}, got {num_versions}")
        specific = tuple(sorted({int(v) for v in versions or ()}))
        if version_policy == "specific" and not specific:
            raise ValueError(f"version_policy 'specific' for model {name!r} needs versions=[...]")
        self.name = name
        self.base_path = os.path.abspath(os.path.expanduser(base_path))
        self.poll_seconds = float(poll_seconds)
        self.version_policy = version_policy
        self.num_versions = int(num_versions)
        self.specific_versions = specific
        self._served: Mapping[int, LoadedVersion] = types.MappingProxyType({})
        self._states: Dict[int, VersionStatus] = {}
        self._failed: Dict[int, Tuple] = {}  # version -> fingerprint of the failed attempt
        self._lock = threading.Lock()  # guards _states/_failed and the swap
        self._poll_lock = threading.Lock()  # one scan at a time
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._missing_logged = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self, require_version: bool = True) -> "ModelManager":
        """Loads the initial versions and starts the polling thread.

        Args:
          require_version: Raise if nothing can be served now. False starts anyway
            (requests get NOT_FOUND) and serves the first version that appears,
            e.g. a server started before the first export; TF Serving does this too.

        Raises:
          FileNotFoundError: `base_path` does not exist (and `require_version`).
          RuntimeError: no version directory could be loaded (and `require_version`).
        """
        if require_version and not os.path.isdir(self.base_path):
            raise FileNotFoundError(
                f"base path {self.base_path!r} of model {self.name!r} does not exist; export "
                f"a model there first (versions live in <base_path>/<version>/)")
        self.poll()
        if require_version and not self._served:
            failures = {v: s.error_message for v, s in self.version_states().items()
                        if s.error_code != grpc.StatusCode.OK}
            detail = f"; load errors: {failures}" if failures else ""
            raise RuntimeError(
                f"model {self.name!r} has no servable version under {self.base_path!r} "
                f"(policy {self._policy_text()}){detail}")
        if self.poll_seconds > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"tfrec-model-poll-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops polling and releases the loaded versions."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_seconds))
            self._thread = None
        with self._lock:
            for version in self._served:
                self._states[version] = VersionStatus(VersionState.END)
            self._served = types.MappingProxyType({})

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # never let the poller die: keep serving what we have
                logger.exception("model %r: polling %s failed", self.name, self.base_path)

    # -- lookups -----------------------------------------------------------------

    def get(self, version: Optional[int] = None) -> LoadedVersion:
        """The highest served version, or the given one.

        Raises:
          ServableNotFoundError: nothing served, or `version` is not served.
        """
        served = self._served
        if version is None:
            if not served:
                raise ServableNotFoundError(f"Servable not found for request: Latest({self.name})")
            return served[max(served)]
        if version not in served:
            available = sorted(served)
            raise ServableNotFoundError(
                f"Servable not found for request: Specific({self.name}, {version}); "
                f"serving versions {available}")
        return served[version]

    def versions(self) -> List[int]:
        """Served versions, ascending."""
        return sorted(self._served)

    def version_states(self) -> Dict[int, VersionStatus]:
        """Version -> status of every version seen since start (for GetModelStatus)."""
        with self._lock:
            return dict(self._states)

    # -- polling -----------------------------------------------------------------

    def _policy_text(self) -> str:
        if self.version_policy == "latest":
            return f"latest {self.num_versions}"
        if self.version_policy == "specific":
            return f"specific {list(self.specific_versions)}"
        return "all"

    def _set_state(self, version: int, status: VersionStatus) -> None:
        with self._lock:
            self._states[version] = status

    def poll(self) -> List[int]:
        """Scans the base path once, loads what the policy wants and swaps it in.

        Returns the served versions afterwards.
        """
        with self._poll_lock:
            try:
                on_disk = list_versions(self.base_path)
                self._missing_logged = False
            except FileNotFoundError:
                if not self._missing_logged:
                    logger.warning("model %r: base path %s does not exist (yet); keep polling",
                                   self.name, self.base_path)
                    self._missing_logged = True
                return self.versions()  # keep serving what is loaded
            except OSError as e:
                logger.error("model %r: cannot list %s: %s", self.name, self.base_path, e)
                return self.versions()

            served = self._served
            wanted = sorted(on_disk, reverse=True)
            if self.version_policy == "specific":
                wanted = [v for v in wanted if v in self.specific_versions]
            chosen: Dict[int, LoadedVersion] = {}
            for version in wanted:
                if self.version_policy == "latest" and len(chosen) >= self.num_versions:
                    break
                if version in served:
                    chosen[version] = served[version]
                    continue
                loaded = self._try_load(version, on_disk[version])
                if loaded is not None:
                    chosen[version] = loaded
            if set(chosen) != set(served):
                self._swap(chosen, served)
            return self.versions()

    def _try_load(self, version: int, path: str) -> Optional[LoadedVersion]:
        fp = fingerprint(path)
        with self._lock:
            if self._failed.get(version) == fp:
                return None  # same broken files as last time: do not retry
        self._set_state(version, VersionStatus(VersionState.LOADING))
        logger.info("model %r: loading version %d from %s", self.name, version, path)
        try:
            loaded = load_version(version, path)
        except Exception as e:
            message = _short(f"{type(e).__name__}: {e}")
            logger.error("model %r: failed to load version %d from %s (kept serving %s; "
                         "retried when its files change): %s",
                         self.name, version, path, self.versions() or "nothing", message)
            with self._lock:
                self._failed[version] = fp
                self._states[version] = VersionStatus(VersionState.END, _error_code(e), message)
            return None
        with self._lock:
            self._failed.pop(version, None)
        if loaded.warmup_requests:
            logger.info("model %r: version %d warmed up with %d request(s)", self.name, version,
                        loaded.warmup_requests)
        return loaded

    def _swap(self, chosen: Dict[int, LoadedVersion], old: Mapping[int, LoadedVersion]) -> None:
        with self._lock:
            self._served = types.MappingProxyType(dict(chosen))
            for version in chosen:
                self._states[version] = VersionStatus(VersionState.AVAILABLE)
            for version in set(old) - set(chosen):
                self._states[version] = VersionStatus(VersionState.END)
        added = sorted(set(chosen) - set(old))
        removed = sorted(set(old) - set(chosen))
        logger.info("model %r: now serving versions %s (added %s, unloaded %s)",
                    self.name, sorted(chosen), added, removed)


def _short(message: str, limit: int = 600) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def managers_from(models: Mapping[str, str], poll_seconds: float = 1.0,
                  policies: Optional[Mapping[str, Mapping]] = None) -> Dict[str, ModelManager]:
    """Builds one ModelManager per `name -> base_path` entry.

    Args:
      models: Model name -> base path.
      poll_seconds: Poll period shared by all models.
      policies: Optional name -> ModelManager keyword arguments
        (`version_policy`, `num_versions`, `versions`).
    """
    policies = policies or {}
    unknown = set(policies) - set(models)
    if unknown:
        raise ValueError(f"version policies given for unknown models {sorted(unknown)}")
    return {name: ModelManager(name, path, poll_seconds=poll_seconds, **policies.get(name, {}))
            for name, path in models.items()}


__all__: Sequence[str] = (
    "LoadedVersion", "ModelManager", "ServableNotFoundError", "Signature", "VersionState",
    "VersionStatus", "check_complete", "grpc_code", "import_op_libraries", "list_versions",
    "load_version", "managers_from", "read_meta_graph", "read_signature_defs",
)
