"""Small helpers shared by the benchmark scripts: tables, machine facts, gRPC load, and
the `--smoke` quick mode (tiny settings, data-absent skips, a tiny random BERT)."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 title: str = "") -> str:
    """Fixed-width text table; the first column is left-aligned, the others right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: List[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def git_revision() -> str:
    """Short commit of the checkout ("+dirty" with uncommitted changes), or "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty.strip() else "")) if commit else "unknown"


def machine_line() -> str:
    """Date, commit, CPU count, GPUs and versions: what the figures were measured on."""
    import tensorflow as tf  # callers import tfrec first

    gpus = len(tf.config.list_physical_devices("GPU"))
    return (f"{time.strftime('%Y-%m-%d %H:%M')} | tfrec {git_revision()} | {os.cpu_count()} "
            f"CPU cores ({platform.machine()}), {gpus or 'no'} GPU | python "
            f"{platform.python_version()} | tensorflow {tf.__version__}")


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else "n/a"


def _tree_rss_mb(root: int) -> Tuple[float, float, float]:
    """(summed, root's, largest descendant's) resident memory in MB of a process tree,
    from /proc."""
    children: Dict[int, List[int]] = {}
    rss: Dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    total, largest, todo = 0.0, 0.0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0.0)
        if pid != root:
            largest = max(largest, rss.get(pid, 0.0))
        todo += children.get(pid, [])
    return total, rss.get(root, 0.0), largest


def run_child(cmd: List[str], env: Dict[str, str], sample_tree: bool = False,
              watch_dir: Optional[str] = None) -> Dict[str, object]:
    """Runs `cmd`: wall seconds, stdout, the peak RSS (MB) from wait4 (that process, or
    a child it waited for if larger) and, with `sample_tree` (4x per second), the peaks
    of the process itself, of its largest child and of all of them summed; with
    `watch_dir`, the largest size of that folder (MB, every 2 s)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        peak, done = [0.0, 0.0, 0.0], threading.Event()

        def sample() -> None:
            while not done.wait(0.25):
                for i, mb in enumerate(_tree_rss_mb(proc.pid)):
                    peak[i] = max(peak[i], mb)

        def sample_dir() -> None:
            while not done.wait(2.0):
                try:
                    peak.append(dir_mb(watch_dir))
                except OSError:  # a file renamed or removed while walking
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        if sample_tree:
            sampler.start()
        dir_sampler = threading.Thread(target=sample_dir, daemon=True)
        if watch_dir:
            dir_sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        if watch_dir:
            dir_sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{err.read().decode()[-3000:]}")
        return {"seconds": wall, "peak_mb": usage.ru_maxrss / 1024,
                "tree_peak_mb": max(peak[0], usage.ru_maxrss / 1024),
                "own_peak_mb": peak[1], "child_peak_mb": peak[2],
                "dir_peak_mb": max(peak[3:], default=0.0),
                "stdout": out.read().decode()}


def work_dir(given: Optional[str], prefix: str) -> str:
    """The work directory the user gave (kept), or a new temporary one removed when the
    process exits, so repeated runs do not fill /tmp."""
    if given:
        return given
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def dir_mb(path: str) -> float:
    """Size of the files under `path` (MB)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files) / 2**20


def closed_loop(address, model, pool, threads, seconds, max_requests, start_event=None,
                offset=0):
    """`threads` gRPC clients send `pool` requests back to back, bounded by `seconds` and a
    shared budget of `max_requests`; returns (latencies s, error code names, wall s).

    `start_event` (another process's "go") and `offset` (where in the pool this process
    starts) let several processes share one load."""
    from tfrec.serving.client import PredictClient, ServingError

    clients = [PredictClient(address, timeout=30) for _ in range(threads)]
    for client in clients:  # connect outside the timed window
        client.predict(model, pool[0])
    latencies = [[] for _ in range(threads)]
    errors = [[] for _ in range(threads)]
    budget = iter(range(max_requests))  # shared; next() is atomic under the GIL
    barrier = threading.Barrier(threads + 1)

    def worker(t):
        barrier.wait()
        deadline = time.perf_counter() + seconds
        client, n = clients[t], offset + t
        while time.perf_counter() < deadline and next(budget, None) is not None:
            start = time.perf_counter()
            try:
                client.predict(model, pool[n % len(pool)])
            except ServingError as e:
                errors[t].append(e.code.name)
            else:
                latencies[t].append(time.perf_counter() - start)
            n += threads

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    if start_event is not None:
        start_event.wait()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return (np.concatenate([np.asarray(x, dtype=float) for x in latencies]),
            sum(errors, []), wall)


# -- smoke mode ------------------------------------------------------------------------------

SMOKE_HELP = ("quick smoke run (tests/test_bench_smoke.py runs it): tiny sizes and "
              "seconds through the same code to the same table, figures meaningless "
              "(TensorFlow's graph optimizer is off); the module docstring says what it "
              "leaves out. Sets")
# Set by a --smoke run for the processes it spawns: the model servers (multiprocessing
# children import this module again) turn the graph optimizer off too; distributed.py's
# `tfrec train` subprocesses do not read it.
SMOKE_ENV = "TFREC_BENCH_SMOKE"


def smoke_runtime() -> None:
    """Turns TensorFlow's graph optimizer (grappler) off in this process.

    Grappler rewrites every function graph the first time it runs; with tiny models that
    first-call cost is a large share of a smoke run (about a quarter of large_catalog.py's
    smoke wall time). The Python code paths and the graphs built stay the same; only
    their optimisation (op fusion, constant folding, ...) is skipped.
    """
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


if os.environ.get(SMOKE_ENV) == "1":  # a model server started by a --smoke run
    smoke_runtime()


def _shown(dest: str, value: object) -> str:
    """How the option would be typed, e.g. `--max-requests 200`, `--no-export`."""
    flag = dest.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, (list, tuple)):
        return f"--{flag} " + " ".join(str(v) for v in value)
    return f"--{flag} " + ('""' if value == "" else str(value))


def parse_smoke_args(parser, argv, smoke: Dict[str, object]):
    """Adds `--smoke` to `parser` and parses `argv`.

    With --smoke, the options named in `smoke` (dest -> value) default to those tiny
    values instead; options given on the command line still win. The settings are listed
    in --help. A smoke run also turns TensorFlow's graph optimizer off (smoke_runtime),
    here and in the model servers it spawns.
    """
    listed = ", ".join(_shown(k, v) for k, v in smoke.items())
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_HELP} {listed}".replace("%", "%%"))
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
        os.environ[SMOKE_ENV] = "1"
        smoke_runtime()
    return args


def skip(reason: str) -> None:
    """Ends a smoke run that cannot run here: prints 'skipped: <reason>', exit code 0."""
    print(f"skipped: {reason}", flush=True)
    sys.exit(0)


_TINY_BERTS: Dict[Tuple[Tuple[str, ...], int], Tuple[str, str]] = {}  # (vocab, length) -> paths


def tiny_bert(out_dir: str, texts: Sequence[str], max_words: int = 1000,
              seq_length: int = 64) -> Tuple[str, str]:
    """(encoder, preprocessor) of a tiny random BERT (2 layers, hidden 64) in `out_dir`.

    Smoke runs use it in place of MiniLM (work/text/minilm): same TF-Hub interface, built
    like tests/conftest.py's tiny_encoder, its vocabulary the frequent words of `texts`.
    The same vocabulary again in one process returns the first build (seeded alike).
    """
    from tfrec.text.hub_export import build_tiny_encoder
    from tfrec.text.vocab import words_from_texts

    vocab = tuple(words_from_texts(texts, max_words=max_words))
    built = _TINY_BERTS.get((vocab, seq_length))
    if built and all(os.path.exists(p) for p in built):  # same BERT: built once per process
        return built
    built = _TINY_BERTS[(vocab, seq_length)] = tuple(build_tiny_encoder(
        out_dir, vocab_tokens=list(vocab), layers=2, hidden=64, heads=2, seq_length=seq_length,
        seed=0))
    return built


def world_config(root: str, world: str, seed: int, epochs=None, ranker_epochs=None):
    """A tfrec Config for one synthetic world under `root` (data, TFRecords, checkpoints,
    TensorBoard logs, models); epochs None keep the trainers' defaults."""
    from tfrec.config import Config

    cfg = Config().use_workdir(root, logs=True)
    cfg.data.world, cfg.data.seed, cfg.train.seed = world, seed, seed
    if epochs:
        cfg.train.epochs = epochs
    if ranker_epochs:
        cfg.ranking.epochs = ranker_epochs
    return cfg


def first_queries(cfg, queries: int):
    """`load_search_data` on the judgments of the Home Depot file's first `queries`
    distinct queries (catalog = their products): the smoke runs' slice."""
    from tfrec.data.homedepot import load_homedepot, split_by_query
    from tfrec.search.data import product_catalog
    from tfrec.search.train import SearchData

    judgments = load_homedepot(data_dir=cfg.data_dir)
    keep = set(judgments["query"].drop_duplicates().iloc[:queries])
    judgments = judgments[judgments["query"].isin(keep)].reset_index(drop=True)
    return SearchData(judgments, product_catalog(judgments),
                      split_by_query(judgments, cfg.split, seed=cfg.seed))


def time_calls(fn, inputs, warmup: int, requests: int) -> list:
    """Milliseconds of `requests` calls (inputs rotate) after `warmup` untimed calls."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(requests):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append((time.perf_counter() - start) * 1000)
    return times
