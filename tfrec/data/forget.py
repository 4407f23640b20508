"""Forgetting shoppers: their rows out of the tables and prepared records, and the runs
and models that learned from them found (a user's embedding row lives in their weights).

Every rewrite is atomic (temp + rename), so a crash leaves the old file or the new one.
Counting comes before any rewrite, so an unknown id changes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set

import pandas as pd
import tensorflow as tf

from tfrec.data.io import atomic_write, read_raw, table_files, write_table
from tfrec.data.prepare import META_FILE, read_vocab, vocab_lines
from tfrec.data.pseudonym import USER_ID_TABLES, is_pseudonym, pseudonym, pseudonymize
from tfrec.data.split import PERIODS

RUN_VOCAB = "vocab.json"
MODEL_CARDS = ("tfrec_model.json",)  # assets.extra/ cards naming the run a model came from


@dataclass
class Targets:
    """The ids to forget as each place stores them.

    Args:
      raw: raw ids (what the input tables hold).
      pseudonyms: their pseudonyms (what pseudonymised records, runs and logs hold).
    """

    raw: Set[str] = field(default_factory=set)
    pseudonyms: Set[str] = field(default_factory=set)

    @property
    def any(self) -> Set[str]:
        return self.raw | self.pseudonyms


def targets(users: Iterable[str], key: Optional[bytes]) -> Targets:
    """Raw ids and pseudonyms to look for. With a key, a raw id is also looked for as its
    pseudonym and an id shaped like a pseudonym ("p_" + 20 hex) is taken as one.

    Raises:
      ValueError: no ids, or an empty one.
    """
    users = [str(u) for u in users]
    if not users or any(not u.strip() for u in users):
        raise ValueError(f"give the user ids to forget (--user ID, repeatable), got {users}")
    out = Targets()
    for user in users:
        if key is not None and is_pseudonym(user):
            out.pseudonyms.add(user)
        else:
            out.raw.add(user)
            if key is not None:
                out.pseudonyms.add(pseudonym(user, key))
    return out


def _table_mask(ids: pd.Series, found: Targets, key: Optional[bytes]) -> pd.Series:
    values = ids.astype(str)
    mask = values.isin(found.raw)
    if key is not None and found.pseudonyms:  # an id given as its pseudonym
        mask |= pd.Series(pseudonymize(values, key), index=values.index).isin(found.pseudonyms)
    return mask


def table_rows(data_dir: str, found: Targets, key: Optional[bytes]
               ) -> Dict[str, Dict[str, int]]:
    """Rows holding the ids per users / events table file: {table: {file: rows}}."""
    counts: Dict[str, Dict[str, int]] = {}
    for table in USER_ID_TABLES:
        try:
            paths = table_files(data_dir, table)
        except FileNotFoundError:
            continue
        for path in paths:
            n = int(_table_mask(read_raw(path, table)["user_id"], found, key).sum())
            if n:
                counts.setdefault(table, {})[path] = n
    return counts


def remove_table_rows(counts: Dict[str, Dict[str, int]], found: Targets,
                      key: Optional[bytes]) -> None:
    """Rewrites each table file of `table_rows` without the ids' rows, in its format."""
    for table, files in counts.items():
        for path in files:
            df = read_raw(path, table)
            write_table(df[~_table_mask(df["user_id"], found, key)].reset_index(drop=True),
                        path)


def _shards(tfrecord_dir: str) -> List[str]:
    return sorted(p for name in PERIODS
                  for p in tf.io.gfile.glob(os.path.join(tfrecord_dir, f"{name}-*.tfrecord")))


def _user_of(record: bytes) -> str:
    feature = tf.train.Example.FromString(record).features.feature["user_id"]
    values = feature.bytes_list.value
    return values[0].decode("utf-8", errors="backslashreplace") if values else ""


def record_counts(tfrecord_dir: str, ids: Set[str]) -> Dict[str, int]:
    """Examples of the ids per prepared shard: {shard path: examples}."""
    counts = {}
    for path in _shards(tfrecord_dir):
        n = sum(_user_of(r.numpy()) in ids for r in tf.data.TFRecordDataset(path))
        if n:
            counts[path] = n
    return counts


