"""Keras callbacks of retrieval training: validation recall, HParams, projector.

Validation recall is computed in this process over the whole catalog (exact top-k),
not through distributed metrics, so it is the same on one worker or many.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import api as hp

from tfrec.data.feature_spec import catalog_features
from tfrec.data.io import atomic_write
from tfrec.metrics.retrieval import EvalSet, embed_in_batches, evaluate_embeddings
from tfrec.models.embedding import tower_fn

BACKUP_FINGERPRINT = "fingerprint.txt"
PROJECTOR_TENSORS = "item_embeddings.tsv"
PROJECTOR_METADATA = "metadata.tsv"
# The projector UI samples at most 100k points; TSV costs ~0.7 kB per 64-d vector.
PROJECTOR_MAX_POINTS = 10_000

log = logging.getLogger(__name__)


def metric_key(name: str) -> str:
    """"recall@10" -> "recall_at_10": Keras log keys and TensorBoard tags."""
    return name.replace("@", "_at_")


class RetrievalEvaluation(tf.keras.callbacks.Callback):
    """Adds `val_recall_at_k`, `val_ndcg_at_k`, ... and `learning_rate` to epoch logs.

    Runs before TensorBoard and KeepBestEpoch in the callback list, which then log and
    monitor these keys like any other validation metric.

    Args:
      eval_set: validation users frozen at the start of the validation period.
      catalog: items to rank (the whole catalog).
      ks: cut-offs.
    """

    def __init__(self, eval_set: EvalSet, catalog: pd.DataFrame, ks: Sequence[int] = (10, 100)):
        super().__init__()
        self.eval_set = eval_set
        self.catalog = catalog
        self.ks = tuple(ks)
        self.history: list = []

    def evaluate(self) -> Dict[str, float]:
        metrics = evaluate_embeddings(tower_fn(self.model.query_tower),
                                      tower_fn(self.model.candidate_tower),
                                      self.catalog, self.eval_set, self.ks)
        return {metric_key(k): float(v) for k, v in metrics.items() if k != "users"}

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs is None:
            return
        metrics = self.evaluate()
        for key, value in metrics.items():
            logs[f"val_{key}"] = value
        logs["learning_rate"] = float(tf.keras.backend.get_value(
            self.model.optimizer.learning_rate))
        self.history.append(metrics)
        log.info("epoch %d validation %s", epoch + 1,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


class BackupAndRestore(tf.keras.callbacks.BackupAndRestore):
    """Keras BackupAndRestore that also accepts OneDeviceStrategy and skips stale backups.

    Keras only allow-lists strategies it tested; one device is the single-worker case
    its checkpointing already handles, and a test resumes a crashed one_device run.
    A backup left by an interrupted run of another configuration (say another text
    mode) cannot be restored into this model: it is set aside instead of failing.

    Args:
      backup_dir: where the backup lives.
      fingerprint: what the model's shape depends on (e.g. a hash of its config); a
        backup written under another fingerprint is removed with a warning.
    """

    def __init__(self, backup_dir: str, fingerprint: str = "", **kwargs):
        stamp = os.path.join(backup_dir, BACKUP_FINGERPRINT)
        if os.path.isdir(backup_dir):
            found = open(stamp).read() if os.path.exists(stamp) else ""
            if found != fingerprint:
                log.warning("ignoring the backup in %s: it was written by a run of another "
                            "configuration", backup_dir)
                shutil.rmtree(backup_dir)
        os.makedirs(backup_dir, exist_ok=True)
        _write_text(stamp, fingerprint)
        super().__init__(backup_dir, **kwargs)
        self._supported_strategies = self._supported_strategies + (
            tf.distribute.OneDeviceStrategy,)


# Fields a resumed run may change: they shape neither the weights nor the optimizer
# state a backup holds (how long to train, when to stop, a serving-time limit).
RESUMABLE_FIELDS = ("epochs", "patience", "max_candidates")


def config_fingerprint(*sections: object, ignore: Sequence[str] = RESUMABLE_FIELDS) -> str:
    """Stable hash of config dataclasses, leaving out fields a resumed run may change."""
    raw = [{k: v for k, v in dataclasses.asdict(s).items() if k not in ignore}
           for s in sections]
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refresh_index(model: tf.keras.Model, catalog: pd.DataFrame) -> None:
    """Re-embeds the catalog into the model's factorized-metrics index (if it has one)."""
    if getattr(model, "index", None) is None:
        return
    embeddings = embed_in_batches(tower_fn(model.candidate_tower),
                                  catalog_features(catalog, model))
    model.index.index(tf.constant(embeddings))


