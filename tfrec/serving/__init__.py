"""Serving: a TF Serving-compatible gRPC server, its model manager and a client.

Exports are plain versioned SavedModels, so the same directory serves from this
in-process server (tests, laptops) or from stock TensorFlow Serving (production).
"""

from tfrec.serving.client import PredictClient, ServingError, format_results, rows_from
from tfrec.serving.model_manager import (
    LoadedVersion,
    ModelManager,
    ServableNotFoundError,
    VersionState,
    VersionStatus,
)
from tfrec.serving.model_config import ModelConfigEntry, load_model_config, parse_model_config
from tfrec.serving.server import ModelServer
from tfrec.serving.tensors import TensorError

__all__ = [
    "LoadedVersion",
    "ModelConfigEntry",
    "ModelManager",
    "ModelServer",
    "PredictClient",
    "ServableNotFoundError",
    "ServingError",
    "TensorError",
    "VersionState",
    "VersionStatus",
    "format_results",
    "load_model_config",
    "parse_model_config",
    "rows_from",
]
