"""Small helpers shared by the benchmark scripts: tables, machine facts, gRPC load."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from typing import List, Sequence

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