def remove_records(tfrecord_dir: str, counts: Dict[str, int], ids: Set[str]) -> None:
    """Rewrites the shards without the ids' examples, drops the ids from the user
    vocabulary and updates meta.json's example counts.

    meta.json is removed first and written last, so a crash leaves no description of
    half-rewritten records (the next `tfrec train` prepares again). Its
    `source_signature` is kept: when the tables were rewritten too, the next pandas
    `tfrec train` re-prepares from them, so candidate probabilities and item counts
    no longer include the forgotten users either.
    """
    meta_path = os.path.join(tfrecord_dir, META_FILE)
    meta = None
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        os.remove(meta_path)
    forgotten: Set[str] = set()
    for path, removed in counts.items():
        kept = []
        for record in tf.data.TFRecordDataset(path):
            user = _user_of(record.numpy())
            if user in ids:
                forgotten.add(user)
            else:
                kept.append(record.numpy())

        def write(tmp: str, kept: List[bytes] = kept) -> None:
            with tf.io.TFRecordWriter(tmp) as writer:
                for record in kept:
                    writer.write(record)

        atomic_write(path, write)
        if meta is not None:
            period = os.path.basename(path).split("-", 1)[0]
            meta["counts"][period] = int(meta["counts"][period]) - removed
    _drop_from_vocab(tfrecord_dir, ids)
    if meta is None:
        return
    meta["forgotten_users"] = int(meta.get("forgotten_users", 0)) + len(forgotten)
    _write_json(meta_path, meta)


def _drop_from_vocab(tfrecord_dir: str, ids: Set[str]) -> None:
    path = os.path.join(tfrecord_dir, "vocab", "users.jsonl")
    if read_vocab(tfrecord_dir, "users") is None:
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = vocab_lines(((r["id"], r["count"]) for r in rows if r["id"] not in ids))
    atomic_write(path, lambda tmp: _write_lines(tmp, lines))


def vocab_count(tfrecord_dir: str, ids: Set[str]) -> int:
    """How many of the ids the prepared user vocabulary lists."""
    return len(ids & set(read_vocab(tfrecord_dir, "users") or ()))


def _write_lines(path: str, lines: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _write_json(path: str, payload: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)

    atomic_write(path, write)


def affected_runs(checkpoint_dir: str, ids: Set[str]) -> List[str]:
    """Training runs (`<checkpoint_dir>/<run>`) whose user vocabulary holds one of the ids:
    the user's embedding row is in their weights (and their rankers')."""
    runs = []
    if not os.path.isdir(checkpoint_dir):
        return runs
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name, RUN_VOCAB)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if ids & set(json.load(f).get("users") or ()):
                    runs.append(os.path.join(checkpoint_dir, name))
    return runs


def affected_models(base_dir: str, runs: Iterable[str], ids: Set[str]) -> List[str]:
    """Exported versions (`<base_dir>/<model>/<version>`) built from one of `runs` (their
    card's run_dir), or whose files hold one of the ids (a vocabulary baked in)."""
    runs = {os.path.abspath(r) for r in runs}
    needles = [i.encode("utf-8") for i in ids]
    found = []
    if not os.path.isdir(base_dir):
        return found
    for model in sorted(os.listdir(base_dir)):
        model_dir = os.path.join(base_dir, model)
        if not os.path.isdir(model_dir):
            continue
        for version in sorted(os.listdir(model_dir)):
            version_dir = os.path.join(model_dir, version)
            if not (version.isdigit() and os.path.isdir(version_dir)):
                continue
            if _card_run(version_dir) in runs or _holds_bytes(version_dir, needles):
                found.append(version_dir)
    return found


def _card_run(version_dir: str) -> Optional[str]:
    for name in MODEL_CARDS:
        path = os.path.join(version_dir, "assets.extra", name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                run_dir = json.load(f).get("run_dir")
            if run_dir:
                return os.path.abspath(run_dir)
    return None


def _holds_bytes(directory: str, needles: List[bytes], chunk: int = 1 << 24) -> bool:
    """Whether any file under `directory` contains one of the byte strings."""
    overlap = max((len(n) for n in needles), default=1)
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                tail = b""
                while True:
                    block = f.read(chunk)
                    if not block:
                        break
                    window = tail + block
                    if any(n in window for n in needles):
                        return True
                    tail = window[-overlap:]
    return False
