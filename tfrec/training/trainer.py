"""Retrieval training run: data -> vocabularies -> model under a strategy -> weights.

A run directory (`<checkpoint_dir>/<run>/`) holds everything needed to rebuild the
model in another process: config.yaml, vocab.json and the final weights. Re-running
the same run name resumes from its BackupAndRestore state.

Under ParameterServerStrategy Keras cannot run the distributed validation pass with
this model's evaluation callbacks, so validation happens on the coordinator: recall
every epoch (in-process, as always), loss and TFRS top-k metrics once after fit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config
from tfrec.data.examples import positive_interactions
from tfrec.data.feature_spec import FeatureSpec
from tfrec.data.io import load_data_tables
from tfrec.data.prepare import (PSEUDONYM_META, load_meta, prepare_records, read_vocab,
                                 source_signature)
from tfrec.data.pseudonym import is_pseudonym, key_fingerprint, users_key
from tfrec.data.tfrecord import count_records, make_dataset
from tfrec.data.feature_spec import catalog_features
from tfrec.metrics.retrieval import build_eval_set, embed_in_batches
from tfrec.features.vocab import Vocabularies, build_vocabularies
from tfrec.models.dp import DPTwoTowerModel
from tfrec.models.retrieval import TwoTowerModel
from tfrec.training.callbacks import (PROJECTOR_MAX_POINTS, BackupAndRestore,
                                      RefreshCatalogIndex, RetrievalEvaluation,
                                      config_fingerprint, metric_key, refresh_index, tower_fn,
                                      write_hparams, write_projector)
from tfrec.training.histograms import SampledTensorBoard
from tfrec.training.title_vectors import title_vectors
from tfrec.training.warm_start import grow_vocabularies, transfer_weights
from tfrec.training.keep_best import KeepBestEpoch
from tfrec.training.optimizers import make_optimizer
from tfrec.training.negatives import (check_negatives, draw_shares, negatives_dataset,
                                      raw_negatives_dataset, with_negatives)
from tfrec.training.privacy import (EpsilonLogger, check_dp, dp_optimizer, dp_report,
                                    resolve_noise)
from tfrec.training.strategy import (configure_devices, is_chief, make_strategy, num_workers,
                                     resolve_precision, tf_config)

log = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
WEIGHTS_DIR = "weights"
WEIGHTS_PREFIX = "model"


@dataclass
class TrainResult:
    """What a training run produced.

    Args:
      run_dir: directory with config.yaml, vocab.json, weights/ and metrics.json.
      tensorboard_dir: `<log_dir>/<run>/`.
      model: the trained Keras model (in this process).
      history: Keras history (loss and validation metrics per epoch).
      val_metrics: validation metrics of the last epoch.
      examples_per_second: training throughput over the whole fit.
      strategy / replicas / workers / ps: how it was distributed.
      initial_epoch: first epoch this fit ran (> 0 when resumed from a backup).
      epoch_seconds: wall time of each epoch's training steps (no validation/callbacks).
    """

    run_name: str
    run_dir: str
    tensorboard_dir: str
    model: TwoTowerModel
    history: Dict[str, List[float]] = field(default_factory=dict)
    val_metrics: Dict[str, float] = field(default_factory=dict)
    examples_per_second: float = 0.0
    strategy: str = "default"
    replicas: int = 1
    workers: int = 1
    ps: int = 0
    initial_epoch: int = 0
    epoch_seconds: List[float] = field(default_factory=list)


def default_run_name() -> str:
    return time.strftime("retrieval-%Y%m%d-%H%M%S")


def resolve_run_dir(checkpoint_dir: str, run: Optional[str] = None) -> str:
    """Finds a run directory by name, or the latest run when `run` is None/"latest"."""
    if run in (None, "latest"):
        latest = os.path.join(checkpoint_dir, LATEST_FILE)
        if not os.path.exists(latest):
            raise FileNotFoundError(
                f"no training run found under {checkpoint_dir!r}; run `tfrec train` first")
        with open(latest) as f:
            run = f.read().strip()
    run_dir = os.path.join(checkpoint_dir, run)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"training run {run!r} not found in {checkpoint_dir!r}")
    return run_dir


def warm_start_dir(cfg: Config, run_dir: str) -> str:
    """The run directory `train.warm_start` names (a directory or a run name).

    Raises:
      FileNotFoundError: no such run.
      ValueError: it is `run_dir` itself (a run cannot start from its own weights).
    """
    source = cfg.train.warm_start
    if not os.path.isfile(os.path.join(source, "config.yaml")):  # a run name
        source = resolve_run_dir(cfg.train.checkpoint_dir, source)
    if os.path.abspath(source) == os.path.abspath(run_dir):
        raise ValueError(f"train.warm_start names the run being trained ({run_dir!r}); "
                         "warm-start from an earlier run (or give this one another "
                         "train.run_name)")
    return source


def ensure_prepared(cfg: Config) -> dict:
    """Writes TFRecords for the configured data once; later runs reuse them.

    The cache is keyed on the raw tables, the split, the history length and the feature
    specification, so records written for other features are never parsed. Records the
    Beam engine wrote (`tfrec prepare --engine beam`, maybe on a cluster) are never
    silently rebuilt in this process: a mismatch is an error naming the setting.

    Records of pseudonymised user ids are never rebuilt with raw ids or another key
    behind the user's back: that is an error too (raw records are rebuilt pseudonymised).

    Raises:
      ValueError: the Beam-prepared records do not match the config, or the records'
        pseudonymisation does not.
    """
    features = FeatureSpec.from_config(cfg.features)
    key = users_key(cfg.data)
    fingerprint = key_fingerprint(key) if key is not None else None
    wanted = {"features": features.fingerprint(),
              "history_length": cfg.data.history_length,
              "val_fraction": cfg.data.val_fraction,
              "test_fraction": cfg.data.test_fraction,
              "train_days": cfg.data.train_days,
              "vocab_min_count": cfg.data.vocab_min_count,
              PSEUDONYM_META: fingerprint}
    try:
        meta = load_meta(cfg.data.tfrecord_dir)
    except FileNotFoundError:
        meta = None
    if meta is not None and meta.get(PSEUDONYM_META) not in (None, fingerprint):
        how = ("this run's key is another one" if fingerprint else
               "this run has data.pseudonymize_users off")
        raise ValueError(
            f"the records in {cfg.data.tfrecord_dir!r} hold user ids pseudonymised with key "
            f"fingerprint {meta[PSEUDONYM_META]}, but {how}; use the key they were prepared with "
            f"(--pseudonymize-users, $TFREC_PSEUDONYM_KEY or --pseudonym-key-file), or "
            f"run `tfrec prepare` with this config to rebuild them")
    if meta is not None:
        differ = sorted(k for k, v in wanted.items() if meta.get(k) != v)
        if not differ and (meta.get("engine") == "beam"
                           or meta.get("source_signature") == source_signature(
                               cfg.data.data_dir)):
            return meta
        if meta.get("engine") == "beam" and cfg.data.engine == "pandas":
            settings = ", ".join(f"{k}: {meta.get(k)!r} there, {wanted[k]!r} here"
                                 for k in differ)
            raise ValueError(
                f"the records in {cfg.data.tfrecord_dir!r} were prepared by the Beam engine "
                f"with other settings ({settings}); run `tfrec prepare --engine beam` again "
                f"with this config, or set data.engine: beam")
    # data.max_bad_share 0: the first bad row raises, with its row (load_tables)
    return prepare_records(cfg, max_bad_share=cfg.data.max_bad_share or None)


def profile_steps(cfg: Config) -> Union[int, Tuple[int, int]]:
    """`train.profile_steps` as Keras' TensorBoard `profile_batch` (0: no profile).

    Raises:
      ValueError: not () or (first, last) with 1 <= first <= last.
    """
    steps = tuple(cfg.train.profile_steps or ())
    if not steps:
        return 0
    if (len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
            or not 1 <= steps[0] <= steps[1]):
        raise ValueError(f"train.profile_steps must be [first, last] steps with 1 <= first <= "
                         f"last (e.g. [10, 15]), got {list(steps)}")
    return steps[0], steps[1]


# Estimated memory of one preprocessed training example (ids, token ids, trigram buckets).
CACHED_EXAMPLE_BYTES = 2048


def cache_input(cfg: Config, examples: int) -> bool:
    """Whether the preprocessed training examples fit `train.input_cache_mb`.

    Raises:
      ValueError: a negative budget.
    """
    if cfg.train.input_cache_mb < 0:
        raise ValueError(f"train.input_cache_mb must be >= 0 (0 disables the cache), got "
                         f"{cfg.train.input_cache_mb}")
    budget = cfg.train.input_cache_mb << 20
    return budget > 0 and examples * CACHED_EXAMPLE_BYTES <= budget


def steps_per_execution(cfg: Config, single_replica: bool) -> int:
    """Training steps per graph call: `train.steps_per_execution` on one replica, else 1.

    Also 1 when `train.profile_steps` asks for a trace: Keras' profiler counts calls, and
    the steps traced should be the steps asked for.

    Raises:
      ValueError: a value below 1.
    """
    value = cfg.train.steps_per_execution
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"train.steps_per_execution must be an integer >= 1, got {value!r}")
    return value if single_replica and not cfg.train.profile_steps else 1


def early_stopping_patience(cfg: Config) -> int:
    """`train.early_stopping_patience`: epochs without a better validation score before
    training stops (0 would stop after the second epoch whatever it scored).

    Raises:
      ValueError: not an integer >= 1.
    """
    value = cfg.train.early_stopping_patience
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"train.early_stopping_patience must be an integer >= 1 (epochs "
                         f"without a better {cfg.train.early_stopping_metric}; a value "
                         f"above train.epochs never stops early), got {value!r}")
    return value


def build_model(vocab: Vocabularies, cfg: Config, precision: str = "float32",
                dp_noise: Optional[float] = None,
                steps_per_execution: int = 1) -> TwoTowerModel:
    """Builds and compiles the model; float16 towers get a loss-scaling optimizer.

    With `cfg.train.dp`, a DP-SGD model with noise multiplier `dp_noise` (required then)
    and a non-lazy optimizer. `steps_per_execution` is Keras' (the trainer passes
    `train.steps_per_execution` when it trains on one replica).
    """
    features = FeatureSpec.from_config(cfg.features)
    name = cfg.train.optimizer
    if cfg.train.dp is not None:
        if dp_noise is None:
            raise ValueError("build_model: train.dp needs the resolved noise multiplier")
        model = DPTwoTowerModel(vocab, cfg.model, precision=precision, features=features,
                                l2_clip=cfg.train.dp.l2_clip, noise_multiplier=dp_noise,
                                chunk=cfg.train.dp.chunk)
        name = dp_optimizer(name)
    else:
        model = TwoTowerModel(vocab, cfg.model, precision=precision, features=features)
    optimizer = make_optimizer(name, cfg.train.learning_rate)
    if precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)
    return model


def load_trained_model(run_dir: str) -> "tuple[TwoTowerModel, Config, Vocabularies]":
    """Rebuilds a trained model from its run directory (another process is fine)."""
    cfg = Config.from_yaml(os.path.join(run_dir, "config.yaml"))
    vocab = Vocabularies.load(run_dir)
    weights = os.path.join(run_dir, WEIGHTS_DIR)
    if not os.path.isdir(weights):
        raise FileNotFoundError(
            f"run {run_dir!r} has no final weights (training did not finish?)")
    model = TwoTowerModel(vocab, cfg.model, features=FeatureSpec.from_config(cfg.features))
    model.load_weights(os.path.join(weights, WEIGHTS_PREFIX)).expect_partial()
    return model, cfg, vocab


def train_retrieval(cfg: Config,
                    extra_callbacks: Optional[List[tf.keras.callbacks.Callback]] = None
                    ) -> TrainResult:
    """Trains the two-tower model described by `cfg` and saves its run directory.

    Args:
      cfg: the run's config (data, model, train sections).
      extra_callbacks: more Keras callbacks, run after the built-in ones.
    """
    profile_steps(cfg)  # a bad range fails before any data or device work
    patience = early_stopping_patience(cfg)
    configure_devices(cfg.train.cpu_devices)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    precision = resolve_precision(cfg.train.mixed_precision)
    if cfg.train.dp is not None:
        check_dp(cfg, precision)  # before any data or device work
    check_negatives(cfg)
    strategy = make_strategy(cfg.train.strategy, cfg.train.tpu, cfg.train.ps_min_shard_bytes)
    chief = is_chief(strategy)
    parameter_server = isinstance(strategy, tf.distribute.ParameterServerStrategy)

    meta = ensure_prepared(cfg)
    tables = load_data_tables(cfg.data)
    run_name = cfg.train.run_name or default_run_name()
    cfg.train.run_name = run_name
    run_dir = os.path.join(cfg.train.checkpoint_dir, run_name)
    tb_dir = os.path.join(cfg.train.log_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)

    t_val, t_test = int(meta["split"]["t_val"]), int(meta["split"]["t_test"])
    positives = positive_interactions(tables.events)
    train_positives = positives[positives["ts"] < t_val]
    if cfg.data.train_days is not None:
        train_positives = train_positives[train_positives["ts"]
                                          >= t_val - cfg.data.train_days * 86400]
    previous = None
    if cfg.train.warm_start:
        previous = load_trained_model(warm_start_dir(cfg, run_dir))
        if cfg.data.pseudonymize_users and not all(map(is_pseudonym, previous[2].users)):
            # growing its vocabulary would copy the raw ids into this run
            raise ValueError(f"train.warm_start {cfg.train.warm_start!r} was trained on raw "
                             f"user ids; a pseudonymised run cannot start from it (train "
                             f"from scratch with --pseudonymize-users)")
    if os.path.exists(os.path.join(run_dir, "vocab.json")):
        vocab = Vocabularies.load(run_dir)  # resuming: keep the lookups the weights expect
    else:
        vocab = build_vocabularies(train_positives, tables.catalog,
                                   cfg.model.text_max_tokens, cfg.model.price_buckets,
                                   FeatureSpec.from_config(cfg.features),
                                   users=read_vocab(cfg.data.tfrecord_dir, "users"),
                                   items=read_vocab(cfg.data.tfrecord_dir, "items"))
        if previous is not None:  # old ids keep their rows, new ones are appended
            vocab = grow_vocabularies(previous[2], vocab)
        if chief:
            vocab.save(run_dir)
    vectors = None
    if cfg.model.title_encoder:  # frozen title embeddings, computed once per title
        vectors = title_vectors(cfg.model, vocab.catalog_items, tables.catalog)
        cfg.model.title_vector_width = int(vectors.shape[1])
    if chief:
        cfg.to_yaml(os.path.join(run_dir, "config.yaml"))

    examples = int(meta["counts"]["train"])
    # A tiny last batch is a softmax with almost no negatives.
    drop_remainder = examples >= 2 * cfg.train.batch_size
    dp_noise, sampling_rate = None, cfg.train.batch_size / max(examples, 1)
    per_epoch = (examples // cfg.train.batch_size if drop_remainder
                 else -(-examples // cfg.train.batch_size))
    if cfg.train.dp is not None:
        planned = (cfg.train.steps_per_epoch or per_epoch) * cfg.train.epochs
        dp_noise = resolve_noise(cfg.train.dp, sampling_rate, planned)
    # Several steps per call on one replica only: under Mirrored strategies their loop's
    # collectives failed (two logical CPUs), and cluster workers shard the data.
    single = not parameter_server and strategy.num_replicas_in_sync == 1
    with strategy.scope():
        model = build_model(vocab, cfg, precision, dp_noise=dp_noise,
                            steps_per_execution=steps_per_execution(cfg, single))
        warm = transfer_weights(previous[0], model) if previous is not None else None
        if vectors is not None:
            model.candidate_tower.title_vectors.set_vectors(vocab.catalog_items, vectors)
    workers, num_ps = num_workers(strategy), 0
    if parameter_server:  # the strategy was built from TF_CONFIG
        jobs = (tf_config() or {})["cluster"]
        workers, num_ps = len(jobs["worker"]), len(jobs["ps"])
    elif workers > 1:
        # Metric results (loss, TFRS top-k) are already aggregated over all workers when a
        # step returns them; take them as they are rather than Keras' "auto" ("sum" across
        # workers). tests/test_cluster.py checks them against a single-process evaluation.
        model.distribute_reduction_method = "first"
    if (workers > 1 or parameter_server) and not log.isEnabledFor(logging.DEBUG):
        # TensorFlow logs one INFO line per step and cluster (all-reduce, closures).
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if parameter_server:
        _log_sharding(model)

    patterns = meta["patterns"]
    shares = draw_shares(positives, tables.catalog, t_val)  # of the catalog draws
    steps_per_epoch = cfg.train.steps_per_epoch
    validation_steps = None  # None: the whole validation set, a new iterator per epoch
    if parameter_server:
        # Workers pull batches forever from their own input pipeline: Keras needs a
        # dataset function and a fixed number of steps per epoch.
        steps_per_epoch = steps_per_epoch or max(
            1, int(meta["counts"]["train"]) // cfg.train.batch_size)
        train_ds = tf.keras.utils.experimental.DatasetCreator(
            _ps_dataset_fn(patterns["train"], cfg, drop_remainder, tables.catalog, shares))
        val_ds = None
    else:
        train_ds = make_dataset(patterns["train"], cfg.train.batch_size,
                                cfg.data.history_length, shuffle=True, seed=cfg.train.seed,
                                deterministic=cfg.train.deterministic,
                                repeat=steps_per_epoch is not None,
                                drop_remainder=drop_remainder, features=model.features,
                                preprocess=model.preprocess,
                                cache=cache_input(cfg, int(meta["counts"]["train"])))
        draws = cfg.train.dp.num_negatives if dp_noise is not None else \
            cfg.model.catalog_negatives
        if draws:  # each batch meets uniform samples of the catalog
            train_ds = with_negatives(train_ds, negatives_dataset(
                tables.catalog, model, draws, cfg.train.seed, shares=shares),
                None if steps_per_epoch else per_epoch)
        if single and not steps_per_epoch:
            # Keras refuses several steps per call over a dataset of unknown length;
            # knowing it, it shortens the epoch's last call to the batches left.
            train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(per_epoch))
        val_ds = make_dataset(patterns["val"], cfg.train.batch_size, cfg.data.history_length,
                              shuffle=False, deterministic=True, features=model.features,
                              preprocess=model.preprocess)
        val_examples = int(meta["counts"].get("val") or 0)
        if workers == 1 and val_examples > 0:
            # One pass per epoch from an iterator kept across epochs: a new iterator
            # re-instantiates the preprocessing functions (~0.3 s each epoch).
            val_ds = val_ds.repeat()
            validation_steps = -(-val_examples // cfg.train.batch_size)
    eval_set = build_eval_set(tables.events, t_val, t_test, cfg.data.history_length,
                              max_users=cfg.train.eval_max_users, seed=cfg.train.seed)
    evaluation = RetrievalEvaluation(eval_set, tables.catalog, cfg.train.eval_ks)
    monitor = "val_" + metric_key(cfg.train.early_stopping_metric.replace("_at_", "@"))
    timer = _EpochTimer()
    callbacks = [
        timer,  # first: its epoch end comes before the evaluation callbacks'
        RefreshCatalogIndex(tables.catalog),  # no-op unless factorized metrics are on
        evaluation,  # first: adds val_recall_at_k to the logs the others read
        SampledTensorBoard(tb_dir if chief else tempfile.mkdtemp(),
                           histogram_freq=cfg.train.histogram_freq,
                           update_freq="epoch", write_graph=False,
                           profile_batch=profile_steps(cfg) if chief else 0),
        KeepBestEpoch(monitor=monitor, patience=patience),
        BackupAndRestore(os.path.join(run_dir, "backup"),
                         config_fingerprint(cfg.model, cfg.features)),
        _ResumeLog(),
    ] + ([EpsilonLogger(tb_dir if chief else None, dp_noise, sampling_rate,
                        cfg.train.dp.delta)] if dp_noise is not None else [])
    callbacks += list(extra_callbacks or [])
    if chief:
        write_hparams(tb_dir, _hparams(cfg, precision, strategy, dp_noise),
                      [f"epoch_{metric_key(f'recall@{k}')}" for k in cfg.train.eval_ks]
                      + ["epoch_loss"], trial_id=run_name)

    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
                        steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                        callbacks=callbacks,
                        verbose=2 if chief else 0)
    elapsed = time.perf_counter() - start
    epochs_run = max(1, len(history.history.get("loss", [])))
    seen = (steps_per_epoch * cfg.train.batch_size if steps_per_epoch else examples) * epochs_run
    initial_epoch = int(history.epoch[0]) if history.epoch else int(cfg.train.epochs)

    # Final metrics on the weights actually saved (KeepBestEpoch restored the best epoch).
    val_metrics = evaluation.evaluate()
    _save_weights_atomically(model, run_dir, chief)
    if parameter_server:
        # The coordinator continues with a local copy: Keras' distributed evaluation is not
        # used under PS, and callers keep a model that works after the servers stop.
        model, _, _ = load_trained_model(run_dir)
        val_metrics.update(evaluate_keras_metrics(model, patterns["val"], tables.catalog,
                                                  cfg.train.batch_size,
                                                  cfg.data.history_length))
    dp = None
    if dp_noise is not None:  # epsilon counts every step run, kept epoch or not
        dp = dp_report(cfg.train.dp, dp_noise, sampling_rate,
                       int(model.optimizer.iterations.numpy()), examples,
                       cfg.train.batch_size, type(model.optimizer).__name__.lower())
        log.info("train.dp: epsilon %.3f at delta %g after %d steps", dp["epsilon"],
                 dp["delta"], dp["steps"])
    if chief:
        shown = tables.catalog
        if len(shown) > PROJECTOR_MAX_POINTS:  # a seeded sample: cost stays bounded
            shown = shown.sample(n=PROJECTOR_MAX_POINTS, random_state=cfg.train.seed)
        item_emb = embed_in_batches(tower_fn(model.candidate_tower),
                                    catalog_features(shown, model))
        write_projector(tb_dir, item_emb, shown["title"],
                        {c: shown[c] for c in ("item_id", "category", "brand")})
        _write_json(os.path.join(run_dir, "metrics.json"),
                    {"validation": val_metrics, "history": _plain_history(history.history),
                     "initial_epoch": initial_epoch, "strategy": cfg.train.strategy,
                     "workers": workers, "examples_per_second": seen / elapsed,
                     "seconds": elapsed, "epoch_seconds": timer.seconds,
                     "examples_per_epoch": seen // epochs_run,
                     "warm_start": ({"from": cfg.train.warm_start, **warm} if warm else None),
                     "train_steps": int(model.optimizer.iterations.numpy()),
                     "dp": dp})
        with open(os.path.join(cfg.train.checkpoint_dir, LATEST_FILE), "w") as f:
            f.write(run_name)
    return TrainResult(run_name=run_name, run_dir=run_dir, tensorboard_dir=tb_dir,
                       model=model, history=_plain_history(history.history),
                       val_metrics=val_metrics, examples_per_second=seen / elapsed,
                       strategy=cfg.train.strategy,
                       replicas=strategy.num_replicas_in_sync,
                       workers=workers, ps=num_ps,
                       initial_epoch=initial_epoch, epoch_seconds=timer.seconds)


class _EpochTimer(tf.keras.callbacks.Callback):
    """Wall seconds of each epoch's training steps, before validation and other callbacks."""

    def __init__(self):
        super().__init__()
        self.seconds: List[float] = []
        self._start: Optional[float] = None

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_test_begin(self, logs: Optional[dict] = None) -> None:
        self._stop()  # validation starts: the epoch's training steps are done

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._stop()  # no validation data (parameter servers)


