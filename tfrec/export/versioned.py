"""Versioned, atomic SavedModel writes: `<base>/<model_name>/<version>/`.

TF Serving (and our server) load any integer directory that appears, so a model is
written under a hidden temp name and renamed into place only once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Callable, Dict, List, Optional

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.export.warmup import warmup_requests, write_warmup


MAX_VERSION = 2 ** 63 - 1  # versions are int64 in TF Serving's protos


class SignatureModule(tf.Module):
    """A tf.Module saved for its signatures only, without its tf.function attributes.

    `tf.saved_model.save` traces every tf.function attribute again (its cache key differs
    inside a save) and stores those graphs beside the signatures': export then traces each
    serving function twice and the file holds it twice. Serving (TF Serving, tfrec serve)
    reads `signatures` only, so the attributes stay out of the file.
    """

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if save_type != "savedmodel":
            return super()._trackable_children(save_type, **kwargs)
        # Trackable's own children (variables, tables, sub-modules): AutoTrackable's
        # override is what adds, and traces, the function attributes.
        children = tf.__internal__.tracking.Trackable._trackable_children(
            self, save_type, **kwargs)
        return {name: child for name, child in children.items()
                if not isinstance(child, (tf.types.experimental.PolymorphicFunction,
                                          tf.types.experimental.ConcreteFunction))}


def version_of(name: str) -> Optional[int]:
    """The version a directory name stands for, as TF Serving reads it: ASCII digits within
    int64 (other names, e.g. `.tmp-*`, "١٢" or 20 digits, are not versions)."""
    if not (name.isascii() and name.isdigit()):
        return None
    version = int(name)
    return version if version <= MAX_VERSION else None


def list_versions(model_dir: str) -> List[int]:
    """Integer version directories that hold a saved_model.pb, ascending."""
    if not os.path.isdir(model_dir):
        return []
    versions = []
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        version = version_of(name)
        if version is not None and os.path.exists(os.path.join(path, "saved_model.pb")):
            versions.append(version)
    return sorted(versions)


def next_version(model_dir: str) -> int:
    names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
    versions = [v for v in map(version_of, names) if v is not None]
    return max(versions, default=0) + 1


def write_versioned(base_dir: str, model_name: str, version: Optional[int],
                    write: Callable[[str], None]) -> str:
    """Calls `write(tmp_dir)`, then renames tmp_dir to `<base>/<model_name>/<version>`.

    Loaders watching the model directory see a version only once it is complete.

    Args:
      base_dir: export root.
      model_name: model directory name (a plain name).
      version: explicit version (refuses to overwrite one); None: the next integer.
      write: fills the directory it is given (which does not exist yet).

    Returns:
      The version directory.

    Raises:
      ValueError: a bad model name or version.
      FileExistsError: the version exists.
    """
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"invalid model name {model_name!r}: use a plain directory name")
    model_dir = os.path.join(base_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    version = next_version(model_dir) if version is None else int(version)
    if not 0 < version <= MAX_VERSION:
        raise ValueError(f"model version must be a positive integer up to {MAX_VERSION} "
                         f"(int64, as TF Serving reads it), got {version}")
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(
            f"version {version} of {model_name!r} already exists at {final}; "
            "export without --version to write the next one")
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_json(directory: str, files: Dict[str, dict]) -> None:
    """Writes each payload of `files` as indented JSON under `directory`."""
    os.makedirs(directory, exist_ok=True)
    for name, payload in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f, indent=2, default=str)


def save_versioned(module: tf.Module, signatures: Dict[str, object], base_dir: str,
                   model_name: str, version: Optional[int] = None,
                   extra_files: Optional[Dict[str, dict]] = None, warmup: bool = True,
                   warmup_values: Optional[Dict[str, object]] = None) -> str:
    """Saves `module` as version `version` (default: next integer) atomically.

    Args:
      module: the tf.Module to save.
      signatures: signature name -> concrete function.
      base_dir: export root (TF Serving's model base paths live below it).
      model_name: model directory name.
      version: explicit version; refuses to overwrite an existing one.
      extra_files: JSON files written under `assets.extra/` (model card, config).
      warmup: also write TF Serving warm-up requests (`tfrec.export.warmup`), one per
        signature that answers a sample input, replayed before the version serves.
      warmup_values: input key -> the warm-up requests' value for it (e.g. a catalog
        item id for inputs that refuse unknown ids; see `warmup.sample_inputs`).
    """
    def write(tmp: str) -> None:
        tf.saved_model.save(module, tmp, signatures=signatures)
        if warmup:
            requests = warmup_requests(model_name, signatures, warmup_values)
            if requests:
                write_warmup(tmp, requests)
        if extra_files:
            write_json(os.path.join(tmp, "assets.extra"), extra_files)

    logger = tf.get_logger()
    level = logger.level
    # Keras warns about its own (unused here) layer configs on every save; keep output clean.
    logger.setLevel("ERROR")
    try:
        return write_versioned(base_dir, model_name, version, write)
    finally:
        logger.setLevel(level)
