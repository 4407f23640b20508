"""Training throughput of tfrec's retrieval model vs a TFRS-tutorial baseline, same data.

What is measured (all in one process, on the training period of one synthetic world):

  tfrec                TwoTowerModel built as the trainer builds it (vocabularies from
                       training-period positives, `build_model`), fed as `tfrec train`
                       feeds it: `make_dataset` with `preprocess=model.preprocess`
                       (TFRecord shards -> shuffle -> batch -> parse -> string lookups,
                       tokens and trigram buckets in the parallel tf.data map), so the
                       step sees integers only.
                       Features: user id, 20-item history (ids, categories, brands),
                       query text, device, hour;
                       item id, title (words + char trigrams), category, brand, price;
                       logQ correction, accidental-hit removal, id dropout, 256
                       uniform catalog draws per step beside the in-batch negatives
                       (`model.catalog_negatives`, drawn and preprocessed in tf.data).
  tfrec, 16 steps per call  the same with `train.steps_per_execution` 16 (Keras runs
                       16 training steps per graph call; the trainer's default is 1).
  tfrec, uncached      the same without the cache: preprocessing runs every epoch, in
                       parallel with the step. (`tfrec` keeps the preprocessed examples
                       in memory after the warm-up epoch, as the trainer does when they
                       fit `train.input_cache_mb`; examples are reshuffled every epoch.)
  tfrec, strings in step  the same model fed raw parsed batches: every string op runs
                       inside the training step (tfrec before preprocessing moved to
                       tf.data).
  tfrec, no trigrams   tfrec with `char_ngram_bins=0` (the price of typo robustness).
  tfrec, in-batch negatives only  tfrec with `model.catalog_negatives` 0 (the price of
                       the catalog draws).
  tfrec, transformer / GRU history  tfrec with `model.history_encoder` transformer
                       or gru instead of the pooled history (the sequence models' cost).
  tfrec, ids only      tfrec configured like the baseline: `model.query_features
                       [user_id]`, `candidate_features [item_id]`, no hidden layer, no id
                       dropout, no catalog draws (logQ correction and accidental-hit
                       removal stay on); "no output Dense" also without the towers'
                       output Dense (`model.projection false`);
                       "ids only, 16 steps per call" with steps_per_execution 16.
  baseline             TFRS basic-retrieval tutorial: StringLookup + Embedding per tower
                       on user_id / item_id only, `tfrs.tasks.Retrieval()` without
                       metrics, fed from in-memory tensors (from_tensor_slices -> shuffle
                       -> batch -> cache), Adagrad as in the tutorial.
  tfrec input only     iterating tfrec's tf.data pipeline without a model (raw batches).
  tfrec input + prep   iterating it with the model's preprocessing map.
  tfrec input, cached  iterating what `tfrec` trains on: the preprocessed examples from
                       memory, reshuffled and re-batched every epoch.

Every run uses the same batch size and drops the last partial batch, so every epoch
sees the same number of examples. All variants are built first, then trained in
interleaved rounds of one epoch each (round 0 is the warm-up: tracing, cache filling,
excluded), so load from other processes falls on all of them alike. The table shows
the median and best of the --epochs timed epochs; "vs baseline" is the median over
rounds of (baseline epoch time / this epoch time, same round). "cores busy" is process
CPU time / wall time over the timed epochs (at most the number of cores). Validation
recall is computed after all epochs (warm-up included) with tfrec's evaluation (users
frozen at the start of the validation period, seen items excluded, --eval-users users).

Run from the repository root:  python bench/retrieval_train.py [--world small]
[--set train.learning_rate=0.01 ...] (--set changes every tfrec variant's config).

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, batch 256, 1
warm-up + 1 timed epoch, recall on 50 validation users, variants baseline, tfrec and
input_only (the cached and no-trigram variants are the tfrec model again with another
dataset / setting, each a few seconds of tracing more), same table; the figures mean
nothing. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.config import Config
from tfrec.data.examples import positive_interactions
from tfrec.data.io import load_tables
from tfrec.data.synthetic import generate_world
from tfrec.data.tfrecord import make_dataset
from tfrec.metrics.retrieval import build_eval_set, evaluate_embeddings
from tfrec.features.vocab import build_vocabularies
from tfrec.models.embedding import tower_fn
from tfrec.training.negatives import draw_shares, negatives_dataset, with_negatives
from tfrec.training.trainer import (build_model, cache_input, ensure_prepared,
                                    steps_per_execution)

tf.get_logger().setLevel("ERROR")  # Python-side TF notices (e.g. retracing) off
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args  # noqa: E402

SMOKE = dict(world="tiny", batch_size=256, epochs=1, eval_users=50,
             variants="baseline,tfrec,input_only")

VARIANTS = ("baseline", "tfrec", "tfrec_calls16", "tfrec_uncached", "tfrec_in_step",
            "tfrec_no_trigrams", "tfrec_no_draws", "tfrec_ids", "tfrec_ids_no_dense",
            "tfrec_ids_calls16", "tfrec_transformer", "tfrec_gru", "input_only",
            "input_preprocessed", "input_cached")
LABELS = {"tfrec": "tfrec (as tfrec train)",
          "tfrec_calls16": "tfrec, 16 steps per call",
          "tfrec_ids_calls16": "tfrec, ids only, 16 steps per call",
          "tfrec_uncached": "tfrec, input not cached",
          "tfrec_in_step": "tfrec, strings in the step",
          "tfrec_no_trigrams": "tfrec, no char trigrams",
          "tfrec_no_draws": "tfrec, in-batch negatives only",
          "tfrec_ids": "tfrec, ids only",
          "tfrec_ids_no_dense": "tfrec, ids only, no output Dense",
          "tfrec_transformer": "tfrec, transformer history",
          "tfrec_gru": "tfrec, GRU history",
          "baseline": "baseline TFRS tutorial (ids)",
          "input_only": "tfrec input pipeline only",
          "input_preprocessed": "tfrec input + preprocessing",
          "input_cached": "tfrec input, cached"}


class EpochClock(tf.keras.callbacks.Callback):
    """Wall and process-CPU seconds of every epoch."""

    def __init__(self):
        super().__init__()
        self.wall, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


class IdRetrieval(tfrs.Model):
    """The TFRS tutorial model: one id embedding per tower, in-batch softmax."""

    def __init__(self, users, items, dim):
        super().__init__()
        self.user_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=users, mask_token=None),
            tf.keras.layers.Embedding(len(users) + 1, dim)])
        self.item_model = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=items, mask_token=None),
            tf.keras.layers.Embedding(len(items) + 1, dim)])
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features, training=False):
        return self.task(self.user_model(features["user_id"]),
                         self.item_model(features["item_id"]))


def id_embed_fn(tower, key):
    """numpy feature dict -> embeddings, for tfrec's evaluation helpers."""
    call = tf.function(lambda ids: tower(ids),
                       input_signature=[tf.TensorSpec([None], tf.string)])
    return lambda features: call(tf.constant(features[key], tf.string)).numpy()