class RefreshCatalogIndex(tf.keras.callbacks.Callback):
    """Keeps the factorized-metrics index in step with the candidate tower.

    Args:
      catalog: the catalog the index was built for (same order as its ids).
    """

    def __init__(self, catalog: pd.DataFrame):
        super().__init__()
        self.catalog = catalog

    def on_test_begin(self, logs=None):
        refresh_index(self.model, self.catalog)


def write_hparams(run_dir: str, hparams: Dict[str, object], metrics: Sequence[str],
                  trial_id: str) -> None:
    """Writes the HParams summary so TensorBoard's HParams tab compares runs.

    Args:
      run_dir: the run's TensorBoard directory (Keras writes train/ and validation/ below).
      hparams: flat mapping of hyper-parameters (str, bool, int or float values).
      metrics: epoch metric tags shown beside them (e.g. "epoch_recall_at_100").
      trial_id: name of the run.
    """
    clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
             for k, v in hparams.items()}
    writer = tf.summary.create_file_writer(run_dir)
    with writer.as_default():
        hp.hparams_config(
            hparams=[hp.HParam(k) for k in clean],
            metrics=[hp.Metric(m, group="validation", display_name=m) for m in metrics])
        hp.hparams(clean, trial_id=trial_id)
    writer.flush()
    writer.close()


def write_projector(run_dir: str, embeddings: np.ndarray, labels: Sequence[str],
                    columns: Optional[Dict[str, Sequence[str]]] = None) -> str:
    """Saves item embeddings with titles as metadata for TensorBoard's projector.

    The vectors go to a TSV tensor file, not a checkpoint: the plugin lends a run's
    checkpoint to every sub-run (`<run>/train`, `/validation`), which then show up as
    embeddings without metadata. A tensor file belongs to this run's config alone.

    Args:
      run_dir: the run's TensorBoard directory.
      embeddings: [N, D] item embeddings.
      labels: item titles (first metadata column, the projector's default label).
      columns: more metadata columns (e.g. item_id, category, brand).

    Returns:
      The path of the tensor file.

    Raises:
      ValueError: when a metadata column's length differs from the number of vectors.
    """
    columns = {"title": list(labels), **{k: list(v) for k, v in (columns or {}).items()}}
    embeddings = np.asarray(embeddings, np.float32)
    for name, values in columns.items():
        if len(values) != len(embeddings):
            raise ValueError(f"projector metadata column {name!r} has {len(values)} rows "
                             f"for {len(embeddings)} embeddings")
    os.makedirs(run_dir, exist_ok=True)
    clean = lambda v: str(v).replace("\t", " ").replace("\n", " ")  # noqa: E731
    _write_text(os.path.join(run_dir, PROJECTOR_METADATA), "".join(
        "\t".join(clean(v) for v in row) + "\n"
        for row in [list(columns), *zip(*columns.values())]))
    tensor_path = os.path.join(run_dir, PROJECTOR_TENSORS)
    _write_text(tensor_path, "".join(
        "\t".join(f"{x:.6g}" for x in row) + "\n" for row in embeddings))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "item_embeddings"
    embedding.tensor_path = PROJECTOR_TENSORS  # relative: logs stay relocatable
    embedding.tensor_shape.extend(embeddings.shape)
    embedding.metadata_path = PROJECTOR_METADATA
    projector.visualize_embeddings(run_dir, config)
    return tensor_path


def _write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)