class _ResumeLog(tf.keras.callbacks.Callback):
    """Logs where a resumed fit starts (BackupAndRestore moves the first epoch on)."""

    def __init__(self):
        super().__init__()
        self._first = True

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        if self._first and epoch > 0:
            log.info("resumed from backup: epochs 1-%d done, starting at epoch %d",
                     epoch, epoch + 1)
        self._first = False


def _ps_dataset_fn(pattern: str, cfg: Config, drop_remainder: bool, catalog: pd.DataFrame,
                   shares: pd.Series):
    """Per-worker input of ParameterServerStrategy: each worker shuffles its own stream.

    Batches stay raw (the model's layers live on the coordinator): the step preprocesses
    them, and the catalog draws (`model.catalog_negatives`), itself.
    """
    features = FeatureSpec.from_config(cfg.features)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        seed = cfg.train.seed + context.input_pipeline_id
        ds = make_dataset(pattern, context.get_per_replica_batch_size(cfg.train.batch_size),
                          cfg.data.history_length, shuffle=True, seed=seed,
                          deterministic=cfg.train.deterministic, repeat=True,
                          drop_remainder=drop_remainder, features=features)
        if cfg.model.catalog_negatives:
            ds = with_negatives(ds, raw_negatives_dataset(
                catalog, cfg.model.catalog_negatives, seed, shares, features))
        return ds

    return dataset_fn


