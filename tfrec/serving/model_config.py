"""TF Serving `models.config` files: which models to serve, from where, with which versions.

The embedded server reads the same ModelServerConfig text proto as stock TensorFlow
Serving, so one config file describes a deployment for both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, List, Tuple

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

logger = logging.getLogger(__name__)

__all__ = ["ModelConfigEntry", "load_model_config", "parse_model_config"]


@dataclasses.dataclass(frozen=True)
class ModelConfigEntry:
    """One `config { ... }` entry of a TF Serving model config file.

    Args:
      name: model name clients ask for.
      base_path: absolute directory holding `<version>/` SavedModels.
      version_policy: "latest", "all" or "specific" (TF Serving's policy_choice).
      num_versions: versions kept under "latest".
      versions: version numbers served under "specific".
    """

    name: str
    base_path: str
    version_policy: str = "latest"
    num_versions: int = 1
    versions: Tuple[int, ...] = ()

    def manager_kwargs(self) -> Dict[str, object]:
        """The version policy as `ModelManager` keyword arguments."""
        return {"version_policy": self.version_policy, "num_versions": self.num_versions,
                "versions": self.versions}


def parse_model_config(path: str) -> List[ModelConfigEntry]:
    """Reads a TF Serving `models.config` (ModelServerConfig text proto).

    Relative base paths are resolved against the config file's directory, so one
    file works from any working directory.

    Args:
      path: The config file.

    Returns:
      One entry per configured model, in file order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is malformed or uses features this server lacks.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(f"model config file {path!r} is not a valid ModelServerConfig "
                         f"text proto: {e}") from e
    kind = config.WhichOneof("config")
    if kind != "model_config_list":
        raise ValueError(f"model config file {path!r} must contain a model_config_list "
                         f"(found {kind or 'nothing'})")
    root = os.path.dirname(os.path.abspath(path))
    entries: List[ModelConfigEntry] = []
    for model in config.model_config_list.config:
        where = f"model config file {path!r}, model {model.name or '<unnamed>'!r}"
        if not model.name:
            raise ValueError(f"{where}: every config needs a name")
        if any(e.name == model.name for e in entries):
            raise ValueError(f"{where}: the name is defined twice")
        if not model.base_path:
            raise ValueError(f"{where}: base_path is required")
        if model.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{where}: model_platform {model.model_platform!r} is not "
                             f"supported (only 'tensorflow')")
        if "://" in model.base_path:
            raise ValueError(f"{where}: remote base_path {model.base_path!r} is not supported "
                             f"by this server (local directories only)")
        if model.version_labels:
            logger.warning("%s: version_labels are ignored by this server", where)
        base_path = os.path.normpath(os.path.join(root, os.path.expanduser(model.base_path)))
        policy = model.model_version_policy
        choice = policy.WhichOneof("policy_choice") or "latest"
        entries.append(ModelConfigEntry(
            name=model.name,
            base_path=base_path,
            version_policy=choice,
            num_versions=max(1, policy.latest.num_versions),
            versions=tuple(policy.specific.versions)))
    if not entries:
        raise ValueError(f"model config file {path!r} defines no models")
    return entries


def load_model_config(path: str) -> Dict[str, str]:
    """Model name -> absolute base path from a TF Serving `models.config`.

    Args:
      path: The config file; see `parse_model_config` for the rules.

    Returns:
      Model name -> absolute base path, in file order.

    Raises:
      FileNotFoundError / ValueError: as `parse_model_config`.
    """
    return {entry.name: entry.base_path for entry in parse_model_config(path)}
