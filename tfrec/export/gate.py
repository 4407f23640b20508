"""Export gate: a retrained model replaces the served one only if it is not worse.

Refreshed models are trained unattended every day; a bad day (broken data, a diverged
run) must not reach users. The candidate and the version currently exported are scored
on the same latest validation period before anything is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf
import tensorflow_text  # noqa: F401  (text is case-folded with a TF Text op)

from tfrec.data.feature_spec import FeatureSpec
from tfrec.evaluation.report import evaluate_period
from tfrec.export.versioned import list_versions

__all__ = ["GATE_METRIC", "GateRefused", "GateResult", "check_gate", "signature_embedding_fn"]

GATE_METRIC = "recall@100"


class GateRefused(ValueError):
    """The candidate is worse than the exported version by more than the tolerance."""


@dataclass
class GateResult:
    """Both models' validation metric; `current_version` None when nothing was exported."""

    metric: str
    candidate: float
    current: Optional[float]
    current_version: Optional[int]
    tolerance: float
    period: Dict[str, int]
    users: int

    @property
    def passed(self) -> bool:
        return self.current is None or self.candidate >= self.current - self.tolerance

    def card(self) -> Dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def signature_embedding_fn(fn) -> Callable[[Dict[str, np.ndarray]], np.ndarray]:
    """An exported embedding signature as a numpy embedding function (see `tower_fn`).

    Its `features` attribute lists the inputs it reads, so catalog columns are fed as the
    exported version expects, whatever today's feature specification is.
    """
    specs = fn.structured_input_signature[1]

    def call(features: Dict[str, np.ndarray]) -> np.ndarray:
        args = {k: tf.constant(v, dtype=specs[k].dtype) for k, v in features.items()
                if k in specs}
        return fn(**args)["embedding"].numpy()

    call.features = FeatureSpec.from_inputs(specs)
    return call


def check_gate(candidate_fns, events: pd.DataFrame, catalog: pd.DataFrame, period: Dict[str, int],
               history_length: int, model_dir: str, tolerance: float,
               max_users: Optional[int] = 2000) -> GateResult:
    """Scores the candidate and the latest version under `model_dir` on one period.

    Args:
      candidate_fns: (query_fn, candidate_fn) of the model to export.
      events / catalog: today's tables (the period's users are frozen at its start).
      period: {"start": ts, "end": ts}: the latest validation period.
      history_length: history items per user.
      model_dir: `<base_dir>/<model_name>` of the served retrieval model.
      tolerance: largest drop of recall@100 accepted (absolute, e.g. 0.01).
      max_users: seeded sample of the period's users (bounded cost).

    Returns:
      The GateResult (check `.passed`).

    Raises:
      ValueError: tolerance is negative.
    """
    if not tolerance >= 0:
        raise ValueError(f"gate tolerance must be >= 0, got {tolerance}")

    def score(query_fn, candidate_fn) -> Dict[str, float]:
        rows = evaluate_period(events, catalog, period["start"], period["end"], history_length,
                               query_fn, candidate_fn, ks=(10, 100), max_users=max_users,
                               search=False)
        return rows["two_tower"]

    mine = score(*candidate_fns)
    versions = list_versions(model_dir)
    current = None
    if versions:
        loaded = tf.saved_model.load(os.path.join(model_dir, str(versions[-1])))
        current = score(signature_embedding_fn(loaded.signatures["query_embedding"]),
                        signature_embedding_fn(loaded.signatures["candidate_embedding"]))
    return GateResult(metric=GATE_METRIC, candidate=float(mine[GATE_METRIC]),
                      current=None if current is None else float(current[GATE_METRIC]),
                      current_version=versions[-1] if versions else None,
                      tolerance=float(tolerance), period=dict(period),
                      users=int(mine.get("users", 0)))


def refusal(result: GateResult) -> GateRefused:
    """The error that stops an export, naming both figures."""
    return GateRefused(
        f"export gate: the candidate's validation {result.metric} {result.candidate:.4f} is "
        f"below version {result.current_version}'s {result.current:.4f} by more than the "
        f"tolerance {result.tolerance:g} ({result.users} users of the period "
        f"{json.dumps(result.period)}); nothing was exported")
