"""Keras callbacks of retrieval training: validation recall, HParams, projector.

Validation recall is computed in this process over the whole catalog (exact top-k),
not through distributed metrics, so it is the same on one worker or many.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import api as hp

from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import EvalSet, embed_in_batches, evaluate_embeddings
from tfrec.models.embedding import tower_fn

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
    """Keras BackupAndRestore that also accepts OneDeviceStrategy.

    Keras only allow-lists strategies it tested; one device is the single-worker case
    its checkpointing already handles, and a test resumes a crashed one_device run.
    """

    def __init__(self, backup_dir: str, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self._supported_strategies = self._supported_strategies + (
            tf.distribute.OneDeviceStrategy,)


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

    Args:
      run_dir: the run's TensorBoard directory.
      embeddings: [N, D] item embeddings.
      labels: item titles (first metadata column).
      columns: more metadata columns (e.g. item_id, category).
    """
    os.makedirs(run_dir, exist_ok=True)
    columns = {"title": list(labels), **(columns or {})}
    with open(os.path.join(run_dir, "metadata.tsv"), "w", encoding="utf-8") as f:
        f.write("\t".join(columns) + "\n")
        for row in zip(*columns.values()):
            f.write("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in row) + "\n")
    variable = tf.Variable(embeddings.astype(np.float32), name="item_embeddings")
    checkpoint = tf.train.Checkpoint(item_embeddings=variable)
    path = checkpoint.save(os.path.join(run_dir, "projector.ckpt"))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "item_embeddings/.ATTRIBUTES/VARIABLE_VALUE"
    embedding.metadata_path = "metadata.tsv"
    # No model_checkpoint_path: the plugin finds the latest checkpoint of the run dir,
    # which keeps logs relocatable.
    projector.visualize_embeddings(run_dir, config)
    return path