def prepare(args, work_dir):
    """Generates (or reuses) the world and its TFRecords; returns cfg, meta, tables."""
    cfg = Config()
    cfg.data.data_dir = os.path.join(work_dir, "data")
    cfg.data.tfrecord_dir = os.path.join(work_dir, "tfrecords")
    cfg.data.seed = args.seed
    cfg.train.batch_size = args.batch_size
    cfg.train.seed = args.seed
    marker = os.path.join(work_dir, f"world-{args.world}-{args.seed}")
    if not os.path.exists(marker):
        shutil.rmtree(cfg.data.data_dir, ignore_errors=True)
        generate_world(args.world, seed=args.seed).save(cfg.data.data_dir)
        open(marker, "w").close()
    meta = ensure_prepared(cfg)
    return cfg, meta, load_tables(cfg.data.data_dir)


def fit_epoch(model, dataset):
    """One training epoch; returns its (wall, cpu) seconds, setup of fit() excluded."""
    clock = EpochClock()
    model.fit(dataset, epochs=1, callbacks=[clock], verbose=0)
    return clock.wall[0], clock.cpu[0]


def iterate_epoch(dataset):
    start = (time.perf_counter(), time.process_time())
    for _ in dataset:
        pass
    return time.perf_counter() - start[0], time.process_time() - start[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small", help="synthetic world preset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up")
    parser.add_argument("--eval-users", type=int, default=2000,
                        help="validation users sampled for recall (0: skip quality)")
    parser.add_argument("--baseline-lr", type=float, default=0.1,
                        help="Adagrad learning rate of the baseline (the tutorial's)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list among {','.join(VARIANTS)} (baseline always runs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change the config of every tfrec variant, after its own "
                             "settings (e.g. train.learning_rate=0.01); repeatable")
    parser.add_argument("--work-dir", default=None,
                        help="keep the world and TFRecords here and reuse them "
                             "(default: a temporary directory, deleted)")
    args = parse_smoke_args(parser, argv, SMOKE)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose among {list(VARIANTS)}")
    try:  # a bad --set fails here, before the world is generated
        Config().override(args.set)
    except ValueError as err:
        parser.error(str(err))
    if "baseline" not in variants:
        variants.insert(0, "baseline")

    started = time.perf_counter()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tfrec-bench-")
    try:
        os.makedirs(work_dir, exist_ok=True)
        cfg, meta, tables = prepare(args, work_dir)
        rows, quality = run(args, variants, cfg, meta, tables)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    n = int(meta["counts"]["train"])
    steps = n // args.batch_size
    print()
    print(f"retrieval training throughput | world '{args.world}' (seed {args.seed}): "
          f"{meta['num_items']} items, {meta['num_users']} users, {n} training examples")
    print(f"batch {args.batch_size}, {steps} steps = {steps * args.batch_size} examples per "
          f"epoch; 1 warm-up epoch excluded, then {args.epochs} timed epochs, "
          f"variants interleaved epoch by epoch")
    print(f"tfrec: {cfg.train.optimizer} lr {cfg.train.learning_rate:g} (trainer defaults), "
          f"float32; baseline: Adagrad lr {args.baseline_lr:g} (tutorial)")
    print(machine_line())
    headers = ["pipeline", "ex/s median", "ex/s best", "vs baseline", "warm-up s",
               "cores busy"]
    if quality:
        headers += ["val R@10", "val R@100"]
    table = []
    for v in variants:
        r = rows[v]
        line = [LABELS[v], f"{statistics.median(r['eps']):,.0f}", f"{max(r['eps']):,.0f}",
                f"{statistics.median(r['ratios']):.3f}x", f"{r['warmup']:.1f}",
                f"{r['busy']:.2f}"]
        if quality:
            q = quality.get(v)
            line += ([f"{q['recall@10']:.4f}", f"{q['recall@100']:.4f}"] if q else ["-", "-"])
        table.append(line)
    print(format_table(headers, table, title=f"examples/s: median and best of {args.epochs} "
                                             f"timed epochs; vs baseline = median over rounds of "
                                             f"(baseline epoch time / this epoch time in the "
                                             f"same round)"))
    print(f"recall after {1 + args.epochs} epochs on {quality.get('_users', 0)} validation "
          f"users" if quality else "quality skipped (--eval-users 0)")
    print(f"total wall time {time.perf_counter() - started:.0f}s")


def run(args, variants, cfg, meta, tables):
    """Builds every variant, then trains them in interleaved rounds of one epoch each."""
    history_length = cfg.data.history_length
    pattern = meta["patterns"]["train"]
    t_val, t_test = int(meta["split"]["t_val"]), int(meta["split"]["t_test"])
    positives = positive_interactions(tables.events)
    vocab = build_vocabularies(positives[positives["ts"] < t_val], tables.catalog,
                               cfg.model.text_max_tokens, cfg.model.price_buckets)

    def tfrec_dataset(model=None, cache=False):
        return make_dataset(pattern, args.batch_size, history_length, shuffle=True,
                            seed=args.seed, drop_remainder=True,
                            preprocess=model.preprocess if model is not None else None,
                            cache=cache)

    n_train = int(meta["counts"]["train"])
    steps, embed_fns = {}, {}
    for variant in variants:
        tf.keras.utils.set_random_seed(args.seed)
        if variant == "input_only":
            steps[variant] = functools.partial(iterate_epoch, tfrec_dataset())
        elif variant in ("input_preprocessed", "input_cached"):
            steps[variant] = functools.partial(iterate_epoch, tfrec_dataset(
                build_model(vocab, cfg), cache=variant == "input_cached"))
        elif variant == "baseline":
            ids = {"user_id": [], "item_id": []}
            for batch in make_dataset(pattern, 8192, history_length, shuffle=False):
                for k in ids:
                    ids[k].append(batch[k].numpy())
            data = {k: np.concatenate(v) for k, v in ids.items()}
            ds = (tf.data.Dataset.from_tensor_slices(data)
                  .shuffle(len(data["user_id"]), seed=args.seed)
                  .batch(args.batch_size, drop_remainder=True).cache())
            model = IdRetrieval(vocab.users, vocab.items, cfg.model.embedding_dim)
            model.compile(optimizer=tf.keras.optimizers.Adagrad(args.baseline_lr))
            steps[variant] = functools.partial(fit_epoch, model, ds)
            embed_fns[variant] = (id_embed_fn(model.user_model, "user_id"),
                                  id_embed_fn(model.item_model, "item_id"))
        else:
            run_cfg = copy.deepcopy(cfg)
            if variant == "tfrec_no_trigrams":
                run_cfg.model.char_ngram_bins = 0
            ids_only = variant in ("tfrec_ids", "tfrec_ids_no_dense", "tfrec_ids_calls16")
            if variant == "tfrec_no_draws" or ids_only:
                run_cfg.model.catalog_negatives = 0
            if variant in ("tfrec_transformer", "tfrec_gru"):
                run_cfg.model.history_encoder = variant.split("_")[1]
            if ids_only:
                run_cfg.model.query_features, run_cfg.model.candidate_features = (
                    ("user_id",), ("item_id",))
                run_cfg.model.hidden_units, run_cfg.model.id_dropout = (), 0.0
                run_cfg.model.projection = variant != "tfrec_ids_no_dense"
            if variant.endswith("_calls16"):
                run_cfg.train.steps_per_execution = 16
            run_cfg.override(args.set)
            # One replica, as the trainer runs here: its steps per call.
            model = build_model(vocab, run_cfg, steps_per_execution=steps_per_execution(
                run_cfg, single_replica=True))
            cached = variant != "tfrec_uncached" and cache_input(run_cfg, n_train)
            ds = tfrec_dataset(None if variant == "tfrec_in_step" else model,
                               cache=cached and variant != "tfrec_in_step")
            if run_cfg.model.catalog_negatives:  # as the trainer adds them
                ds = with_negatives(ds, negatives_dataset(
                    tables.catalog, model, run_cfg.model.catalog_negatives, args.seed,
                    shares=draw_shares(positives, tables.catalog, t_val)))
            # The trainer's known steps per epoch (the last call runs what is left).
            ds = ds.apply(tf.data.experimental.assert_cardinality(
                n_train // args.batch_size))
            steps[variant] = functools.partial(fit_epoch, model, ds)
            embed_fns[variant] = (tower_fn(model.query_tower), tower_fn(model.candidate_tower))

    # Interleaving spreads load from other processes over all variants alike.
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for epoch in range(1 + args.epochs):
        for variant in variants:
            w, c = steps[variant]()
            wall[variant].append(w)
            cpu[variant].append(c)
        print(f"epoch {epoch}{' (warm-up)' if epoch == 0 else ''}: "
              + ", ".join(f"{v} {wall[v][-1]:.2f}s" for v in variants), flush=True)

    examples = (int(meta["counts"]["train"]) // args.batch_size) * args.batch_size
    rows = {v: {"eps": [examples / w for w in wall[v][1:]], "warmup": wall[v][0],
                "busy": sum(cpu[v][1:]) / sum(wall[v][1:]),
                # paired with the baseline epoch of the same round
                "ratios": [b / w for w, b in zip(wall[v][1:], wall["baseline"][1:])]}
            for v in variants}
    quality = {}
    if args.eval_users:
        eval_set = build_eval_set(tables.events, t_val, t_test, history_length,
                                  max_users=args.eval_users, seed=args.seed)
        quality = {v: evaluate_embeddings(q, c, tables.catalog, eval_set, ks=(10, 100))
                   for v, (q, c) in embed_fns.items()}
        quality["_users"] = len(eval_set)
    return rows, quality


if __name__ == "__main__":
    main()
