"""What a user sees from `tfrec`: progress, step headers and tables, not native TF/absl logs.

TensorFlow prints some lines while its libraries load, before TF_CPP_MIN_LOG_LEVEL
applies; these run the real command line to check they stay hidden unless asked for.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from tfrec.logs import is_native_noise

# One marker per kind of line users reported: CUDA probes on CPU-only machines, absl's
# pre-initialisation warning, and absl's Python logger timing every checkpoint save.
NOISE = ("cuInit", "cudart_stub", "Sharding callback", "absl::InitializeLog")
HAS_GPU_DRIVER = os.path.exists("/proc/driver/nvidia/version")


def _env(**overrides: str) -> Dict[str, str]:
    """The environment of a user who set no log variables (this process's tfrec did)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    return {**env, **overrides}


def tfrec(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m tfrec ARGS` in `cwd` (training writes tensorboard_logs/ there)."""
    return subprocess.run([sys.executable, "-m", "tfrec", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def _noise(proc: subprocess.CompletedProcess) -> List[str]:
    """Output lines, stdout and stderr, carrying a NOISE marker."""
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if any(m in line for m in NOISE)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny world written by `tfrec generate`, and that command's output."""
    workdir = tmp_path_factory.mktemp("logs")
    proc = tfrec("generate", "--world", "tiny", "--workdir", str(workdir), cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_generate_prints_no_native_logs(generated):
    _, proc = generated
    assert proc.stdout.startswith("wrote ")
    assert not _noise(proc), _noise(proc)


def test_train_prints_no_native_logs(generated):
    """Also with the profiler on: `--profile-steps` writes a trace, quietly."""
    workdir, _ = generated
    proc = tfrec("train", "--workdir", str(workdir), "--epochs", "1", "--run-name", "quiet",
                 "--profile-steps", "2,3", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation: " in proc.stdout
    assert not _noise(proc), _noise(proc)
    traces = glob.glob(str(workdir / "tensorboard_logs" / "quiet" / "**" / "*.xplane.pb"),
                       recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0, os.listdir(workdir / "tensorboard_logs")


@pytest.mark.parametrize("bad", ["3,2", "0,1", "ten", "1,2,3"])
def test_bad_profile_steps_are_usage_errors(bad, capsys):
    from tfrec.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--profile-steps", bad])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--profile-steps" in err
    if bad == "3,2":
        assert "need 1 <= FIRST <= LAST" in err


def test_verbose_train_still_works_and_shows_the_logs(generated):
    workdir, _ = generated
    proc = tfrec("train", "--workdir", str(workdir), "--epochs", "1", "--run-name", "verbose",
                 "-v", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation: " in proc.stdout
    assert _noise(proc), "with -v the TensorFlow / absl logs should be shown"


@pytest.mark.skipif(HAS_GPU_DRIVER, reason="CUDA probe lines only appear without a GPU driver")
def test_a_users_log_level_wins(generated):
    workdir, _ = generated
    proc = tfrec("generate", "--world", "tiny", "--workdir", str(workdir / "again"),
                 cwd=workdir, TF_CPP_MIN_LOG_LEVEL="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any("cudart_stub" in line or "cuInit" in line for line in _noise(proc))


def test_native_noise_follows_the_log_level():
    info = b"I0000 00:00:1796.5   42 cudart_stub.cc:31] Could not find cuda drivers\n"
    cuinit = b"E0000 00:00:1796.5   42 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
    error = b"E0000 00:00:1796.5   42 saved_model.cc:12] could not read the model\n"
    preamble = (b"WARNING: All log messages before absl::InitializeLog() is called are "
                b"written to STDERR\n")
    python = b"UserWarning: something a user should read\n"
    assert is_native_noise(info, 2, has_gpu_driver=False)
    assert is_native_noise(preamble, 2, has_gpu_driver=False)
    assert is_native_noise(cuinit, 2, has_gpu_driver=False)  # expected without a GPU
    assert not is_native_noise(cuinit, 2, has_gpu_driver=True)  # a broken GPU setup
    assert not is_native_noise(error, 2, has_gpu_driver=False)
    assert not is_native_noise(python, 3, has_gpu_driver=False)
    for line in (info, cuinit, preamble):  # TF_CPP_MIN_LOG_LEVEL=0: everything
        assert not is_native_noise(line, 0, has_gpu_driver=False)


def test_profile_steps_in_a_config_are_checked():
    from tfrec.config import Config
    from tfrec.training.trainer import profile_steps

    cfg = Config()
    assert profile_steps(cfg) == 0
    cfg.override(["train.profile_steps=[10, 15]"])
    assert profile_steps(cfg) == (10, 15)
    cfg.train.profile_steps = (5, 2)
    with pytest.raises(ValueError, match=r"train.profile_steps must be \[first, last\]"):
        profile_steps(cfg)
