"""Data preparation engines: pandas vs Apache Beam's DirectRunner, time and memory by size.

Protocol (bench/README.md, "Data preparation: pandas vs Beam"):
  worlds     synthetic worlds of about 1M events (`medium`) and 10M events (`xlarge`,
             written by the streaming generator as Parquet parts), made with `tfrec
             generate` into --work-dir unless already there.
  engines    `tfrec prepare` as its own process per (world, engine): pandas; Beam
             DirectRunner with its own in-memory shuffle (`--shuffle runner`), in one
             process and with 2 worker processes (multi_processing); Beam DirectRunner
             grouping through files on disk (`--shuffle disk`, the default there), in
             one process and with 2 workers. Each writes into a fresh directory.
  measured   wall seconds; peak RSS of the `tfrec prepare` process itself, of its
             largest worker process, and of all of them summed (sampled 4x per second);
             output size; examples written; the largest size of the output folder
             (records + the disk shuffle's spill files, sampled every 2 s). Every Beam
             output is checked equal to the pandas output of the same world (records,
             vocabularies).
Key figures are ratios against pandas on the same world in the same run (time, memory),
and memory per million events (growth with the data). On 2 cores the Beam runs are slower
than pandas: the DirectRunner is a test runner. The point of the engine is memory that
does not grow with the events (the disk shuffle holds one bucket of users or items at a
time, `--buckets`) and the same pipeline on Flink, Spark or Dataflow.

Run from the repository root:

    python bench/prepare.py [--worlds medium,xlarge] [--engines pandas,beam,disk,disk-2] \
        [--work-dir /tmp/prepare_bench]

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, pandas and Beam
in memory. Same protocol; the figures mean nothing.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tfrec  # noqa: F401,E402  (quiet TensorFlow logs before it loads)
from _common import (dir_mb, format_table, machine_line, parse_smoke_args, ratio,  # noqa: E402
                     run_child, skip)

SMOKE = dict(worlds="tiny", engines="pandas,beam,disk", buckets=8)
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
ENGINES = {
    "pandas": ["--engine", "pandas"],
    "beam": ["--engine", "beam", "--shuffle", "runner", "--",
             "--direct_running_mode=in_memory"],
    "beam-2": ["--engine", "beam", "--shuffle", "runner", "--"] + TWO_WORKERS,
    "disk": ["--engine", "beam", "--shuffle", "disk", "--", "--direct_running_mode=in_memory"],
    "disk-2": ["--engine", "beam", "--shuffle", "disk", "--"] + TWO_WORKERS,
}
LABELS = {"pandas": "pandas", "beam": "Beam, memory shuffle",
          "beam-2": "Beam, memory shuffle, 2 proc", "disk": "Beam, disk shuffle",
          "disk-2": "Beam, disk shuffle, 2 proc"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="medium,xlarge",
                        help="synthetic world presets (comma-separated)")
    parser.add_argument("--engines", default="pandas,beam,disk,disk-2",
                        help=f"of {', '.join(ENGINES)}")
    parser.add_argument("--buckets", type=int, default=256, help="Beam --buckets")
    parser.add_argument("--work-dir", help="keep worlds here (default: a temporary dir)")
    return parser, parse_smoke_args(parser, argv, SMOKE)


def _records(out: str) -> List[bytes]:
    import tensorflow as tf

    return sorted(r for path in glob.glob(os.path.join(out, "*.tfrecord"))
                  for r in tf.data.TFRecordDataset(path).as_numpy_iterator())


def _same_output(a: str, b: str) -> bool:
    def text(root: str, name: str) -> str:
        with open(os.path.join(root, "vocab", name), encoding="utf-8") as f:
            return f.read()

    vocab = all(text(a, k) == text(b, k) for k in ("users.jsonl", "items.jsonl"))
    return vocab and _records(a) == _records(b)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser, args = parse_args(argv)
    if importlib.util.find_spec("apache_beam") is None:
        skip("apache-beam is not installed (pip install 'tfrec[beam]')")

    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; expected {list(ENGINES)}")
    root = args.work_dir or tempfile.mkdtemp(prefix="prepare_bench_")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "tfrec"]
    rows, raw = [], []
    for world in args.worlds.split(","):
        data = os.path.join(root, world, "data")
        if not os.path.exists(os.path.join(data, "world.json")):
            made = run_child(command + ["generate", "--world", world, "--data-dir", data], env)
            print(f"generated {world} in {made['seconds']:.0f}s", flush=True)
        with open(os.path.join(data, "world.json")) as f:
            events = json.load(f)["num_events"]
        results: Dict[str, dict] = {}
        for engine in engines:
            out = os.path.join(root, world, f"out-{engine}")
            shutil.rmtree(out, ignore_errors=True)
            cmd = command + ["prepare", "--data-dir", data, "--out", out,
                           "--buckets", str(args.buckets)] + ENGINES[engine]  # "--" last
            m = run_child(cmd, env, sample_tree=True, watch_dir=out)
            with open(os.path.join(out, "meta.json")) as f:
                meta = json.load(f)
            m.update(examples=sum(meta["counts"].values()), out_mb=dir_mb(out), out=out)
            results[engine] = m
            print(f"{world} {engine}: {m['seconds']:.0f}s, driver {m['peak_mb']:.0f} MB, "
                  f"all {m['tree_peak_mb']:.0f} MB", flush=True)
        reference = results.get("pandas") or next(iter(results.values()))
        for engine, m in results.items():
            same = "yes" if engine == "pandas" else (
                "yes" if "pandas" in results and _same_output(results["pandas"]["out"],
                                                              m["out"]) else "NO")
            rows.append([f"{world} ({events / 1e6:.2f}M events)", LABELS[engine],
                         f"{m['seconds']:.1f}", ratio(m["seconds"], reference["seconds"]),
                         # wait4 is exact but counts waited-for workers: sampled then
                         f"{m['own_peak_mb'] if m['child_peak_mb'] else m['peak_mb']:,.0f}",
                         f"{m['child_peak_mb']:,.0f}" if m["child_peak_mb"] else "-",
                         f"{m['tree_peak_mb']:,.0f}",
                         ratio(m["tree_peak_mb"], reference["tree_peak_mb"]),
                         f"{m['tree_peak_mb'] / (events / 1e6):,.0f}",
                         f"{m['examples']:,}", f"{m['out_mb']:,.1f}",
                         f"{max(m['dir_peak_mb'], m['out_mb']):,.0f}", same])
            raw.append({"world": world, "events": events, "engine": engine,
                        **{k: v for k, v in m.items() if k not in ("stdout", "out")}})
    print(format_table(
        ["world", "engine", "wall s", "time vs pandas", "driver peak MB", "worker peak MB",
         "all procs peak MB",
         "memory vs pandas", "MB per 1M events", "examples", "output MB", "disk peak MB",
         "same as pandas"],
        rows, title=f"tfrec prepare: pandas vs Beam DirectRunner (--buckets {args.buckets})\n"
                    f"{machine_line()}"))
    print(json.dumps(raw))
    if not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
