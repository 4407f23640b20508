"""Where a retrieval training step's time goes: TensorFlow profiler op time by kind.

What is measured (one process, the training period of one synthetic world): the
`train_step` of TwoTowerModel as `tfrec train` builds it (LazyAdam, float32), fed one
batch preprocessed in tf.data as the trainer feeds it (integers only), for the full model,
the model without character trigrams and the ids-only configuration, beside the
TFRS-tutorial baseline step of bench/retrieval_train.py (the reference). For each:
wall milliseconds per step (median of --repeats runs of --steps steps, a tf.function
called in a loop, no Keras fit overhead), then --steps steps traced with
`tf.profiler.experimental` and the host op events of the trace (the `.xplane.pb` file)
summed by kind:

  embedding lookups   gathers, unique, segment sums/means and their gradients
  dense matmuls       the towers' MLPs and the in-batch score matrix, forward and backward
  softmax loss        cross-entropy, accidental-hit and logQ masks
  optimizer           LazyAdam (unique rows, gather/scatter of moments and weights)
  other               element-wise ops, concatenation, casts, reductions

Op time is summed over threads, so it exceeds wall time when both cores are busy.

Run from the repository root:  python bench/step_profile.py [--world small]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, batch 128, 3
steps, 1 repeat; same table; the figures mean nothing. TensorFlow's graph optimizer is
off (bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import collections
import copy
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from tfrec.data.examples import positive_interactions
from tfrec.data.tfrecord import make_dataset
from tfrec.features.vocab import build_vocabularies
from tfrec.training.trainer import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args  # noqa: E402
from retrieval_train import IdRetrieval, prepare  # noqa: E402

SMOKE = dict(world="tiny", batch_size=128, steps=3, repeats=1)
KINDS = ("embedding lookups", "dense matmuls", "softmax loss", "optimizer", "other")


def kind_of(name: str, op_type: str) -> str:
    """The kind of one op event, from its op name (scope) and type."""
    if "LazyAdam" in name or "Adagrad" in name or op_type.startswith("ResourceScatter"):
        return "optimizer"
    if "MatMul" in op_type:
        return "dense matmuls"
    if "retrieval" in name and "MatMul" not in op_type:
        return "softmax loss"
    if op_type in ("ResourceGather", "GatherV2", "GatherNd", "Unique", "UnsortedSegmentSum",
                   "SparseSegmentMeanWithNumSegments", "SparseSegmentMeanGrad",
                   "SparseSegmentSum", "Where", "Tile") or "embedding_lookup" in name:
        return "embedding lookups"
    return "other"


def op_times(logdir: str) -> "collections.Counter[str]":
    """Milliseconds of op time by kind, summed over the host threads of the trace."""
    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals: "collections.Counter[str]" = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # TensorFlow op events are "scope/name:Type"; executor events have no type.
                if ":" not in name or name.startswith("$"):
                    continue
                op, op_type = name.rsplit(":", 1)
                if op_type in ("", "Process", "Run") or op_type.startswith(" __inference"):
                    continue
                totals[kind_of(op, op_type)] += event.duration_ps / 1e9
    return totals


def measure(step, batch, steps: int, repeats: int, logdir: str):
    """(median wall ms per step, op ms per step by kind) of `step(batch)`."""
    step(batch)  # trace
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        walls.append((time.perf_counter() - start) / steps * 1000)
    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            step(batch)
    finally:
        tf.profiler.experimental.stop()
    return statistics.median(walls), {k: v / steps for k, v in op_times(logdir).items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="small", help="synthetic world preset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="steps per timing and trace")
    parser.add_argument("--repeats", type=int, default=5, help="timings (median shown)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the world and TFRecords here and reuse them")
    args = parse_smoke_args(parser, argv, SMOKE)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="tfrec-bench-")
    traces = tempfile.mkdtemp(prefix="tfrec-trace-")
    try:
        os.makedirs(work_dir, exist_ok=True)
        cfg, meta, tables = prepare(args, work_dir)
        t_val = int(meta["split"]["t_val"])
        positives = positive_interactions(tables.events)
        vocab = build_vocabularies(positives[positives["ts"] < t_val], tables.catalog,
                                   cfg.model.text_max_tokens, cfg.model.price_buckets)
        raw = next(iter(make_dataset(meta["patterns"]["train"], args.batch_size,
                                     cfg.data.history_length, shuffle=False,
                                     drop_remainder=True)))
        rows = {}
        baseline = IdRetrieval(vocab.users, vocab.items, cfg.model.embedding_dim)
        baseline.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
        rows["baseline TFRS tutorial (ids)"] = measure(
            tf.function(baseline.train_step), {k: raw[k] for k in ("user_id", "item_id")},
            args.steps, args.repeats, os.path.join(traces, "baseline"))
        for label, change in (("tfrec", {}), ("tfrec, no char trigrams", {"char_ngram_bins": 0}),
                              ("tfrec, ids only", {"query_features": ("user_id",),
                                                   "candidate_features": ("item_id",),
                                                   "hidden_units": (), "id_dropout": 0.0})):
            run_cfg = copy.deepcopy(cfg)
            for key, value in change.items():
                setattr(run_cfg.model, key, value)
            model = build_model(vocab, run_cfg)
            batch = next(iter(tf.data.Dataset.from_tensors(raw).map(model.preprocess)))
            rows[label] = measure(tf.function(model.train_step), batch, args.steps,
                                  args.repeats, os.path.join(traces, str(len(rows))))
    finally:
        shutil.rmtree(traces, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    reference = rows["baseline TFRS tutorial (ids)"][0]
    print()
    print(f"retrieval train_step profile | world '{args.world}' (seed {args.seed}), batch "
          f"{args.batch_size}: {args.repeats} timings of {args.steps} steps (median), then "
          f"{args.steps} steps traced")
    print(f"tfrec: {cfg.train.optimizer} (trainer default), float32, input preprocessed in "
          f"tf.data; baseline: Adagrad, string ids looked up in the step")
    print(machine_line())
    table = []
    for label, (wall, kinds) in rows.items():
        total = sum(kinds.values())
        table.append([label, f"{wall:.1f}", f"{wall / reference:.2f}x", f"{total:.1f}"]
                     + [f"{kinds.get(k, 0.0):.1f} ({kinds.get(k, 0.0) / total:.0%})"
                        if total else "-" for k in KINDS])
    print(format_table(["model", "step ms", "vs baseline", "op ms"] + list(KINDS), table,
                       title="step ms: wall per step; op ms: profiler op time per step "
                             "(all threads), by kind (share of op time)"))


if __name__ == "__main__":
    main()
