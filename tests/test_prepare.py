"""Data preparation engines: Beam writes what pandas writes; bad rows are counted, kept
aside and never lost; `tfrec train` trains on either engine's records.

Beam runs for real on the DirectRunner (in memory, and with two worker processes).
"""

import glob
import json
import os
import subprocess
import sys
from copy import deepcopy

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import tfrec  # noqa: F401
from tfrec.data.io import write_table
from tfrec.data.prepare import load_meta, prepare_dataset, read_vocab
from tfrec.data.schema import SchemaError
from tfrec.data.synthetic import generate_world

pytest.importorskip("apache_beam", reason="the Beam engine needs the beam extra")

PERIODS = ("train", "val", "test")
META_KEYS = ("split", "counts", "num_items", "num_users", "num_events", "bad_rows")


def _records(out: str, period: str) -> list:
    return sorted(r for path in glob.glob(os.path.join(out, f"{period}-*.tfrecord"))
                  for r in tf.data.TFRecordDataset(path).as_numpy_iterator())


def _assert_same_output(a: str, b: str) -> None:
    meta_a, meta_b = load_meta(a), load_meta(b)
    for key in META_KEYS:
        assert meta_a[key] == meta_b[key], key
    for period in PERIODS:
        records = _records(a, period)
        assert len(records) == meta_a["counts"][period]
        assert records == _records(b, period), period
        assert len(glob.glob(os.path.join(b, f"{period}-*-of-00004.tfrecord"))) == 4
    for kind in ("users", "items"):
        with open(os.path.join(a, "vocab", f"{kind}.jsonl"), "rb") as fa, \
                open(os.path.join(b, "vocab", f"{kind}.jsonl"), "rb") as fb:
            assert fa.read() == fb.read(), kind


TWO_WORKERS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


@pytest.mark.parametrize("world,beam_args,shuffle", [
    ("tiny", (), "auto"),  # the DirectRunner's default: grouping through files on disk
    ("tiny", TWO_WORKERS, "disk"),
    ("tiny", (), "runner"),
    ("tiny", TWO_WORKERS, "runner"),
    ("small", (), "auto"),
], ids=["tiny", "tiny-2-workers", "tiny-runner-shuffle", "tiny-2-workers-runner-shuffle",
        "small"])
def test_beam_writes_what_pandas_writes(world, beam_args, shuffle, tiny_world_dir, tmp_path):
    if world == "tiny":
        data = tiny_world_dir
    else:
        data = str(tmp_path / "data")
        generate_world("small", seed=42).save(data)
    pandas_meta = prepare_dataset(data, str(tmp_path / "pandas"), max_bad_share=0.0)
    beam_meta = prepare_dataset(data, str(tmp_path / "beam"), engine="beam", buckets=13,
                                beam_args=beam_args, shuffle=shuffle)
    assert pandas_meta["engine"] == "pandas" and beam_meta["engine"] == "beam"
    _assert_same_output(str(tmp_path / "pandas"), str(tmp_path / "beam"))
    # Staging and the disk shuffle's spill files are gone.
    assert not [n for n in os.listdir(tmp_path / "beam") if n.startswith(".")]
    # The probabilities are the logQ ones: training positives only, summing to one
    # over the catalog (items without positives at the 0.5 pseudo-count).
    probs = {}
    for record in _records(str(tmp_path / "beam"), "train"):
        f = tf.train.Example.FromString(record).features.feature
        probs[f["item_id"].bytes_list.value[0]] = f["candidate_prob"].float_list.value[0]
    counts = {json.loads(line)["id"].encode(): json.loads(line)["count"]
              for line in open(tmp_path / "beam" / "vocab" / "items.jsonl")}
    total = sum(counts.values()) + 0.5 * (beam_meta["num_items"] - len(counts))
    for item, p in probs.items():
        assert p == pytest.approx(counts[item] / total, rel=1e-6)


