"""Writes a synthetic world too large for memory: events streamed in Parquet parts.

`generate_world` holds every event at once (10M events need tens of GB as a
DataFrame); here users are simulated chunk by chunk and each chunk's events go to
disk before the next, so memory is bounded by the chunk, not the event count.

Layout of a streamed world (world.json has `"events_layout": "parts"`):

    catalog.parquet, users.parquet   as `World.save` writes them (same rows)
    events/part-00000.parquet, ...   one part per chunk of users; a session's events
                                     are all in one part and session ids are unique
    ground_truth.npz                 catalog and user arrays only: no `query_*` search
                                     log (it grows with sessions), so `World.load`
                                     refuses the layout
    world.json                       written last: its presence marks a complete world

The catalog and users equal `generate_world`'s for the same (spec, seed); events
come from one random stream per chunk, so they depend on `users_per_chunk` too.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from typing import Dict, List, Tuple, Union

import numpy as np

from tfrec.data.io import TABLE_FORMATS, write_table
from tfrec.data.schema import validate_table
from tfrec.data.synthetic import (WorldSpec, _catalog_samplers, _make_catalog, _make_users,
                                  _simulate_sessions, _vocab, _Vocab, get_spec,
                                  save_ground_truth, save_world_meta, world_meta)

log = logging.getLogger(__name__)

STREAM_PRESETS = frozenset({"xlarge"})  # presets `tfrec generate` streams by default
DEFAULT_USERS_PER_CHUNK = 10_000  # ~600k events per part at xlarge sizes
EVENTS_DIR = "events"
EVENTS_LAYOUT = "parts"
_PART = re.compile(r"part-(\d+)\.parquet")
_EVENTS_STREAM = 2  # generate_world's events stream: child 2 of SeedSequence(seed)


def chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    """The random stream of one chunk's events: independent of the other chunks.

    Child `chunk` of the events stream `generate_world` spawns from the seed, so a
    chunk's draws depend only on (seed, chunk), never on how many chunks ran before.

    Args:
      seed: the world's seed.
      chunk: chunk number, from 0.

    Returns:
      A fresh generator.
    """
    return np.random.default_rng(np.random.SeedSequence(seed,
                                                        spawn_key=(_EVENTS_STREAM, chunk)))


def part_path(events_dir: str, chunk: int) -> str:
    """Path of a chunk's events part: `part-00000.parquet`, numbered from 0."""
    return os.path.join(events_dir, f"part-{chunk:05d}.parquet")


def event_part_paths(data_dir: str) -> List[str]:
    """The events parts of a streamed world, in chunk order.

    Args:
      data_dir: the world's directory.

    Returns:
      Paths of `events/part-*.parquet`, sorted by part number.

    Raises:
      FileNotFoundError: no events part in `data_dir/events`.
    """
    events_dir = os.path.join(data_dir, EVENTS_DIR)
    names = os.listdir(events_dir) if os.path.isdir(events_dir) else []
    parts = sorted((int(m.group(1)), n) for n in names if (m := _PART.fullmatch(n)))
    if not parts:
        raise FileNotFoundError(f"no events parts (part-*.parquet) in {events_dir!r}; "
                                f"write a streamed world with `tfrec generate --stream`")
    return [os.path.join(events_dir, n) for _, n in parts]


