"""The built wheel holds every tfrec package, and every module in it imports on its own.

`packages = find:` silently leaves out a directory without __init__.py, which only shows
once someone installs the wheel; this builds one and imports it away from the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent

# Never part of a wheel; a stale build/ would even leak deleted modules into it. The
# top-level names are outputs of runs, ignored only at the root (tfrec/data is a package).
_NOT_SOURCE_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
_NOT_SOURCE_AT_ROOT = {".git", "build", "dist", ".pytest_cache", "tensorboard_logs", "work",
                       "models", "data"}


def _not_source(directory: str, names: List[str]) -> Set[str]:
    ignored = set(_NOT_SOURCE_ANYWHERE(directory, names))
    if Path(directory) == REPO:
        ignored |= _NOT_SOURCE_AT_ROOT.intersection(names)
    return ignored

# Imports every tfrec module of the wheel in one process (TensorFlow loads once).
# __main__ modules are skipped: importing one runs the command line.
_IMPORT_ALL = r"""
import importlib, json, os, pkgutil, sys, traceback

root, out = sys.argv[1], sys.argv[2]
import tfrec

failed, names = {}, []

def record(name):
    failed[name] = traceback.format_exc(limit=-3)

for info in pkgutil.walk_packages(tfrec.__path__, "tfrec.", onerror=record):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        continue
    names.append(info.name)
    try:
        importlib.import_module(info.name)
    except (Exception, SystemExit):
        record(info.name)
with open(out, "w") as f:
    json.dump({"tfrec_file": tfrec.__file__, "modules": names, "failed": failed}, f)
"""


def _source_packages() -> List[str]:
    """Directories under tfrec/ holding .py files, as paths relative to the repo."""
    found = []
    for directory, subdirs, files in os.walk(REPO / "tfrec"):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            found.append(Path(directory).relative_to(REPO).as_posix())
    return sorted(found)


@pytest.fixture(scope="module")
def unpacked_wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a clean copy of the checkout, unzipped."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_not_source)
    dist = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(dist), str(source)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(dist.glob("tfrec-*.whl"))
    assert len(wheels) == 1, f"expected one tfrec wheel in {dist}, got {wheels}"
    unpacked = tmp / "unpacked"
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(unpacked)
    return unpacked


def test_wheel_has_every_package(unpacked_wheel):
    packages = _source_packages()
    assert "tfrec" in packages and len(packages) > 1
    missing = [p for p in packages if not (unpacked_wheel / p / "__init__.py").is_file()]
    assert not missing, (f"directories with .py files missing from the wheel as packages "
                         f"(add an __init__.py): {missing}")


def test_every_module_of_the_wheel_imports(unpacked_wheel, tmp_path):
    result_file = tmp_path / "imports.json"
    # Only the unpacked wheel is importable: the cwd and PYTHONPATH point away from the
    # checkout, which an editable install would otherwise put on the path after these.
    env = {**os.environ, "PYTHONPATH": str(unpacked_wheel)}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(unpacked_wheel), str(result_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and result_file.is_file(), (
        f"the import subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(result_file.read_text())
    assert Path(result["tfrec_file"]).resolve().is_relative_to(unpacked_wheel.resolve()), (
        f"tfrec was imported from {result['tfrec_file']}, not from the wheel")
    packages = {p.replace("/", ".") for p in _source_packages()} - {"tfrec"}
    assert packages <= set(result["modules"]), (
        f"subpackages not found in the wheel: {sorted(packages - set(result['modules']))}")
    failed = result["failed"]
    assert not failed, ("modules of the wheel that do not import:\n" + "\n".join(
        f"--- {name}\n{error}" for name, error in sorted(failed.items())))