def _dirty_tables(tiny_world, path, fmt: str = ".csv") -> dict:
    """The tiny world with bad rows of every kind appended; returns the expected reasons."""
    catalog = tiny_world.catalog.astype(str)
    users = tiny_world.users.astype(str)
    events = tiny_world.events.astype(str)
    first = events.iloc[0].to_dict()
    bad_events = [dict(first, ts="soon"), dict(first, ts=""), dict(first, event_type="teleport"),
                  dict(first, item_id="NOPE-1", event_type="click"),
                  dict(first, item_id="NOPE-2", event_type="purchase"),
                  dict(first, event_type="click", item_id=""),
                  dict(first, user_id="", query="无线耳机 café")]
    item = catalog.iloc[5].to_dict()
    bad_catalog = [dict(item, item_id="X-price", price="-3"),
                   dict(item, item_id="X-title", title=""),
                   dict(catalog.iloc[7].to_dict(), title="Größe 无线 duplicate")]
    bad_users = [users.iloc[3].to_dict()]
    tables = {"catalog": pd.concat([catalog, pd.DataFrame(bad_catalog)], ignore_index=True),
              "users": pd.concat([users, pd.DataFrame(bad_users)], ignore_index=True),
              "events": pd.concat([events, pd.DataFrame(bad_events)], ignore_index=True)}
    os.makedirs(path, exist_ok=True)
    for name, df in tables.items():
        write_table(df, os.path.join(path, name + fmt))
    duplicated_item = catalog.iloc[7]["item_id"]
    item_events = int((tiny_world.events["item_id"] == duplicated_item).sum())
    return {
        "events": {"ts: not an int": 1, "ts: missing": 1, "event_type: unknown value": 1,
                   "item_id: not in catalog": 2 + item_events,
                   "item_id: empty (only search events may have none)": 1,
                   "user_id: empty": 1},
        "catalog": {"price: negative or not finite": 1, "title: empty": 1,
                    "item_id: duplicate": 2},
        "users": {"user_id: duplicate": 2},
    }


def test_bad_rows_are_counted_set_aside_and_equal_in_both_engines(tiny_world, tmp_path):
    data = str(tmp_path / "dirty")
    expected = _dirty_tables(tiny_world, data)
    outputs = {}
    for engine in ("pandas", "beam"):
        out, letter = str(tmp_path / engine), str(tmp_path / f"{engine}.jsonl")
        meta = prepare_dataset(data, out, engine=engine, max_bad_share=0.05, buckets=5,
                               dead_letter=letter)
        report = meta["bad_rows"]
        for table, reasons in expected.items():
            assert report[table]["reasons"] == reasons, (engine, table)
            # nothing lost: every row read is either used or set aside
            good = {"catalog": meta["num_items"], "users": meta["num_users"],
                    "events": meta["num_events"]}[table]
            assert good + report[table]["bad"] == report[table]["rows"]
        with open(letter, encoding="utf-8") as f:
            lines = sorted(f.read().splitlines())
        assert len(lines) == sum(sum(r.values()) for r in expected.values())
        assert any("无线耳机 café" in line for line in lines)  # Unicode kept as is
        assert any("Größe 无线 duplicate" in line for line in lines)
        assert json.load(open(os.path.join(out, "bad_rows.json"))) == report
        outputs[engine] = (out, lines)
    assert outputs["pandas"][1] == outputs["beam"][1]
    _assert_same_output(outputs["pandas"][0], outputs["beam"][0])
    # the unknown item never enters a history either
    for record in _records(outputs["beam"][0], "train"):
        history = tf.train.Example.FromString(record).features.feature["history"]
        assert not {b"NOPE-1", b"NOPE-2"} & set(history.bytes_list.value)


@pytest.mark.parametrize("engine", ["pandas", "beam"])
def test_too_many_bad_rows_fail_and_write_no_records(engine, tiny_world, tmp_path):
    data = str(tmp_path / "dirty")
    _dirty_tables(tiny_world, data)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"catalog rows \(1\.\d\d%\) are bad, above "
                                         r"data.max_bad_share 0.001.*price: negative"):
        prepare_dataset(data, out, engine=engine, max_bad_share=0.001, buckets=3)
    assert not glob.glob(os.path.join(out, "*.tfrecord"))
    assert not os.path.exists(os.path.join(out, "meta.json"))
    assert json.load(open(os.path.join(out, "bad_rows.json")))["catalog"]["bad"] == 4


