"""Raw tables -> time-split TFRecord shards plus a `meta.json` describing them.

Training, evaluation and export all read `meta.json`, so they agree on split
times, history length and file locations without recomputing anything.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import tensorflow as tf

from tfrec.config import Config
from tfrec.data.examples import build_retrieval_examples
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.io import atomic_write, clean_tables, load_tables
from tfrec.data.pseudonym import key_fingerprint, users_key as config_users_key
from tfrec.data.rows import BadRowReport, dead_letter_lines
from tfrec.data.split import PERIODS, time_split
from tfrec.data.tfrecord import remove_stale_shards, write_tfrecords

META_FILE = "meta.json"


DAY = 86400


ENGINES = ("pandas", "beam")
VOCAB_KINDS = ("users", "items")  # id vocabularies written beside the records
BAD_ROWS_FILE = "bad_rows.json"
# meta.json key: fingerprint of the key the user ids were pseudonymised with (None: raw ids)
PSEUDONYM_META = "pseudonym_key"


def prepare_dataset(data_dir: str, tfrecord_dir: str, history_length: int = 20,
                    val_fraction: float = 0.1, test_fraction: float = 0.1,
                    num_shards: int = 4, features: Optional[FeatureSpec] = None,
                    train_days: Optional[float] = None, *, engine: str = "pandas",
                    max_bad_share: Optional[float] = None, dead_letter: Optional[str] = None,
                    min_count: int = 1, buckets: int = 256,
                    beam_args: Sequence[str] = (), shuffle: str = "auto",
                    users_key: Optional[bytes] = None) -> Dict[str, Any]:
    """Loads tables, splits by time and writes train/val/test TFRecords.

    Examples of every period are built from the full log, so val/test histories
    include earlier periods (as in production) while candidate_prob counts
    training positives only.

    Args:
      data_dir: directory with catalog/users/events tables (files or folders of parts).
      tfrecord_dir: output directory for `{train,val,test}-*.tfrecord`, `vocab/` and
        meta.json (written last: a directory without it is not a prepared dataset).
      history_length: history items per example.
      val_fraction, test_fraction: shares of the time range (see `time_split`).
      num_shards: files per period.
      features: the feature specification of the records (built-ins if None); its
        fingerprint is kept in meta.json, so a feature change re-prepares the data.
      train_days: keep only training examples of the last N days before validation
        (None: the whole training period); histories still reach further back.
      engine: "pandas" (one process, in memory) or "beam" (Apache Beam; same output).
      max_bad_share: None: the first bad row raises (`load_tables`). A share: bad rows
        are set aside, counted by reason (`bad_rows.json`, meta.json) and the run fails
        only when a table has more than this share of them. The Beam engine always
        counts (None means 0).
      dead_letter: write the bad rows there as JSON lines {table, reason, row}.
      min_count: ids with fewer training examples stay out of the id vocabularies.
      buckets: Beam engine: users / items are processed in this many groups.
      beam_args: Beam engine: pipeline options, e.g. ["--runner=FlinkRunner", ...].
      shuffle: Beam engine: "disk" groups through files under the output folder, one
        bucket in memory at a time (local runners); "runner" uses the runner's shuffle;
        "auto" picks disk on the DirectRunner and the runner's elsewhere.
      users_key: pseudonymise user ids with this key as the tables are read
        (`tfrec.data.pseudonym`); meta.json keeps the key's fingerprint, not the key.

    Returns:
      The meta dict (as `load_meta` returns it): split times, example counts per
      period, history_length, file patterns, table sizes, vocabularies, bad rows.

    Raises:
      ValueError: bad arguments, or more bad rows than `max_bad_share` allows.
    """
    started = time.time()
    features = features or default_spec()
    if engine not in ENGINES:
        raise ValueError(f"unknown preparation engine {engine!r}; expected one of {ENGINES}")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"data.vocab_min_count must be an int >= 1, got {min_count!r}")
    if train_days is not None and not train_days > 0:
        raise ValueError(f"data.train_days must be > 0 (or null for all), got {train_days}")
    if engine == "pandas" and any("://" in p for p in (data_dir, tfrecord_dir, dead_letter or "")):
        raise ValueError("the pandas engine reads and writes local paths only; use --engine "
                         "beam for tables or records on a remote filesystem")
    if max_bad_share is not None and not 0.0 <= max_bad_share < 1.0:
        raise ValueError(f"data.max_bad_share must be in [0, 1), got {max_bad_share}")
    if users_key is not None and engine == "beam":
        # The key would travel inside the pipeline sent to the runner's workers.
        raise ValueError("data.pseudonymize_users is not supported by the Beam engine yet "
                         "(the key would be shipped inside the pipeline); use --engine pandas")
    settings = dict(history_length=history_length, val_fraction=val_fraction,
                    test_fraction=test_fraction, num_shards=num_shards, features=features,
                    train_days=train_days, min_count=min_count)
    if engine == "beam":
        meta = _prepare_beam(data_dir, tfrecord_dir, settings, max_bad_share or 0.0,
                             dead_letter, buckets, beam_args, shuffle)
    else:
        meta = _prepare_pandas(data_dir, tfrecord_dir, settings, max_bad_share, dead_letter,
                               users_key)
    meta.update({
        "engine": engine,
        "data_dir": data_dir if "://" in data_dir else os.path.abspath(data_dir),
        "history_length": int(history_length),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "files": {name: f"{name}-*.tfrecord" for name in PERIODS},
        "num_shards": int(num_shards),
        "train_days": train_days,
        "features": features.fingerprint(),
        "vocab": {kind: f"vocab/{kind}.jsonl" for kind in VOCAB_KINDS},
        "vocab_min_count": int(min_count),
        "source_signature": source_signature(data_dir),
        PSEUDONYM_META: key_fingerprint(users_key) if users_key is not None else None,
        "seconds": round(time.time() - started, 2),
    })

    _write_text(os.path.join(tfrecord_dir, META_FILE), json.dumps(meta, indent=2))
    return load_meta(tfrecord_dir)


def prepare_records(cfg: Config, max_bad_share: Optional[float],
                    dead_letter: Optional[str] = None, buckets: int = 256,
                    shuffle: str = "auto") -> dict:
    """`prepare_dataset` with the config's data section (engine, split, features...).

    Args:
      max_bad_share: see `prepare_dataset` (None: stop at the first bad row).
      dead_letter, buckets, shuffle: see `prepare_dataset`.
    """
    return prepare_dataset(cfg.data.data_dir, cfg.data.tfrecord_dir,
                           history_length=cfg.data.history_length,
                           val_fraction=cfg.data.val_fraction,
                           test_fraction=cfg.data.test_fraction,
                           num_shards=cfg.data.num_shards,
                           features=FeatureSpec.from_config(cfg.features),
                           train_days=cfg.data.train_days, engine=cfg.data.engine,
                           max_bad_share=max_bad_share, dead_letter=dead_letter,
                           min_count=cfg.data.vocab_min_count, buckets=buckets,
                           beam_args=cfg.data.beam_args, shuffle=shuffle,
                           users_key=config_users_key(cfg.data))


def _prepare_pandas(data_dir: str, out: str, settings: Dict[str, Any],
                    max_bad_share: Optional[float], dead_letter: Optional[str],
                    users_key: Optional[bytes] = None) -> Dict[str, Any]:
    report = None
    if max_bad_share is None:
        tables = load_tables(data_dir, users_key=users_key)
    else:
        tables, report, bad = clean_tables(data_dir, users_key)
        if dead_letter:
            _write_text(dead_letter, "".join(line + "\n" for line in dead_letter_lines(bad)))
        _check_bad_rows(report, max_bad_share, out, dead_letter)
    split = time_split(tables.events, settings["val_fraction"], settings["test_fraction"])
    examples = build_retrieval_examples(tables.events, tables.catalog,
                                        settings["history_length"], split, settings["features"])
    period = split.assign_period(examples["ts"].to_numpy())
    if settings["train_days"] is not None:
        old = (period == "train") & (examples["ts"].to_numpy()
                                     < split.t_val - settings["train_days"] * DAY)
        examples, period = examples[~old], period[~old]
    _forget_meta(out)
    counts = {}
    for name in PERIODS:
        subset = examples[period == name]
        write_tfrecords(subset, out, name, settings["num_shards"], settings["features"])
        counts[name] = int(len(subset))
    train = examples[period == "train"]
    for kind, column in zip(VOCAB_KINDS, ("user_id", "item_id")):
        lines = vocab_lines(train[column].value_counts().items(), settings["min_count"])
        _write_text(os.path.join(out, "vocab", f"{kind}.jsonl"),
                    "".join(line + "\n" for line in lines))
    return {"split": split.to_dict(), "counts": counts,
            "num_items": int(len(tables.catalog)), "num_users": int(len(tables.users)),
            "num_events": int(len(tables.events)),
            "bad_rows": report.to_dict() if report is not None else None}


def _prepare_beam(data_dir: str, out: str, settings: Dict[str, Any], max_bad_share: float,
                  dead_letter: Optional[str], buckets: int, beam_args: Sequence[str],
                  shuffle: str) -> Dict[str, Any]:
    from apache_beam.options.pipeline_options import PipelineOptions

    from tfrec.data.beam_prepare import resolve_shuffle, run_beam

    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    resolve_shuffle(shuffle, PipelineOptions(list(beam_args)))  # refuse before any work
    staging = os.path.join(out, f".staging-{os.getpid()}-{int(time.time())}")
    try:
        summary = run_beam(data_dir, staging, settings["history_length"],
                           settings["val_fraction"], settings["test_fraction"],
                           settings["num_shards"], settings["features"],
                           settings["train_days"], settings["min_count"], buckets,
                           dead_letter, beam_args, shuffle)
        report = BadRowReport(rows=dict(summary["rows"]))
        for table, reasons in summary["reasons"].items():
            report.reasons[table] = {r: int(v[0]) for r, v in reasons.items()}
            report.examples[table] = {r: list(v[1]) for r, v in reasons.items()}
        if dead_letter:
            _move(os.path.join(staging, "dead_letter.jsonl"), dead_letter)
        _check_bad_rows(report, max_bad_share, out, dead_letter)
        _forget_meta(out)
        for name in PERIODS:
            moved = []
            for path in sorted(tf.io.gfile.glob(os.path.join(staging, f"{name}-*.tfrecord"))):
                target = os.path.join(out, os.path.basename(path))
                _move(path, target)
                moved.append(target)
            remove_stale_shards(out, name, keep=moved)
        for kind in VOCAB_KINDS:
            _move(os.path.join(staging, "vocab", f"{kind}.jsonl"),
                  os.path.join(out, "vocab", f"{kind}.jsonl"))
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    good = summary["good"]
    return {"split": summary["split"], "counts": summary["counts"],
            "num_items": int(good.get("catalog", 0)), "num_users": int(good.get("users", 0)),
            "num_events": int(good.get("events", 0)), "bad_rows": report.to_dict()}


def _move(source: str, target: str) -> None:
    """Renames a file, copying it when the target is on another filesystem."""
    tf.io.gfile.makedirs(os.path.dirname(target) or ".")
    try:
        tf.io.gfile.rename(source, target, overwrite=True)
    except tf.errors.OpError:
        tf.io.gfile.copy(source, target, overwrite=True)
        tf.io.gfile.remove(source)


def _write_text(path: str, text: str) -> None:
    """Writes a text file atomically on local disks; object stores (gs://...) replace
    whole objects anyway."""
    if "://" in path:
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def _forget_meta(out: str) -> None:
    """Removes meta.json before records change, so a crash leaves no stale description."""
    path = os.path.join(out, META_FILE)
    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def _check_bad_rows(report: BadRowReport, max_bad_share: float, out: str,
                    dead_letter: Optional[str]) -> None:
    """Writes bad_rows.json and raises when a table has too many bad rows."""
    _write_text(os.path.join(out, BAD_ROWS_FILE),
                json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    where = f"; bad rows in {dead_letter}" if dead_letter else (
        f"; counts in {os.path.join(out, BAD_ROWS_FILE)} (--dead-letter FILE keeps the rows)")
    report.check(max_bad_share, where)


def vocab_lines(counts: Iterable[Tuple[str, int]], min_count: int = 1) -> List[str]:
    """Id vocabulary as JSON lines {"id", "count"}: most frequent first, ties by id.

    Both engines write it through here, so the files are equal byte for byte.
    """
    kept = sorted(((str(k), int(n)) for k, n in counts if n >= min_count),
                  key=lambda kv: (-kv[1], kv[0]))
    return [json.dumps({"id": k, "count": n}, ensure_ascii=False) for k, n in kept]


def read_vocab(tfrecord_dir: str, kind: str) -> Optional[List[str]]:
    """Ids of a prepared id vocabulary ("users" or "items"), None if it was not written."""
    path = os.path.join(tfrecord_dir, "vocab", f"{kind}.jsonl")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def source_signature(data_dir: str) -> str:
    """Size+mtime of the raw tables (and their parts): records are rebuilt when they change."""
    parts = []
    if os.path.isdir(data_dir):
        for root, _, names in sorted(os.walk(data_dir)):
            for name in sorted(names):
                path = os.path.join(root, name)
                st = os.stat(path)
                parts.append(f"{os.path.relpath(path, data_dir)}:{st.st_size}:"
                             f"{int(st.st_mtime)}")
    return "|".join(parts)


def load_meta(tfrecord_dir: str) -> Dict[str, Any]:
    """Reads meta.json and adds absolute `patterns` per period.

    Patterns are stored relative in the file so a prepared directory can be moved.
    """
    path = os.path.join(tfrecord_dir, META_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"no prepared dataset in {tfrecord_dir!r} ({META_FILE} missing); run data "
            f"preparation first (`tfrec train` does it, or "
            f"tfrec.data.prepare.prepare_dataset)")
    with tf.io.gfile.GFile(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it and prepare the "
                             f"data again") from e
    root = tfrecord_dir if "://" in tfrecord_dir else os.path.abspath(tfrecord_dir)
    meta["patterns"] = {name: os.path.join(root, pattern)
                        for name, pattern in meta["files"].items()}
    return meta
