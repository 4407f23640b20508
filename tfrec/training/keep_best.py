"""Keep-best-epoch: every trainer keeps the epoch with the best validation score.

Retrieval, the recommendation ranker and both search stages train with Keras `fit` and
keep their epoch with one tracker (`BestEpoch`): as a callback where validation runs
inside `fit` (`KeepBestEpoch`), between `fit` calls where it cannot (`fit_keep_best`).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

log = logging.getLogger(__name__)


class BestEpoch:
    """Remembers the values of the best-scoring epoch and puts them back.

    Args:
      snapshot: returns the current values (e.g. `model.get_weights`).
      assign: sets values returned by `snapshot`.
      nan_is_better: a NaN score (nothing to validate on) replaces the best, so the
        last epoch is kept; otherwise NaN never wins.
    """

    def __init__(self, snapshot: Callable[[], List[np.ndarray]],
                 assign: Callable[[List[np.ndarray]], None], nan_is_better: bool = False):
        self._snapshot, self._assign = snapshot, assign
        self._nan_is_better = nan_is_better
        self.best = -math.inf
        self.epoch: Optional[int] = None
        self._values: Optional[List[np.ndarray]] = None

    @classmethod
    def of_variables(cls, variables: Callable[[], Sequence[tf.Variable]],
                     nan_is_better: bool = False) -> "BestEpoch":
        """Tracks only these variables (called at each use: lazily built layers count).

        Snapshot what training changes: a frozen catalog table would be copied every
        epoch for nothing.
        """
        def assign(values):
            for variable, value in zip(variables(), values):
                variable.assign(value)

        return cls(lambda: [v.numpy() for v in variables()], assign, nan_is_better)

    @classmethod
    def of_model(cls, model: tf.keras.Model,
                 variables: Optional[Callable[[], Sequence[tf.Variable]]] = None,
                 nan_is_better: bool = False) -> "BestEpoch":
        """Tracks `variables` if given, else all of the model's weights."""
        if variables is not None:
            return cls.of_variables(variables, nan_is_better)
        return cls(model.get_weights, model.set_weights, nan_is_better)

    def update(self, score: float, epoch: Optional[int] = None) -> bool:
        """Snapshots when `score` beats the best so far; True if it did."""
        # "not <=" is also true when either side is NaN.
        better = not score <= self.best if self._nan_is_better else score > self.best
        if better:
            self.best, self.epoch = score, epoch
            self._values = self._snapshot()
        return better

    def restore(self) -> None:
        """Assigns the best epoch's values back (no-op before any snapshot)."""
        if self._values is not None:
            self._assign(self._values)


class KeepBestEpoch(tf.keras.callbacks.Callback):
    """Keeps the model of the best validation epoch; stops after `patience` without one.

    The score is a log key another callback wrote first (`monitor`, e.g.
    "val_recall_at_100") or computed here (`score_fn`, logged as `log_key`).

    Args:
      monitor: epoch-log key to maximise; or
      score_fn: returns the validation score of the current weights.
      log_key: epoch-log key `score_fn`'s value is written under.
      patience: epochs without improvement before training stops (None: never).
      variables: track only these (default: all of `model.get_weights()`).
      score_initial: also score the weights before training (epoch -1): training
        must beat where it started (e.g. a zero-shot encoder).
      nan_is_better: see `BestEpoch`.

    Raises:
      ValueError: neither or both of monitor and score_fn.
    """

    def __init__(self, monitor: Optional[str] = None,
                 score_fn: Optional[Callable[[], float]] = None, log_key: str = "val_score",
                 patience: Optional[int] = None,
                 variables: Optional[Callable[[], Sequence[tf.Variable]]] = None,
                 score_initial: bool = False, nan_is_better: bool = False):
        super().__init__()
        if (monitor is None) == (score_fn is None):
            raise ValueError("KeepBestEpoch needs exactly one of monitor or score_fn")
        if score_initial and score_fn is None:
            raise ValueError("score_initial needs a score_fn (there are no logs before fit)")
        self.monitor, self.score_fn, self.log_key = monitor, score_fn, log_key
        self.patience = patience
        self._variables = variables
        self.score_initial = score_initial
        self.nan_is_better = nan_is_better
        self.scores: List[float] = []
        self.tracker: Optional[BestEpoch] = None
        self._wait = 0

    def on_train_begin(self, logs=None):
        self.tracker = BestEpoch.of_model(self.model, self._variables, self.nan_is_better)
        self.scores, self._wait = [], 0
        if self.score_initial:
            self.scores.append(float(self.score_fn()))
            self.tracker.update(self.scores[-1], epoch=-1)

    def on_epoch_end(self, epoch, logs=None):
        if self.score_fn is not None:
            score = float(self.score_fn())
            if logs is not None:
                logs[self.log_key] = score
        else:
            if logs is None or self.monitor not in logs:
                log.warning("KeepBestEpoch: %r is not in the epoch logs", self.monitor)
                return
            score = float(logs[self.monitor])
        self.scores.append(score)
        if self.tracker.update(score, epoch):
            self._wait = 0
            return
        self._wait += 1
        if self.patience is not None and self._wait >= self.patience and epoch > 0:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.tracker.restore()


def fit_keep_best(model: tf.keras.Model, data, epochs: int, score_fn: Callable[[], float],
                  variables: Optional[Callable[[], Sequence[tf.Variable]]] = None,
                  score_initial: bool = False, nan_is_better: bool = False,
                  callbacks: Sequence[tf.keras.callbacks.Callback] = (), **fit_kwargs):
    """`model.fit` one epoch at a time, scoring between epochs; keeps the best epoch.

    For validation that cannot run inside `fit`: Keras calls callbacks in the
    distribution strategy's cross-replica scope, where a restored TF-Hub encoder refuses
    to run, so a full-catalog BERT evaluation has to run between `fit` calls.

    Args:
      model: a compiled Keras model.
      data: training input of `model.fit`.
      epochs: epochs to train.
      score_fn: validation score of the current weights (higher is better).
      variables: track only these (default: all of `model.get_weights()`).
      score_initial: the untrained weights compete too (scored first).
      nan_is_better: see `BestEpoch`.
      callbacks: Keras callbacks of every `fit` call.
      **fit_kwargs: more `model.fit` arguments (verbose, ...).

    Returns:
      (history, tracker): {"loss": per epoch, "scores": initial (if scored) then per
      epoch}, and the BestEpoch whose values are now in the model.
    """
    tracker = BestEpoch.of_model(model, variables, nan_is_better)
    history = {"loss": [], "scores": []}
    if score_initial:
        history["scores"].append(float(score_fn()))
        tracker.update(history["scores"][-1], epoch=-1)
    for epoch in range(epochs):
        fit = model.fit(data, epochs=epoch + 1, initial_epoch=epoch, callbacks=list(callbacks),
                        **fit_kwargs)
        history["loss"].append(float(fit.history["loss"][-1]))
        history["scores"].append(float(score_fn()))
        tracker.update(history["scores"][-1], epoch)
    tracker.restore()
    return history, tracker