def _log_sharding(model: tf.keras.Model) -> Dict[str, List[str]]:
    """Logs which variables ParameterServerStrategy split across PS tasks, and where.

    Keras lists the shards themselves (`<name>/part_<i>`), each placed on one PS task.
    """
    sharded: Dict[str, List[str]] = {}
    for var in model.variables:
        match = re.fullmatch(r"(.*)/part_(\d+)(:\d+)?", var.name)
        if match:
            task = var.device.split("/job:")[-1].split("/device")[0]
            sharded.setdefault(match.group(1), []).append(f"{var.shape[0]} rows on {task}")
    for name, shards in sharded.items():
        log.info("sharded %s: %s", name, ", ".join(shards))
    log.info("parameter_server: %d variables sharded across ps tasks", len(sharded))
    return sharded


def evaluate_keras_metrics(model: TwoTowerModel, val_pattern: str, catalog: pd.DataFrame,
                           batch_size: int, history_length: int) -> Dict[str, float]:
    """Validation loss and TFRS top-k metrics of a model, in this process.

    Run on a model without a strategy, the figures do not depend on how training was
    distributed (the parameter-server coordinator runs this after fit).

    Args:
      model: a two-tower model built outside any strategy scope (e.g. `load_trained_model`).
      val_pattern: TFRecord glob of the validation examples.
      catalog: the items of the factorized-metrics index (if the config enables it).
      batch_size: evaluation batch size (the in-batch softmax loss depends on it).
      history_length: history items per example.
    """
    if model.optimizer is None:
        model.compile(optimizer="sgd")  # evaluate() needs a compiled model; no training
    refresh_index(model, catalog)
    dataset = make_dataset(val_pattern, batch_size, history_length, shuffle=False,
                           deterministic=True, features=model.features)
    # Keras needs the number of batches when the model runs several steps per call.
    steps = -(-count_records(val_pattern) // batch_size)
    results = model.evaluate(dataset, steps=steps, return_dict=True, verbose=0)
    return {k: float(v) for k, v in results.items()}


def _save_weights_atomically(model: tf.keras.Model, run_dir: str, chief: bool) -> None:
    """Writes weights to a temp dir and renames it, so a crash never leaves half a model."""
    tmp = tempfile.mkdtemp(prefix=".weights-", dir=run_dir if chief else None)
    model.save_weights(os.path.join(tmp, WEIGHTS_PREFIX))
    if not chief:  # workers take part in the collective save, then drop their copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    final = os.path.join(run_dir, WEIGHTS_DIR)
    old = None
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _hparams(cfg: Config, precision: str, strategy: tf.distribute.Strategy,
             dp_noise: Optional[float] = None) -> Dict[str, object]:
    m, t = cfg.model, cfg.train
    return {"embedding_dim": m.embedding_dim, "hidden_units": str(list(m.hidden_units)),
            "projection": m.projection,
            "temperature": m.temperature, "logq_correction": m.logq_correction,
            "num_hard_negatives": m.num_hard_negatives or 0, "id_dropout": m.id_dropout,
            "catalog_negatives": m.catalog_negatives,
            "batch_size": t.batch_size, "learning_rate": t.learning_rate,
            "optimizer": t.optimizer, "strategy": t.strategy,
            "replicas": strategy.num_replicas_in_sync, "precision": precision,
            "history_length": cfg.data.history_length,
            "dp_noise_multiplier": dp_noise or 0.0}


def _plain_history(history: Dict[str, list]) -> Dict[str, List[float]]:
    return {k: [float(x) for x in v] for k, v in history.items()}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)
