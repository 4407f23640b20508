"""Streamed synthetic worlds: events written in parts, one chunk of users at a time."""

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from tfrec.data.io import load_tables, read_table
from tfrec.data.schema import validate_table
from tfrec.data.synthetic import WORLD_PRESETS, World, WorldSpec
from tfrec.data import synthetic_stream
from tfrec.data.synthetic_stream import (STREAM_PRESETS, event_part_paths,
                                         write_world_streaming)

CHUNK = 70  # tiny has 300 users: parts of 70, 70, 70, 70 and 20 users
SEED = 42


def read_parts(data_dir):
    return [read_table(path, "events") for path in event_part_paths(data_dir)]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The tiny world streamed in 5 parts: (directory, world.json content)."""
    path = str(tmp_path_factory.mktemp("streamed"))
    return path, write_world_streaming("tiny", SEED, path, users_per_chunk=CHUNK)


def test_tiny_world_hashes_are_unchanged(tiny_world):
    # Tests and benches depend on exact worlds: the streaming refactor of the
    # simulator must not move any random draw of generate_world.
    hashes = {name: int(pd.util.hash_pandas_object(getattr(tiny_world, name)).sum())
              & 0xFFFFFFFFFFFFFFFF for name in ("catalog", "users", "events")}
    assert hashes == {"catalog": 7748283870037493858, "users": 10870182930024881121,
                      "events": 8123380590756054531}


def test_parts_form_a_valid_events_table(streamed):
    data_dir, meta = streamed
    parts = read_parts(data_dir)
    assert [os.path.basename(p) for p in event_part_paths(data_dir)] == [
        f"part-{i:05d}.parquet" for i in range(5)]
    events = validate_table(pd.concat(parts, ignore_index=True), "events")
    catalog = read_table(os.path.join(data_dir, "catalog.parquet"), "catalog")
    items = events.loc[events["item_id"] != "", "item_id"]
    assert items.isin(catalog["item_id"]).all()
    assert set(events["event_type"]) == {"search", "impression", "click", "add_to_cart",
                                         "purchase"}
    assert meta["num_events"] == len(events) == json.load(
        open(os.path.join(data_dir, "world.json")))["num_events"]
    assert (meta["events_layout"], meta["event_parts"], meta["num_items"],
            meta["num_users"]) == ("parts", 5, 300, 300)


def test_sessions_are_unique_across_parts(streamed):
    parts = read_parts(streamed[0])
    sessions = [set(p["session_id"]) for p in parts]
    assert sum(map(len, sessions)) == len(set().union(*sessions))  # no id in two parts
    for part in parts:  # a session is one user's
        assert (part.groupby("session_id")["user_id"].nunique() == 1).all()


def test_each_part_holds_only_its_chunk_of_users(streamed):
    data_dir, _ = streamed
    users = read_table(os.path.join(data_dir, "users.parquet"), "users")["user_id"]
    for chunk, part in enumerate(read_parts(data_dir)):
        expected = set(users[chunk * CHUNK:(chunk + 1) * CHUNK])
        assert set(part["user_id"]) <= expected
        assert len(set(part["user_id"])) > 0.9 * len(expected)  # everyone has sessions


def test_catalog_and_users_are_those_of_generate_world(streamed, tiny_world):
    data_dir, _ = streamed
    for name in ("catalog", "users"):
        pd.testing.assert_frame_equal(
            read_table(os.path.join(data_dir, f"{name}.parquet"), name),
            getattr(tiny_world, name))
    with np.load(os.path.join(data_dir, "ground_truth.npz")) as npz:
        assert not [n for n in npz.files if n.startswith("query_")]  # no search log
        np.testing.assert_array_equal(npz["user_w1"], tiny_world.ground_truth["user_w1"])


def test_same_seed_same_files(streamed, tmp_path):
    data_dir, _ = streamed
    write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=CHUNK)
    for a, b in zip(read_parts(data_dir), read_parts(str(tmp_path)), strict=True):
        pd.testing.assert_frame_equal(a, b)
    for name in ("catalog.parquet", "users.parquet", "world.json"):
        with open(os.path.join(data_dir, name), "rb") as fa, \
                open(tmp_path / name, "rb") as fb:
            assert fa.read() == fb.read(), name


def test_writer_holds_one_chunk_at_a_time(tmp_path, monkeypatch):
    # Each chunk is written before the next is simulated, and simulated alone.
    calls = []
    simulate, write = synthetic_stream._simulate_sessions, synthetic_stream.write_table

    def spy_simulate(spec, vocab, truth, rng, users, **kwargs):
        calls.append(("simulate", len(users)))
        return simulate(spec, vocab, truth, rng, users, **kwargs)

    def spy_write(df, path):
        calls.append(("write", os.path.basename(path)))
        return write(df, path)

    monkeypatch.setattr(synthetic_stream, "_simulate_sessions", spy_simulate)
    monkeypatch.setattr(synthetic_stream, "write_table", spy_write)
    write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=100)
    assert calls == [("write", "catalog.parquet"), ("write", "users.parquet")] + [
        step for i in range(3)
        for step in (("simulate", 100), ("write", f"part-{i:05d}.parquet"))]


def peak_bytes(spec, directory, users_per_chunk):
    tracemalloc.start()
    try:
        write_world_streaming(spec, SEED, str(directory), users_per_chunk=users_per_chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_follows_the_chunk_not_the_events(tmp_path):
    small = WorldSpec(name="s", num_items=300, num_users=150, days=30, sessions_per_user=14.0)
    big = WorldSpec(name="b", num_items=300, num_users=600, days=30, sessions_per_user=14.0)
    chunked_small = peak_bytes(small, tmp_path / "small", 50)
    chunked_big = peak_bytes(big, tmp_path / "big", 50)  # 4x the events (~59k)
    whole_big = peak_bytes(big, tmp_path / "whole", 600)
    assert chunked_big < 1.5 * chunked_small
    assert whole_big > 3 * chunked_big


def test_rewrite_replaces_older_parts_and_whole_events(tmp_path, tiny_world):
    tiny_world.save(str(tmp_path))  # a whole world first: events.parquet
    write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=50)
    meta = write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=150)
    assert len(event_part_paths(str(tmp_path))) == meta["event_parts"] == 2
    assert not os.path.exists(tmp_path / "events.parquet")
    assert sorted(os.listdir(tmp_path)) == ["catalog.parquet", "events", "ground_truth.npz",
                                            "users.parquet", "world.json"]


def test_foreign_files_in_events_dir_are_kept(tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not events parts"):
        write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=100)
    assert (tmp_path / "events" / "notes.txt").read_text() == "mine"


def test_bad_chunk_size(tmp_path):
    with pytest.raises(ValueError, match="users_per_chunk must be >= 1, got 0"):
        write_world_streaming("tiny", SEED, str(tmp_path), users_per_chunk=0)


def test_loaders_name_the_streamed_layout_or_read_its_parts(streamed):
    data_dir, meta = streamed
    with pytest.raises(ValueError, match="streamed.*events/part-"):
        World.load(data_dir)
    # tables in parts are read whole by load_tables (small worlds) and in batches by the
    # Beam engine (tests/test_prepare.py)
    assert len(load_tables(data_dir).events) == meta["num_events"]


def test_xlarge_preset_is_streamed():
    spec = WORLD_PRESETS["xlarge"]
    assert spec.num_items >= 1_000_000
    # ~9.7 events per session at 1M items (measured): 10M events need ~1.03M sessions.
    assert spec.num_users * spec.sessions_per_user >= 1.2e6
    assert "xlarge" in STREAM_PRESETS


def test_users_per_chunk_needs_streaming(tmp_path):
    from tfrec.config import Config
    from tfrec.workflow import generate

    cfg = Config()
    cfg.data.data_dir = str(tmp_path)
    with pytest.raises(ValueError, match="only to a streamed world"):
        generate(cfg, "tiny", users_per_chunk=10)


def test_cli_streams_the_tiny_world(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tfrec", "generate", "--world", "tiny",
                           "--stream", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert " events in 1 part (" in proc.stdout and "events part 1/1" in proc.stderr
    meta = json.load(open(tmp_path / "world.json"))
    assert meta["events_layout"] == "parts"
    assert meta["num_events"] == sum(len(p) for p in read_parts(str(tmp_path)))
