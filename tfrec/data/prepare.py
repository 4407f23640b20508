"""Raw tables -> time-split TFRecord shards plus a `meta.json` describing them.

Training, evaluation and export all read `meta.json`, so they agree on split
times, history length and file locations without recomputing anything.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from tfrec.data.examples import build_retrieval_examples
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.io import atomic_write, load_tables
from tfrec.data.split import PERIODS, time_split
from tfrec.data.tfrecord import write_tfrecords

META_FILE = "meta.json"


DAY = 86400


def prepare_dataset(data_dir: str, tfrecord_dir: str, history_length: int = 20,
                    val_fraction: float = 0.1, test_fraction: float = 0.1,
                    num_shards: int = 4, features: Optional[FeatureSpec] = None,
                    train_days: Optional[float] = None) -> Dict[str, Any]:
    """Loads tables, splits by time and writes train/val/test TFRecords.

    Examples of every period are built from the full log, so val/test histories
    include earlier periods (as in production) while candidate_prob counts
    training positives only.

    Args:
      data_dir: directory with catalog/users/events tables.
      tfrecord_dir: output directory for `{train,val,test}-*.tfrecord` and meta.json.
      history_length: history items per example.
      val_fraction, test_fraction: shares of the time range (see `time_split`).
      num_shards: files per period.
      features: the feature specification of the records (built-ins if None); its
        fingerprint is kept in meta.json, so a feature change re-prepares the data.
      train_days: keep only training examples of the last N days before validation
        (None: the whole training period); histories still reach further back.

    Returns:
      The meta dict (as `load_meta` returns it): split times, example counts per
      period, history_length, file patterns, table sizes.
    """
    started = time.time()
    features = features or default_spec()
    tables = load_tables(data_dir)
    split = time_split(tables.events, val_fraction, test_fraction)
    examples = build_retrieval_examples(tables.events, tables.catalog, history_length, split,
                                        features)
    period = split.assign_period(examples["ts"].to_numpy())
    if train_days is not None:
        if not train_days > 0:
            raise ValueError(f"data.train_days must be > 0 (or null for all), got {train_days}")
        old = (period == "train") & (examples["ts"].to_numpy() < split.t_val - train_days * DAY)
        examples, period = examples[~old], period[~old]
    counts, files = {}, {}
    for name in PERIODS:
        subset = examples[period == name]
        write_tfrecords(subset, tfrecord_dir, name, num_shards, features)
        counts[name] = int(len(subset))
        files[name] = f"{name}-*.tfrecord"
    meta = {
        "data_dir": os.path.abspath(data_dir),
        "history_length": int(history_length),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "split": split.to_dict(),
        "counts": counts,
        "files": files,
        "num_shards": int(num_shards),
        "train_days": train_days,
        "features": features.fingerprint(),
        "num_items": int(len(tables.catalog)),
        "num_users": int(len(tables.users)),
        "num_events": int(len(tables.events)),
        "seconds": round(time.time() - started, 2),
    }

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)

    atomic_write(os.path.join(tfrecord_dir, META_FILE), write)
    return load_meta(tfrecord_dir)


def load_meta(tfrecord_dir: str) -> Dict[str, Any]:
    """Reads meta.json and adds absolute `patterns` per period.

    Patterns are stored relative in the file so a prepared directory can be moved.
    """
    path = os.path.join(tfrecord_dir, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no prepared dataset in {tfrecord_dir!r} ({META_FILE} missing); run data "
            f"preparation first (`tfrec train` does it, or "
            f"tfrec.data.prepare.prepare_dataset)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it and prepare the "
                             f"data again") from e
    meta["patterns"] = {name: os.path.join(os.path.abspath(tfrecord_dir), pattern)
                        for name, pattern in meta["files"].items()}
    return meta
