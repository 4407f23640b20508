"""What a `tfrec` run prints: progress, step headers and tables; with -v, everything.

TensorFlow's native libraries log CUDA probes and checkpoint timings while they load,
before they read TF_CPP_MIN_LOG_LEVEL; this filters those lines (and only those) out
of the first TensorFlow import unless the user asked for verbose output.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import tempfile
import types
from typing import IO, Callable, Iterator, Optional

import tfrec


def configure_logging(verbose: bool) -> None:
    """Sets what a run prints: progress, step headers and tables; with -v, everything.

    TensorFlow and absl log much that only helps when debugging (CUDA probes on CPU-only
    machines, checkpoint sharding timings), so by default it is held back.

    Args:
      verbose: the -v / --verbose flag.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A main() run before in this process may have left its hook.
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]
    if verbose:
        _lift_quiet_log_env()
        return
    from absl import logging as absl_logging

    # absl's Python logger reports e.g. "Sharding callback duration" at every checkpoint,
    # TensorFlow's narrates strategies and devices; their warnings still show.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if "tensorflow" not in sys.modules:  # else its load-time lines were printed back then
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def _lift_quiet_log_env() -> None:
    """Under -v, drops the quiet native-log defaults tfrec set; a user's own value stays."""
    # TensorFlow and gRPC read these once, when their libraries load. main() runs before
    # either is imported in a `tfrec` process; called in-process after TensorFlow was
    # imported (tests), this comes too late to change what TensorFlow's C++ code prints.
    for name in tfrec.QUIET_LOG_ENV_SET:
        os.environ.pop(name, None)


# absl C++ log line: severity, MMDD, time, thread id, file:line].
_ABSL_LINE = re.compile(rb"([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.-]+):\d+\] ")
_ABSL_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called"


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Import hook: the first `import tensorflow`, from whichever module, runs quietly.

    While TensorFlow's shared libraries load they log through absl copies that have not
    read TF_CPP_MIN_LOG_LEVEL yet (libtensorflow_framework and the profiler plugin each
    link one), so those lines are filtered here; later native lines obey the level.
    A hook rather than importing TensorFlow up front keeps commands that never need it
    as fast as before.
    """

    def find_spec(self, name: str, path: object = None,
                  target: object = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only; the real finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's package import and first device listing with stderr filtered."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:  # e.g. is_package: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # TensorFlow sees its real loader; this wrapper only brackets the import.
        module.__loader__ = module.__spec__.loader = self._loader
        min_level = _min_log_level()
        has_gpu_driver = os.path.exists("/proc/driver/nvidia/version")
        with _filtered_stderr(lambda line: is_native_noise(line, min_level, has_gpu_driver)):
            self._loader.exec_module(module)
            config = getattr(module, "config", None)
            if config is not None:  # probes CUDA, which logs a failed cuInit without a GPU
                config.list_physical_devices()


def _min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow parses it (unset or not a number: 0)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_native_noise(line: bytes, min_level: int, has_gpu_driver: bool) -> bool:
    """Whether TensorFlow would have dropped this load-time log line at `min_level`.

    Without an NVIDIA driver a missing CUDA runtime and a failed cuInit are expected, so
    they count as INFO rather than the ERROR they are logged at.

    Args:
      line: one line written to file descriptor 2.
      min_level: TF_CPP_MIN_LOG_LEVEL (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL).
      has_gpu_driver: whether the machine has an NVIDIA kernel driver.

    Returns:
      True for absl lines below min_level; False for everything else (Python output).
    """
    if line.startswith(_ABSL_PREAMBLE):
        return min_level >= 1  # absl prints it at WARNING, once per absl copy
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    severity = _ABSL_SEVERITY[match.group(1)]
    if not has_gpu_driver and (b"cuInit" in line or match.group(2) == b"cudart_stub.cc"):
        severity = _ABSL_SEVERITY[b"I"]
    return severity < min_level


@contextlib.contextmanager
def _filtered_stderr(is_noise: Callable[[bytes], bool]) -> Iterator[None]:
    """Captures file descriptor 2 for the block, then writes back the lines not `is_noise`.

    C++ code writes to the descriptor directly, so replacing sys.stderr would miss it.
    A temporary file rather than a pipe: a library loading under the GIL could block on
    a full pipe that no Python thread may drain.

    Args:
      is_noise: line (bytes, newline included) -> drop it.
    """
    capture: Optional[IO[bytes]] = None
    try:
        capture = tempfile.TemporaryFile()
        saved = os.dup(2)
    except OSError:  # no stderr, or nowhere to hold its lines: leave it unfiltered
        if capture is not None:
            capture.close()
        capture = None
    if capture is None:
        yield
        return
    sys.stderr.flush()
    with capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = b"".join(line for line in capture.read().splitlines(keepends=True)
                            if not is_noise(line))
            while kept:
                kept = kept[os.write(2, kept):]
