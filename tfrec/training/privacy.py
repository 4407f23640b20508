"""Privacy of DP-SGD retrieval training (`train.dp`): settings and accounting.

Epsilon comes from dp-accounting's RDP accountant for a Poisson-sampled Gaussian
mechanism composed over the steps run. The input pipeline takes shuffled fixed-size
batches, which that standard analysis approximates by Poisson sampling at rate q = B / N.
The unit of privacy is one training example (a positive event with its history).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, Optional

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config, DPConfig

log = logging.getLogger(__name__)

PRIVACY_UNIT = ("one training example (a positive event with the user's history before it); "
                "an event also appears in later histories of the same user, so a single "
                "event or a user is protected only by group privacy (weaker)")
ACCOUNTANT = "dp_accounting RDP, Poisson-sampled Gaussian (shuffled fixed-size batches)"
# Optimizers that update every row: DP noise touches every row (lazy_adam would skip it).
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise ValueError("train.dp needs the dp-accounting package: "
                         "pip install 'tfrec[privacy]'") from None
    return dp_accounting


def check_dp(cfg: Config, precision: str) -> DPConfig:
    """The run's DP settings, validated against the rest of the config.

    Raises:
      ValueError: a bad `train.dp` field, or a setting DP-SGD cannot run with (the
        message names the field).
    """
    dp, train = cfg.train.dp, cfg.train
    if dp is None:
        raise ValueError("train.dp is not set")
    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        raise ValueError("train.dp needs exactly one of noise_multiplier and target_epsilon "
                         f"(got noise_multiplier={dp.noise_multiplier}, "
                         f"target_epsilon={dp.target_epsilon})")
    checks = [("noise_multiplier", dp.noise_multiplier, lambda v: v is None or v >= 0, ">= 0"),
              ("target_epsilon", dp.target_epsilon, lambda v: v is None or v > 0, "> 0"),
              ("l2_clip", dp.l2_clip, lambda v: v > 0, "> 0"),
              ("delta", dp.delta, lambda v: 0 < v < 1, "in (0, 1)"),
              ("num_negatives", dp.num_negatives, lambda v: v >= 1, ">= 1"),
              ("chunk", dp.chunk, lambda v: v >= 1, ">= 1")]
    for name, value, ok, wanted in checks:
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise ValueError(f"train.dp.{name} must be a number, got {value!r}")
        if not ok(value):
            raise ValueError(f"train.dp.{name} must be {wanted}, got {value}")
    if train.strategy not in ("default", "one_device"):
        raise ValueError(f"train.dp runs on one device: train.strategy must be default or "
                         f"one_device, got {train.strategy!r}")
    if precision != "float32":
        raise ValueError(f"train.dp needs float32 (resolved precision {precision!r}); set "
                         "train.mixed_precision: float32")
    if cfg.model.num_hard_negatives:
        raise ValueError("train.dp scores each example against sampled catalog items; "
                         "model.num_hard_negatives must be null")
    if cfg.model.factorized_topk_ks:
        raise ValueError("train.dp: model.factorized_topk_ks must be [] (recall is "
                         "measured by the evaluation callback)")
    if train.optimizer not in DENSE_OPTIMIZERS + ("lazy_adam",):
        raise ValueError(f"train.optimizer {train.optimizer!r} unknown; under train.dp use "
                         f"one of {list(DENSE_OPTIMIZERS)}")
    _dp_accounting()
    if dp.noise_multiplier == 0:
        log.warning("train.dp.noise_multiplier is 0: clipping and sampled negatives without "
                    "noise, NO privacy (epsilon inf); for calibrating DP runs only")
    return dp


def dp_optimizer(name: str) -> str:
    """`train.optimizer` under DP: lazy_adam becomes adam (noise reaches every row)."""
    if name == "lazy_adam":
        log.warning("train.dp: optimizer lazy_adam -> adam (the noise touches every "
                    "embedding row; lazy updates would skip rows)")
        return "adam"
    return name


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting warns on every call for the low RDP orders it skips; not news."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps at (q, sigma), for `delta`
    (dp-accounting's RDP accountant with its default orders)."""
    dpa = _dp_accounting()
    accountant = dpa.rdp.RdpAccountant()
    with _quiet_absl():
        if steps > 0:
            accountant.compose(dpa.PoissonSampledDpEvent(
                sampling_rate, dpa.GaussianDpEvent(noise_multiplier)), int(steps))
        return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int,
                      delta: float) -> float:
    """The smallest noise multiplier whose epsilon over `steps` is at most the target."""
    dpa = _dp_accounting()
    with _quiet_absl():
        return float(dpa.calibrate_dp_mechanism(
            dpa.rdp.RdpAccountant,
            lambda sigma: dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(sampling_rate, dpa.GaussianDpEvent(sigma)),
                int(steps)),
            target_epsilon, delta, dpa.LowerEndpointAndGuess(0.1, 1.0), tol=1e-4))


def resolve_noise(dp: DPConfig, sampling_rate: float, planned_steps: int) -> float:
    """`dp.noise_multiplier`, or the one reaching `dp.target_epsilon` in the planned steps."""
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    sigma = noise_for_epsilon(dp.target_epsilon, sampling_rate, planned_steps, dp.delta)
    log.info("train.dp: noise multiplier %.4f reaches epsilon %.3g in %d steps",
             sigma, dp.target_epsilon, planned_steps)
    return sigma


def dp_report(dp: DPConfig, noise_multiplier: float, sampling_rate: float, steps: int,
              examples: int, batch_size: int, optimizer: str) -> Dict[str, Any]:
    """The "dp" block of metrics.json and of exported model cards."""
    return {"epsilon": epsilon(noise_multiplier, sampling_rate, steps, dp.delta),
            "delta": dp.delta, "noise_multiplier": noise_multiplier, "l2_clip": dp.l2_clip,
            "target_epsilon": dp.target_epsilon, "steps": int(steps),
            "sampling_rate": sampling_rate, "examples": int(examples),
            "batch_size": int(batch_size), "num_negatives": dp.num_negatives,
            "optimizer": optimizer, "privacy_unit": PRIVACY_UNIT, "accountant": ACCOUNTANT}


class EpsilonLogger(tf.keras.callbacks.Callback):
    """Writes epsilon after each epoch (all steps run so far) as TensorBoard `dp/epsilon`.

    Args:
      log_dir: the run's TensorBoard directory (written to its `train/` subdirectory).
      noise_multiplier, sampling_rate, delta: the accounting parameters.
    """

    def __init__(self, log_dir: Optional[str], noise_multiplier: float, sampling_rate: float,
                 delta: float):
        super().__init__()
        self.log_dir = log_dir
        self.noise_multiplier, self.sampling_rate, self.delta = (
            noise_multiplier, sampling_rate, delta)
        self.epsilons: Dict[int, float] = {}
        self._writer = None

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        steps = int(self.model.optimizer.iterations.numpy())
        eps = epsilon(self.noise_multiplier, self.sampling_rate, steps, self.delta)
        self.epsilons[epoch] = eps
        log.info("epoch %d: DP epsilon %.3f (delta %g, %d steps)", epoch + 1, eps,
                 self.delta, steps)
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir,
                                                                          "train"))
            with self._writer.as_default():
                tf.summary.scalar("dp/epsilon", eps, step=epoch)
            self._writer.flush()

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        if self._writer is not None:
            self._writer.close()