@pytest.mark.parametrize("engine", ["pandas", "beam"])
def test_unreadable_or_incomplete_tables_name_the_problem(engine, tiny_world, tmp_path):
    data = tmp_path / "data"
    tiny_world.save(str(data))
    (data / "events.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SchemaError, match=r"events file .*events\.parquet.*not a valid Parquet"):
        prepare_dataset(str(data), str(tmp_path / "out"), engine=engine, max_bad_share=0.1)
    write_table(tiny_world.events.drop(columns=["user_id"]), str(data / "events.parquet"))
    with pytest.raises(SchemaError, match=r"events table is missing column\(s\) \['user_id'\]"):
        prepare_dataset(str(data), str(tmp_path / "out"), engine=engine, max_bad_share=0.1)


def test_tables_in_parts_read_like_one_file(tiny_world, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    tiny_world.save(str(whole))
    tiny_world.save(str(parts))
    os.remove(parts / "events.parquet")
    for i, chunk in enumerate(np.array_split(np.arange(len(tiny_world.events)), 3)):
        write_table(tiny_world.events.iloc[chunk],
                    str(parts / "events" / f"part-{i:05d}.parquet"))
    prepare_dataset(str(whole), str(tmp_path / "a"), max_bad_share=0.0)
    prepare_dataset(str(parts), str(tmp_path / "b"), engine="beam", buckets=4)
    _assert_same_output(str(tmp_path / "a"), str(tmp_path / "b"))


def test_cli_prepare_then_train_on_the_beam_records(tiny_config, tiny_world, tmp_path):
    data = str(tmp_path / "dirty")
    _dirty_tables(tiny_world, data)
    out, letter = str(tmp_path / "records"), str(tmp_path / "bad.jsonl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(tfrec.__file__)), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "tfrec", "prepare", "--engine", "beam", "--data-dir", data,
               "--out", out, "--buckets", "4"]
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("tfrec: error: ") and "above data.max_bad_share 0" in last
    assert "Traceback" not in failed.stderr
    done = subprocess.run(command + ["--max-bad-share", "0.05", "--dead-letter", letter,
                                     "--runner", "DirectRunner", "--",
                                     "--direct_num_workers=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "prepared " in done.stdout and "(beam," in done.stdout
    assert "set aside 4 of" in done.stdout and os.path.getsize(letter) > 0

    from tfrec.training.trainer import train_retrieval

    cfg = deepcopy(tiny_config)
    cfg.data.data_dir, cfg.data.tfrecord_dir = data, out
    cfg.data.max_bad_share = 0.05
    cfg.train.epochs, cfg.train.run_name = 1, "from-beam"
    cfg.train.checkpoint_dir = str(tmp_path / "ckpt")
    cfg.train.log_dir = str(tmp_path / "logs")
    before = sorted(os.listdir(out))
    run = train_retrieval(cfg)
    assert sorted(os.listdir(out)) == before  # trained on them, not re-prepared
    with open(os.path.join(run.run_dir, "vocab.json")) as f:
        vocab = json.load(f)
    assert vocab["users"] == read_vocab(out, "users")
    assert vocab["items"] == read_vocab(out, "items")
    assert "NOPE-1" not in vocab["items"]
    cfg.data.history_length = 7  # another setting: refused, not silently re-prepared
    with pytest.raises(ValueError, match="prepared by the Beam engine.*history_length"):
        train_retrieval(cfg)


def test_rows_the_runner_loses_are_an_error():
    from tfrec.data.beam_prepare import check_balance

    summary = {"rows": {"catalog": 10, "users": 5, "events": 100},
               "good": {"catalog": 9, "users": 5, "events": 97},
               "reasons": {"events": {"ts: missing": (3, [])}},
               "counts": {"train": 20, "val": 5, "test": 5}, "examples": {"built": 30}}
    with pytest.raises(RuntimeError, match="read 10 catalog rows but accounted for 9.*1 rows "
                                           "were lost"):
        check_balance(summary)
    summary["good"]["catalog"] = 10
    check_balance(summary)
    summary["examples"]["built"] = 31
    with pytest.raises(RuntimeError, match="built 31 examples but wrote 30"):
        check_balance(summary)


def test_bad_settings_are_refused_before_any_work(tiny_world_dir, tmp_path):
    from tfrec.cli import main

    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="pandas engine reads and writes local paths only"):
        prepare_dataset(tiny_world_dir, "gs://bucket/records")
    with pytest.raises(ValueError, match="unknown preparation engine 'spark'"):
        prepare_dataset(tiny_world_dir, out, engine="spark")
    with pytest.raises(ValueError, match="vocab_min_count must be an int >= 1"):
        prepare_dataset(tiny_world_dir, out, min_count=0)
    with pytest.raises(ValueError, match=r"max_bad_share must be in \[0, 1\)"):
        prepare_dataset(tiny_world_dir, out, max_bad_share=1.5)
    assert main(["prepare", "--data-dir", tiny_world_dir, "--out", out,
                 "--runner", "FlinkRunner"]) == 2  # Beam options need --engine beam
    with pytest.raises(ValueError, match="--shuffle disk is for local runners"):
        prepare_dataset(tiny_world_dir, out, engine="beam", shuffle="disk",
                        beam_args=("--runner=DataflowRunner",))
    with pytest.raises(ValueError, match="unknown shuffle 'spark'"):
        prepare_dataset(tiny_world_dir, out, engine="beam", shuffle="spark")
    assert not os.path.exists(out)


def test_the_disk_shuffle_is_the_local_runners_default():
    from apache_beam.options.pipeline_options import PipelineOptions

    from tfrec.data.beam_prepare import resolve_shuffle

    for args, expected in [((), "disk"), (("--runner=DirectRunner",), "disk"),
                           (("--runner=FlinkRunner",), "runner"),
                           (("--runner=DataflowRunner",), "runner")]:
        assert resolve_shuffle("auto", PipelineOptions(list(args))) == expected, args
    assert resolve_shuffle("runner", PipelineOptions([])) == "runner"
