"""Keep-best-epoch for training loops that pick their epoch on a validation score.

Keras' EarlyStopping restores the best weights of `model.fit`; loops that score an epoch
themselves (search two-tower, search ranker) share this one tracker instead.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf


class BestEpoch:
    """Remembers the variable values of the best-scoring epoch and restores them.

    Args:
      variables: returns the variables to snapshot (called at each snapshot, so layers
        built lazily are included). Snapshot only what training changes: a frozen
        catalog table would be copied every epoch for nothing.
      nan_is_better: a NaN score (nothing to validate on) replaces the best, so the
        last epoch is kept; otherwise NaN never wins.
    """

    def __init__(self, variables: Callable[[], Sequence[tf.Variable]],
                 nan_is_better: bool = False):
        self._variables = variables
        self._nan_is_better = nan_is_better
        self.best = -math.inf
        self._values: Optional[List[np.ndarray]] = None

    def update(self, score: float) -> bool:
        """Snapshots the variables when `score` beats the best so far; True if it did."""
        # "not <=" is also true when either side is NaN.
        better = not score <= self.best if self._nan_is_better else score > self.best
        if better:
            self.best = score
            self._values = [v.numpy() for v in self._variables()]
        return better

    def restore(self) -> None:
        """Assigns the best epoch's values back (no-op before any snapshot)."""
        if self._values is None:
            return
        for variable, value in zip(self._variables(), self._values):
            variable.assign(value)