def write_world_streaming(spec: Union[WorldSpec, str], seed: int, data_dir: str,
                          users_per_chunk: int = DEFAULT_USERS_PER_CHUNK) -> dict:
    """Generates a world and writes it with its events in parts, one chunk at a time.

    Holding 10M events in memory is what this avoids: only the catalog, users, their
    ground truth and one chunk's events are ever in memory.

    Args:
      spec: a WorldSpec or a preset name.
      seed: random seed; (spec, seed, users_per_chunk) gives identical files.
      data_dir: destination; a previous world there is replaced.
      users_per_chunk: users simulated and written per events part.

    Returns:
      The world.json content: table sizes (`num_events` summed over parts),
      `events_layout` "parts", `event_parts` and `users_per_chunk`.

    Raises:
      ValueError: `users_per_chunk` < 1, or `data_dir/events` holds files that are
        not events parts (they are never deleted).
    """
    spec = get_spec(spec)
    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    events_dir = os.path.join(data_dir, EVENTS_DIR)
    _check_replaceable(events_dir)
    os.makedirs(data_dir, exist_ok=True)
    meta_path = os.path.join(data_dir, "world.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the directory is no complete world until the end
    catalog_stream, users_stream = np.random.SeedSequence(seed).spawn(3)[:2]
    vocab = _vocab(spec.lang)
    num_items, num_users, truth = _write_catalog_and_users(
        spec, vocab, data_dir, np.random.default_rng(catalog_stream),
        np.random.default_rng(users_stream))
    tmp_dir = tempfile.mkdtemp(prefix=f".{EVENTS_DIR}.", suffix=".tmp", dir=data_dir)
    try:
        num_events, num_parts = _write_event_parts(spec, vocab, truth, seed, tmp_dir,
                                                   users_per_chunk)
        _install_parts(tmp_dir, data_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone already when installed
    meta = world_meta(spec, seed, num_items, num_users, num_events)
    meta.update({"events_layout": EVENTS_LAYOUT, "event_parts": num_parts,
                 "users_per_chunk": users_per_chunk})
    save_world_meta(meta_path, meta)
    return meta


def _check_replaceable(events_dir: str) -> None:
    """Raises ValueError unless `events_dir` is absent or holds only events parts."""
    if os.path.exists(events_dir) and not os.path.isdir(events_dir):
        raise ValueError(f"{events_dir!r} exists and is not a directory; a streamed world "
                         f"writes its events parts there")
    if os.path.isdir(events_dir):
        foreign = sorted(n for n in os.listdir(events_dir) if not _PART.fullmatch(n))
        if foreign:
            raise ValueError(f"{events_dir!r} holds files that are not events parts "
                             f"({foreign[:5]}); refusing to replace it: move them away")


def _write_catalog_and_users(spec: WorldSpec, vocab: _Vocab, data_dir: str,
                             catalog_rng: np.random.Generator,
                             users_rng: np.random.Generator
                             ) -> Tuple[int, int, Dict[str, np.ndarray]]:
    """Writes catalog.parquet, users.parquet and ground_truth.npz as a whole world has.

    The catalog table (titles, descriptions: the bulk at 1M items) is dropped once
    written; events need only the ground-truth arrays.

    Args:
      spec, vocab: the world's spec and vocabulary.
      data_dir: destination.
      catalog_rng, users_rng: `generate_world`'s catalog and users streams.

    Returns:
      (num_items, num_users, truth): table sizes and the ground truth for simulation.
    """
    catalog, truth = _make_catalog(spec, vocab, catalog_rng)
    write_table(validate_table(catalog, "catalog"), os.path.join(data_dir, "catalog.parquet"))
    num_items = len(catalog)
    del catalog
    users = validate_table(_make_users(spec, truth, users_rng), "users")
    write_table(users, os.path.join(data_dir, "users.parquet"))
    save_ground_truth(os.path.join(data_dir, "ground_truth.npz"), truth)
    return num_items, len(users), truth


def _write_event_parts(spec: WorldSpec, vocab: _Vocab, truth: Dict[str, np.ndarray],
                       seed: int, parts_dir: str, users_per_chunk: int) -> Tuple[int, int]:
    """Simulates users chunk by chunk, writing each chunk's events as one part.

    Only one chunk's events exist at a time; session numbers continue across chunks
    so ids stay unique, and each chunk has its own random stream.

    Args:
      spec, vocab, truth: the world's spec, vocabulary and ground truth.
      seed: the world's seed (chunk streams derive from it).
      parts_dir: directory receiving `part-*.parquet`.
      users_per_chunk: users per chunk.

    Returns:
      (num_events, num_parts).
    """
    samplers = _catalog_samplers(truth, vocab)
    num_chunks = -(-spec.num_users // users_per_chunk)
    num_events = num_sessions = 0
    start = time.perf_counter()
    for chunk in range(num_chunks):
        users = np.arange(chunk * users_per_chunk,
                          min(spec.num_users, (chunk + 1) * users_per_chunk))
        sim = _simulate_sessions(spec, vocab, truth, chunk_rng(seed, chunk), users,
                                 session_offset=num_sessions, samplers=samplers)
        write_table(validate_table(sim.events, "events"), part_path(parts_dir, chunk))
        num_events += len(sim.events)
        num_sessions += sim.num_sessions
        seconds = time.perf_counter() - start
        log.info("events part %d/%d: %s users, %s events so far (%s events/s)", chunk + 1,
                 num_chunks, f"{users[-1] + 1:,}", f"{num_events:,}",
                 f"{num_events / max(seconds, 1e-9):,.0f}")
        del sim  # frees the chunk before the next one is simulated
    return num_events, num_chunks


def _install_parts(parts_dir: str, data_dir: str) -> None:
    """Moves finished parts to `data_dir/events`, replacing an older world's events.

    Readers never see a mix of old and new parts: the old parts go and the new
    directory is renamed in. A whole world's events table would contradict the new
    world.json, so it goes too.
    """
    events_dir = os.path.join(data_dir, EVENTS_DIR)
    if os.path.isdir(events_dir):
        for name in os.listdir(events_dir):  # only parts: _check_replaceable ran
            os.remove(os.path.join(events_dir, name))
        os.rmdir(events_dir)
    os.replace(parts_dir, events_dir)
    for ext in TABLE_FORMATS:
        stale = os.path.join(data_dir, EVENTS_DIR + ext)
        if os.path.isfile(stale):
            os.remove(stale)
