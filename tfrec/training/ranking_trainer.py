"""Ranker training run: retrieval candidates -> multi-task ranker under a strategy.

The ranker is trained on the retrieval model's top-K for users frozen at the start of
the validation period, labelled by what they did during it (the retrieval model never
trained on that period, so its scores there look like its scores at serving time).
The run lives in `<retrieval run>/ranker/`: config.yaml, catalog_stats.parquet,
weights/ and metrics.json, so another process rebuilds exactly this ranker.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config, RankingConfig
from tfrec.data.examples import positive_interactions
from tfrec.data.feature_spec import FeatureSpec
from tfrec.data.io import atomic_write, load_data_tables, load_tables
from tfrec.metrics.ranking import scored_list_metrics
from tfrec.metrics.retrieval import build_eval_set
from tfrec.features.catalog import CatalogLookup, catalog_statistics
from tfrec.features.vocab import Vocabularies
from tfrec.models.encoder_rate import encoder_optimizer
from tfrec.models.ranking import TEACHER_SCORE as TEACHER, RankingModel
from tfrec.models.embedding import tower_fn
from tfrec.training.callbacks import BackupAndRestore, config_fingerprint, metric_key
from tfrec.metrics.candidates import (candidate_lists, concat_lists, excludes_history,
                                       period_purchases, search_candidate_lists,
                                       search_sessions)
from tfrec.training.keep_best import KeepBestEpoch
from tfrec.training.optimizers import make_optimizer
from tfrec.training.warm_start import transfer_weights
from tfrec.training.strategy import (configure_devices, is_chief, make_strategy,
                                     resolve_precision)
from tfrec.training.trainer import (WEIGHTS_DIR, WEIGHTS_PREFIX, _save_weights_atomically,
                                    _write_json, ensure_prepared, load_trained_model,
                                    resolve_run_dir, warm_start_dir)

log = logging.getLogger(__name__)

RANKER_DIR = "ranker"
STATS_FILE = "catalog_stats.parquet"
LABELS = ("click", "purchase", "relevance")


@dataclass
class RankerResult:
    """What a ranker run produced.

    Args:
      ranker_dir: `<retrieval run>/ranker/` with config.yaml, weights/, metrics.json.
      tensorboard_dir: `<log_dir>/<run>/ranker`.
      model: the trained ranker (in this process).
      val_metrics: per-task validation metrics of the saved weights.
    """

    ranker_dir: str
    tensorboard_dir: str
    model: RankingModel
    history: Dict[str, List[float]] = field(default_factory=dict)
    val_metrics: Dict[str, float] = field(default_factory=dict)
    lists: int = 0
    seconds: float = 0.0


def build_text_match(cfg: Config, catalog: pd.DataFrame, precision: str = "float32"):
    """The BERT text layer of the "fast"/"cross" modes (None for "bow")."""
    r = cfg.ranking
    if r.text_mode == "bow":
        return None
    from tfrec.models.text_match import TextMatch

    for handle in (r.text_encoder, r.text_preprocessor):
        if "://" not in handle and not os.path.exists(handle):
            raise FileNotFoundError(
                f"text encoder {handle!r} not found: run `tfrec text import-minilm` (or set "
                "ranking.text_encoder / ranking.text_preprocessor to a TF Hub BERT)")
    return TextMatch(r.text_mode, r.text_encoder, r.text_preprocessor,
                     catalog["title"].astype(str).tolist(), output_dim=r.text_embedding_dim,
                     trainable=r.text_trainable, top_layers=r.text_top_layers,
                     dtype=precision, name="text_match")


def build_ranker(vocab: Vocabularies, cfg: Config, catalog: pd.DataFrame,
                 stats: pd.DataFrame, precision: str = "float32") -> RankingModel:
    """Builds and compiles the ranker (candidate features looked up in the model).

    Args:
      precision: dtype policy of the dense layers; "mixed_float16" (GPUs) also wraps the
        optimizer in loss scaling. Weights are float32 either way, so a ranker trained
        in mixed precision reloads (`load_ranker`) in float32 for serving.
    """
    lookup = CatalogLookup(catalog, stats, FeatureSpec.from_config(cfg.features), name="catalog")
    model = RankingModel(vocab, cfg.ranking, lookup,
                         text_match=build_text_match(cfg, catalog, precision),
                         precision=precision)
    optimizer = make_optimizer(cfg.ranking.optimizer, cfg.ranking.learning_rate)
    if precision == "mixed_float16":
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer)
    return model


def ranker_encoder_optimizer(model: RankingModel, ranking: RankingConfig, steps: int
                             ) -> Optional[tf.keras.optimizers.Optimizer]:
    """The fine-tuned encoder's own optimizer, or None (frozen/no encoder, or one rate).

    Args:
      model: the built ranker (its encoder variables decide whether one is needed).
      ranking: encoder_learning_rate / encoder_schedule / encoder_warmup.
      steps: optimizer steps of the run (the warm-up schedule's length).
    """
    if ranking.encoder_learning_rate is None or not model.encoder_variables:
        return None
    return encoder_optimizer(ranking.encoder_learning_rate, ranking.encoder_schedule,
                             steps, ranking.encoder_warmup)


def _dataset(arrays: Dict[str, np.ndarray], batch: int, shuffle: bool, seed: int
             ) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        ds = ds.shuffle(len(arrays["user_id"]), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def predict_scores(model: RankingModel, arrays: Dict[str, np.ndarray],
                   batch: int = 64) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Combined score and per-task logits [N, L] of fixed candidate lists."""
    inputs = {k: v for k, v in arrays.items() if k not in LABELS + ("position", TEACHER)}
    scores, heads = [], {t: [] for t in model.tasks}
    n = len(inputs["user_id"])
    for start in range(0, n, batch):
        chunk = {k: tf.constant(v[start:start + batch]) for k, v in inputs.items()}
        logits = model(chunk, training=False)
        scores.append(model.score(logits).numpy())
        for t in model.tasks:
            heads[t].append(logits[t].numpy())
    return np.concatenate(scores), {t: np.concatenate(v) for t, v in heads.items()}


class RankingEvaluation(tf.keras.callbacks.Callback):
    """Adds per-task val_<task>_ndcg_at_k / _mrr / _auc / _gauc to the epoch logs.

    Computed in this process on held-out lists (not as distributed metrics), so they are
    the same on one worker or many.

    Args:
      arrays: validation lists with labels.
      ks: NDCG cut-offs.
    """

    def __init__(self, arrays: Dict[str, np.ndarray], ks=(10,)):
        super().__init__()
        self.arrays = arrays
        self.ks = tuple(ks)

    def evaluate(self) -> Dict[str, float]:
        score, logits = predict_scores(self.model, self.arrays)
        out = {}
        groups = self.arrays["user_id"]
        for task in self.model.tasks:
            if task not in self.arrays:
                continue
            for name, value in scored_list_metrics(logits[task], self.arrays[task], self.ks,
                                                   groups).items():
                out[f"{task}_{metric_key(name)}"] = value
        for name, value in scored_list_metrics(score, self.arrays[self.model.tasks[0]],
                                               self.ks, groups).items():
            out[f"score_{metric_key(name)}"] = value
        return out

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, value in self.evaluate().items():
            logs[f"val_{name}"] = value


def _split_lists(arrays: Dict[str, np.ndarray], fraction: float, seed: int):
    """Holds out `fraction` of the users with all their lists.

    A user's recommendation and search lists share labels (a search session's clicks are
    also period positives), so a per-list split would score memorised users.
    """
    users = np.unique(arrays["user_id"].astype(str))
    count = min(max(1, int(round(len(users) * fraction))), len(users) - 1)
    held = set(np.random.default_rng(seed).permutation(users)[:count])
    is_held = np.array([u in held for u in arrays["user_id"].astype(str)])
    pick = lambda rows: {k: v[rows] for k, v in arrays.items()}  # noqa: E731
    return pick(~is_held), pick(is_held)


def ranker_dir_of(run_dir: str) -> str:
    return os.path.join(run_dir, RANKER_DIR)


def training_lists(cfg: Config, run_dir: str, retrieval=None, max_users: Optional[int] = None
                   ) -> Tuple[Dict[str, np.ndarray], pd.DataFrame]:
    """Candidate lists of the validation period and the catalog statistics at its start.

    Recommendation lists (users frozen at `ranking.list_cuts` evenly spaced times from the
    period start, labels = their positives from then to the period end) plus search lists
    (each search session's query, labels = its positives).
    """
    if retrieval is None:
        retrieval, _, _ = load_trained_model(run_dir)
    meta = ensure_prepared(cfg)
    tables = load_data_tables(cfg.data)
    t_val, t_test = int(meta["split"]["t_val"]), int(meta["split"]["t_test"])
    query_fn, candidate_fn = tower_fn(retrieval.query_tower), tower_fn(retrieval.candidate_tower)
    # Several cut times inside the period: the same retrieval model (which never saw the
    # period) scores users at different points of their histories, giving more lists.
    cuts = max(1, cfg.ranking.list_cuts)
    parts = []
    for cut in np.linspace(t_val, t_test, cuts + 1)[:-1].astype(np.int64):
        users = build_eval_set(tables.events, int(cut), t_test, cfg.data.history_length,
                               max_users=max_users, seed=cfg.train.seed)
        parts.append(candidate_lists(users, query_fn, candidate_fn, tables.catalog,
                                     cfg.ranking.candidates,
                                     period_purchases(tables.events, int(cut), t_test)))
    arrays = concat_lists(*parts)
    sessions = search_sessions(tables.events, t_val, t_test, cfg.data.history_length,
                               max_sessions=max_users, seed=cfg.train.seed)
    if len(sessions):
        arrays = concat_lists(arrays, search_candidate_lists(
            sessions, query_fn, candidate_fn, tables.catalog, cfg.ranking.candidates,
            cfg.data.history_length, excludes_history(cfg.ranking.search_history)))
    stats = catalog_statistics(tables.catalog, positive_interactions(tables.events), t_val)
    return arrays, stats


def train_ranker(cfg: Config, run: Optional[str] = None, retrieval=None,
                 max_users: Optional[int] = None,
                 extra_callbacks: Optional[List[tf.keras.callbacks.Callback]] = None,
                 teacher: Optional[RankingModel] = None) -> RankerResult:
    """Trains the ranker of a retrieval run on its validation-period candidate lists.

    Args:
      cfg: config (ranking and train sections; data comes from the retrieval run).
      run: retrieval run name (default: the latest).
      retrieval: the trained retrieval model if already in memory.
      max_users: cap on the lists (users) used, for quick runs.
      extra_callbacks: more Keras callbacks.
      teacher: a trained ranker (usually larger) whose scores of the same lists this one
        also learns (`ranking.distill_weight`, `distill_temperature`); the teacher must
        read the same retrieval scores, i.e. belong to this retrieval run or a copy.

    Raises:
      ValueError: ranking.patience below 1, or too few validation lists to train on.
    """
    if cfg.ranking.patience is not None and cfg.ranking.patience < 1:
        raise ValueError("ranking.patience must be an integer >= 1 or null (train every "
                         f"epoch), got {cfg.ranking.patience}")
    run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
    run_cfg = Config.from_yaml(os.path.join(run_dir, "config.yaml"))
    cfg.data = run_cfg.data
    run_name = os.path.basename(run_dir)
    configure_devices(cfg.train.cpu_devices)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.mixed_precision)
    strategy = make_strategy(cfg.train.strategy, cfg.train.tpu)
    chief = is_chief(strategy)
    out_dir = ranker_dir_of(run_dir)
    tb_dir = os.path.join(cfg.train.log_dir, run_name, RANKER_DIR)
    os.makedirs(out_dir, exist_ok=True)

    arrays, stats = training_lists(cfg, run_dir, retrieval, max_users)
    if len(arrays["user_id"]) < 10:
        raise ValueError(f"only {len(arrays['user_id'])} users have positives in the validation "
                         "period: too few ranking lists to train on")
    train, val = _split_lists(arrays, 0.1, cfg.train.seed)
    if teacher is not None:
        train[TEACHER] = predict_scores(teacher, train)[0].astype(np.float32)
    tables = load_data_tables(cfg.data)
    vocab = Vocabularies.load(run_dir)
    if chief:
        cfg.to_yaml(os.path.join(out_dir, "config.yaml"))
        _write_trained_catalog(out_dir, tables.catalog, stats,
                               FeatureSpec.from_config(cfg.features))
    with strategy.scope():
        model = build_ranker(vocab, cfg, tables.catalog, stats, precision)
        model({k: tf.constant(v[:2]) for k, v in train.items()
               if k not in LABELS + (TEACHER,)})
        model.adapt_numeric(train)
        warm = None
        if cfg.train.warm_start:  # the previous ranker's weights, tables grown
            source = warm_start_dir(cfg, run_dir)
            warm = {"from": source, **transfer_weights(load_ranker(source)[0], model)}
        steps = -(-len(train["user_id"]) // cfg.ranking.batch_size) * cfg.ranking.epochs
        model.encoder_optimizer = ranker_encoder_optimizer(model, cfg.ranking, steps)
    evaluation = RankingEvaluation(val, cfg.ranking.eval_ks)
    first = model.tasks[0]
    callbacks = [
        evaluation,  # first: adds val_* metrics the others read
        tf.keras.callbacks.TensorBoard(tb_dir if chief else tempfile.mkdtemp(),
                                       update_freq="epoch", write_graph=False),
        KeepBestEpoch(monitor=f"val_score_ndcg_at_{cfg.ranking.eval_ks[0]}",
                      patience=cfg.ranking.patience),
        BackupAndRestore(os.path.join(out_dir, "backup"),
                         config_fingerprint(cfg.ranking, cfg.features)),
    ] + list(extra_callbacks or [])
    log.info("ranker: %d training lists of %d candidates (%s labels first, %s)",
             len(train["user_id"]), cfg.ranking.candidates, first, precision)
    start = time.perf_counter()
    history = model.fit(_dataset(train, cfg.ranking.batch_size, True, cfg.train.seed),
                        epochs=cfg.ranking.epochs, callbacks=callbacks,
                        verbose=2 if chief else 0)
    seconds = time.perf_counter() - start
    val_metrics = evaluation.evaluate()
    _save_weights_atomically(model, out_dir, chief)
    plain = {k: [float(x) for x in v] for k, v in history.history.items()}
    if chief:
        _write_json(os.path.join(out_dir, "metrics.json"),
                    {"validation": val_metrics, "history": plain, "seconds": seconds,
                     "warm_start": warm, "train_steps": int(model.optimizer.iterations.numpy()),
                     "train_lists": len(train["user_id"]), "val_lists": len(val["user_id"]),
                     "distilled": teacher is not None})
    return RankerResult(ranker_dir=out_dir, tensorboard_dir=tb_dir, model=model, history=plain,
                        val_metrics=val_metrics, lists=len(train["user_id"]), seconds=seconds)


def _write_trained_catalog(out_dir: str, catalog: pd.DataFrame, stats: pd.DataFrame,
                           features: FeatureSpec) -> None:
    """Saves the catalog the ranker was trained over (its tables are sized by it).

    With it the run reloads after the shop's catalog changed, then serves the new one
    (`RankingModel.use_catalog`).
    """
    columns = catalog[list(features.catalog_columns)].reset_index(drop=True)
    table = pd.concat([columns, stats.reset_index(drop=True)], axis=1)
    table["item_id"] = table["item_id"].astype(str)
    atomic_write(os.path.join(out_dir, STATS_FILE),
                 lambda tmp: table.to_parquet(tmp, index=False))


def _trained_catalog(out_dir: str, cfg: Config) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog, statistics) the ranker of `out_dir` was trained over."""
    table = pd.read_parquet(os.path.join(out_dir, STATS_FILE))
    stats_columns = ["popularity", "recent_popularity", "age_days"]
    if "title" in table:
        catalog = table.drop(columns=stats_columns)
        return catalog, table[stats_columns]
    # Runs before the catalog was saved beside the statistics: only ids to compare.
    catalog = load_tables(cfg.data.data_dir, max_bad_share=cfg.data.max_bad_share).catalog
    if table["item_id"].tolist() != catalog["item_id"].astype(str).tolist():
        raise ValueError(f"the catalog in {cfg.data.data_dir!r} changed since this ranker was "
                         "trained (an older run that did not save its catalog): retrain it "
                         "(`tfrec train-ranker`)")
    return catalog, table.drop(columns="item_id").set_index(catalog.index)


def load_ranker(run_dir: str, catalog: Optional[pd.DataFrame] = None,
                statistics: Optional[pd.DataFrame] = None) -> Tuple[RankingModel, Config]:
    """Rebuilds a trained ranker from `<run_dir>/ranker/` (another process is fine).

    Args:
      run_dir: retrieval run directory with a trained `ranker/`.
      catalog: serve this catalog instead of the trained one (new items are scored from
        their content; see `RankingModel.use_catalog`).
      statistics: popularity features of `catalog` (zeros for all items if None).

    Raises:
      FileNotFoundError: the run has no trained ranker.
    """
    out_dir = ranker_dir_of(run_dir)
    weights = os.path.join(out_dir, WEIGHTS_DIR)
    if not os.path.isdir(weights):
        raise FileNotFoundError(f"run {run_dir!r} has no trained ranker: run `tfrec train-ranker`")
    cfg = Config.from_yaml(os.path.join(out_dir, "config.yaml"))
    vocab = Vocabularies.load(run_dir)
    trained, stats = _trained_catalog(out_dir, cfg)
    model = build_ranker(vocab, cfg, trained, stats)
    request = model.features.dummy_batch(model.features.query_features)
    model({**request, "item_id": tf.constant([[""]]), "retrieval_score": tf.constant([[0.0]])})
    model.load_weights(os.path.join(weights, WEIGHTS_PREFIX)).expect_partial()
    if catalog is not None:
        embedded = model.use_catalog(catalog, statistics)
        log.info("ranker serves a catalog of %d items (trained over %d; %d new texts embedded)",
                 len(catalog), len(trained), embedded)
    return model, cfg
