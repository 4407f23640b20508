"""Data preparation as an Apache Beam pipeline: the pandas engine's steps, partitioned.

The pandas engine holds every table in one process; this pipeline runs the very same
functions (`check_rows`, `split_duplicates`, `split_unknown_items`, `user_examples`,
`with_items`, `serialize_examples`) on buckets of users or items, which is exact because
each of them only looks within one user or one item. So the output equals the pandas
engine's, and it runs on the DirectRunner here or on Flink, Spark or Dataflow by flag.

Import needs the `beam` extra (`pip install 'tfrec[beam]'`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import tensorflow as tf

_quiet = logging.getLogger()
_level = _quiet.level
_quiet.setLevel(logging.ERROR)  # apache_beam warns about optional GCP clients on import
try:
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the Beam engine needs Apache Beam: pip install 'tfrec[beam]' "
                      "(apache-beam[tfrecord]==2.77.0)") from e
finally:
    _quiet.setLevel(_level)

from tfrec.data.beam_spill import LOCAL_RUNNERS, concat_shards, group_on_disk  # noqa: E402
from tfrec.data.examples import UNSEEN_ITEM_COUNT, user_examples, with_items  # noqa: E402
from tfrec.data.feature_spec import FeatureSpec  # noqa: E402
from tfrec.data.rows import (EXAMPLES_PER_REASON, check_rows,  # noqa: E402
                             dead_letter_lines, split_duplicates, split_unknown_items)
from tfrec.data.prepare import DAY, vocab_lines  # noqa: E402
from tfrec.data.schema import SchemaError  # noqa: E402
from tfrec.data.split import PERIODS, TimeSplit, time_split  # noqa: E402
from tfrec.data.tfrecord import serialize_examples  # noqa: E402

TABLES = ("catalog", "users", "events")
FORMATS = (".parquet", ".csv")
CSV_ROWS = 100_000  # rows per batch when reading CSV
STATS_FILE = "stats.json"
SHUFFLES = ("auto", "runner", "disk")
RECORDS = "records"  # the disk shuffle's per-bucket TFRecord files, under the spill folder


def beam_table_files(data_dir: str, table: str) -> Tuple[str, List[str]]:
    """(format, files) of a table on any Beam filesystem: one file or a folder of parts.

    Raises:
      FileNotFoundError: no file of the table.
    """
    for ext in FORMATS:
        single = FileSystems.join(data_dir, table + ext)
        if FileSystems.exists(single):
            return ext, [single]
    for ext in FORMATS:
        found = FileSystems.match([FileSystems.join(data_dir, table, "*" + ext)])[0]
        files = sorted(m.path for m in found.metadata_list)
        if files:
            return ext, files
    raise FileNotFoundError(f"no {table} table in data directory {data_dir!r} (expected "
                            f"{table}.parquet or {table}.csv, or a {table}/ folder of parts)")


def check_readable(table: str, ext: str, files: Sequence[str]) -> None:
    """Fails before the pipeline starts when a file is empty or not Parquet/CSV at all.

    Raises:
      SchemaError: naming the file.
    """
    import pyarrow.parquet as pq

    for path in files:
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                if ext == ".parquet":
                    pq.ParquetFile(f).schema_arrow  # reads the footer only
                elif not f.read(1):
                    raise ValueError("the file is empty")
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt input
            kind = "Parquet" if ext == ".parquet" else "CSV"
            raise SchemaError(f"could not read {table} file {path!r}: not a valid {kind} "
                              f"file ({type(e).__name__}: {e})") from e


def _csv_batches(path: str) -> Iterator[pd.DataFrame]:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        yield from pd.read_csv(f, dtype=str, keep_default_na=False, chunksize=CSV_ROWS)


def bucket_of(ids: pd.Series, buckets: int) -> np.ndarray:
    """Stable bucket of each id (pandas' fixed-key hash: equal in every worker process)."""
    return (pd.util.hash_array(ids.to_numpy(dtype=object)) % np.uint64(buckets)).astype(
        np.int64)


def _by_bucket(df: pd.DataFrame, column: str, buckets: int) -> Iterator[Tuple[int, pd.DataFrame]]:
    if len(df):
        for bucket, part in df.groupby(bucket_of(df[column], buckets), sort=False):
            yield int(bucket), part


def _concat(frames: Iterable[pd.DataFrame]) -> Optional[pd.DataFrame]:
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


class _CheckRows(beam.DoFn):
    """Raw batch -> good rows (main output), bad rows ("bad") and a row count ("stats")."""

    def __init__(self, table: str):
        self.table = table

    def process(self, raw: pd.DataFrame):
        good, bad = check_rows(raw, self.table)
        yield beam.pvalue.TaggedOutput("stats", (("rows", self.table), len(raw)))
        if len(bad):
            yield beam.pvalue.TaggedOutput("bad", bad)
        if len(good):
            yield good


def _items_known(element):
    """Item bucket: the catalog without duplicate ids, events about known items only."""
    bucket, grouped = element
    catalog = _concat(grouped["catalog"])
    events = _concat(grouped["events"])
    if catalog is not None:
        catalog, duplicates = split_duplicates(catalog, "catalog")
        if len(duplicates):
            yield beam.pvalue.TaggedOutput("bad", duplicates)
        yield beam.pvalue.TaggedOutput("stats", (("good", "catalog"), len(catalog)))
        yield beam.pvalue.TaggedOutput("catalog", (bucket, catalog))
    if events is not None:
        ids = catalog["item_id"] if catalog is not None else []
        events, unknown = split_unknown_items(events, ids)
        if len(unknown):
            yield beam.pvalue.TaggedOutput("bad", unknown)
        if len(events):
            yield events


def _users_unique(element):
    _, grouped = element
    users, duplicates = split_duplicates(_concat(grouped["users"]), "users")
    if len(duplicates):
        yield beam.pvalue.TaggedOutput("bad", duplicates)
    yield (("good", "users"), len(users))


def _user_examples(element, history_length: int, buckets: int):
    """User bucket: every positive with its point-in-time query side, keyed by item bucket."""
    _, grouped = element
    events = _concat(grouped["events"])
    if events is None:
        return
    yield beam.pvalue.TaggedOutput("stats", (("good", "events"), len(events)))
    yield beam.pvalue.TaggedOutput("ts", (int(events["ts"].min()), int(events["ts"].max())))
    examples = user_examples(events, history_length)
    yield beam.pvalue.TaggedOutput("stats", (("examples", "built"), len(examples)))
    yield from _by_bucket(examples, "item_id", buckets)


def _count_train(element, split: Dict[str, int]):
    """Item bucket: training positives per catalog item, clipped like candidate_probabilities."""
    bucket, grouped = element
    catalog, examples = _concat(grouped["catalog"]), _concat(grouped["examples"])
    if catalog is None:
        return
    counts = pd.Series(0.0, index=catalog["item_id"].to_numpy())
    if examples is not None:
        train = examples[examples["ts"] < split["t_val"]]
        counts = train["item_id"].value_counts().reindex(counts.index, fill_value=0).astype(
            np.float64)
    counts = counts.clip(lower=UNSEEN_ITEM_COUNT)
    yield beam.pvalue.TaggedOutput("total", float(counts.sum()))
    if examples is not None:
        yield bucket, counts


def _finish(element, counts: Dict[int, pd.Series], total: float, split: Dict[str, int],
            features: FeatureSpec, train_days: Optional[float], records_dir: Optional[str]):
    """Item bucket: candidate columns and candidate_prob, then records by period.

    Records go out as elements (for the runner's sharded write), or, with `records_dir`,
    into one TFRecord file per period and bucket there (the disk shuffle's write).
    """
    bucket, grouped = element
    if bucket not in counts:
        return
    catalog, examples = _concat(grouped["catalog"]), _concat(grouped["examples"])
    examples = with_items(examples, catalog, counts[bucket] / total, features)
    ts = examples["ts"].to_numpy()
    period = TimeSplit(**split).assign_period(ts)
    if train_days is not None:
        old = (period == "train") & (ts < split["t_val"] - train_days * DAY)
        examples, period = examples[~old], period[~old]
        yield beam.pvalue.TaggedOutput("stats", (("examples", "before train_days"),
                                                 int(old.sum())))
    for name in PERIODS:
        records = serialize_examples(examples[period == name], features.example_columns)
        if records_dir is None:
            for record in records:
                yield beam.pvalue.TaggedOutput(name, record)
        elif records:
            _write_records(os.path.join(records_dir, name, f"bucket-{bucket:05d}.tfrecord"),
                           records)
            yield beam.pvalue.TaggedOutput("stats", (("count", name), len(records)))
    train = examples[period == "train"]
    for column, kind in (("user_id", "users"), ("item_id", "items")):
        for value, count in train[column].value_counts().items():
            yield beam.pvalue.TaggedOutput("vocab", ((kind, value), int(count)))


def _write_records(path: str, records: List[bytes]) -> None:
    """One bucket's records, renamed into place: a retried bucket rewrites the same file."""
    tmp = path + ".tmp"
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
            writer.write(record)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _reasons(bad: pd.DataFrame) -> Iterator[Tuple[Tuple[str, str], Tuple[int, List[str]]]]:
    for (table, reason), group in bad.groupby(["table", "reason"], sort=True):
        yield (table, reason), (len(group), sorted(group["row"])[:EXAMPLES_PER_REASON])


def _merge_reasons(values: Iterable[Tuple[int, List[str]]]) -> Tuple[int, List[str]]:
    count, examples = 0, []
    for n, rows in values:
        count += n
        examples = sorted(examples + list(rows))[:EXAMPLES_PER_REASON]
    return count, examples


def _write_one(pcoll, path: str, label: str):
    return pcoll | label >> beam.io.WriteToText(path, num_shards=1, shard_name_template="")


def build_pipeline(p: beam.Pipeline, data_dir: str, staging: str, history_length: int,
                   val_fraction: float, test_fraction: float, num_shards: int,
                   features: FeatureSpec, train_days: Optional[float], min_count: int,
                   buckets: int, dead_letter: Optional[str], spill: Optional[str] = None
                   ) -> None:
    """Adds the preparation to a pipeline; outputs go to `staging` (see `run_beam`).

    Args:
      spill: group through files in this folder (`group_on_disk`), not the runner's
        shuffle; the records then land there per bucket for `concat_shards`.
    """
    good, bad, stats = {}, [], []

    def group(label: str, inputs: Dict[str, Tuple[beam.PCollection, ...]]):
        """CoGroupByKey by bucket: read(label) -> (bucket, {name: [frames]})."""
        if spill is not None:
            return group_on_disk(inputs, FileSystems.join(spill, label.replace(" ", "_")),
                                 buckets, label)
        flat = {name: pcolls[0] if len(pcolls) == 1 else
                pcolls | f"{label}: flatten {name}" >> beam.Flatten()
                for name, pcolls in inputs.items()}
        grouped = flat | label >> beam.CoGroupByKey()
        return lambda _: grouped

    for table in TABLES:
        ext, files = beam_table_files(data_dir, table)
        check_readable(table, ext, files)
        if ext == ".parquet":
            pattern = files[0] if len(files) == 1 else FileSystems.join(data_dir, table,
                                                                        "*.parquet")
            raw = (p | f"read {table}" >> beam.io.ReadFromParquetBatched(pattern)
                   | f"to pandas {table}" >> beam.Map(lambda t: t.to_pandas()))
        else:
            raw = (p | f"files {table}" >> beam.Create(files)
                   | f"read {table}" >> beam.FlatMap(_csv_batches))
        if spill is None:
            # Reshuffle breaks fusion with the (splittable) read: the DirectRunner's
            # multi_processing mode lost 1-10% of the rows of a 1M-row table flattened
            # into a join straight from a split read (Beam 2.77); run_beam's row balance
            # catches it. (On disk the read streams into files, and a Reshuffle would
            # hold the whole table in the driver.)
            raw = raw | f"unfuse {table}" >> beam.Reshuffle()
        checked = raw | f"check {table}" >> beam.ParDo(_CheckRows(table)).with_outputs(
            "bad", "stats", main="good")
        good[table] = checked.good
        bad.append(checked.bad)
        stats.append(checked.stats)

    users_by_bucket = good["users"] | "users by bucket" >> beam.FlatMap(_by_bucket, "user_id",
                                                                         buckets)
    users = (group("group users", {"users": (users_by_bucket,)})("read users")
             | "unique users" >> beam.FlatMap(_users_unique).with_outputs("bad", main="stats"))
    stats.append(users.stats)
    bad.append(users.bad)

    def _keyed(frame: pd.DataFrame, searches: bool):
        has_item = frame["item_id"] != ""
        if searches:
            if (~has_item).any():
                yield frame[~has_item]
        else:
            yield from _by_bucket(frame[has_item], "item_id", buckets)

    known = (group("join catalog and events", {
                 "catalog": (good["catalog"] | "catalog by item" >> beam.FlatMap(
                     _by_bucket, "item_id", buckets),),
                 "events": (good["events"] | "events by item" >> beam.FlatMap(_keyed, False),)
             })("read items")
             | "known items" >> beam.FlatMap(_items_known).with_outputs(
                 "catalog", "bad", "stats", main="events"))
    stats.append(known.stats)
    bad.append(known.bad)
    searches = good["events"] | "search events" >> beam.FlatMap(_keyed, True)
    events_by_user = tuple(
        events | f"{name} by user" >> beam.FlatMap(_by_bucket, "user_id", buckets)
        for name, events in (("events", known.events), ("searches", searches)))
    per_user = (group("group by user", {"events": events_by_user})("read users' events")
                | "user examples" >> beam.FlatMap(_user_examples, history_length,
                                                  buckets).with_outputs(
                    "stats", "ts", main="examples"))
    stats.append(per_user.stats)

    def _split(spans: Iterable[Tuple[int, int]]) -> Dict[str, int]:
        spans = list(spans)
        if not spans:
            raise SchemaError("no valid events: nothing to split")
        ts = [min(a for a, _ in spans), max(b for _, b in spans)]
        return time_split(pd.DataFrame({"ts": ts}), val_fraction, test_fraction).to_dict()

    split = per_user.ts | "time split" >> beam.combiners.ToList() | "split" >> beam.Map(_split)
    split_side = beam.pvalue.AsSingleton(split)
    by_item = group("join catalog and examples",
                    {"catalog": (known.catalog,), "examples": (per_user.examples,)})
    counted = (by_item("read for counts")
               | "count train positives" >> beam.FlatMap(_count_train, split_side)
               .with_outputs("total", main="counts"))
    total = counted.total | "total" >> beam.CombineGlobally(sum)
    records_dir = None if spill is None else FileSystems.join(spill, RECORDS)
    records = by_item("read for records") | "examples" >> beam.FlatMap(
        _finish, beam.pvalue.AsDict(counted.counts), beam.pvalue.AsSingleton(total),
        split_side, features, train_days, records_dir
    ).with_outputs(*PERIODS, "vocab", "stats")
    stats.append(records.stats)
    for name in PERIODS if spill is None else ():
        records[name] | f"write {name}" >> beam.io.WriteToTFRecord(
            os.path.join(staging, name), file_name_suffix=".tfrecord", num_shards=num_shards,
            shard_name_template="-SSSSS-of-NNNNN")
        stats.append(records[name] | f"count {name}" >> beam.combiners.Count.Globally()
                     | f"key {name}" >> beam.Map(lambda n, name=name: (("count", name), n)))

    vocab = records.vocab | "vocab counts" >> beam.CombinePerKey(sum)
    for kind in ("users", "items"):
        lines = (vocab | f"{kind} only" >> beam.Filter(lambda kv, kind=kind: kv[0][0] == kind)
                 | f"{kind} list" >> beam.combiners.ToList()
                 | f"{kind} lines" >> beam.FlatMap(
                     lambda kvs: vocab_lines([(k[1], n) for k, n in kvs], min_count)))
        _write_one(lines, os.path.join(staging, "vocab", f"{kind}.jsonl"), f"write {kind}")

    bad_rows = bad | "all bad rows" >> beam.Flatten()
    if dead_letter:
        _write_one(bad_rows | "dead letter lines" >> beam.FlatMap(dead_letter_lines),
                   os.path.join(staging, "dead_letter.jsonl"), "write dead letter")
    reasons = (bad_rows | "reasons" >> beam.FlatMap(_reasons)
               | "merge reasons" >> beam.CombinePerKey(_merge_reasons)
               | "key reasons" >> beam.Map(lambda kv: (("reason",) + kv[0], kv[1])))
    summed = (stats | "all stats" >> beam.Flatten() | "sum stats" >> beam.CombinePerKey(sum))
    split_stat = split | "key split" >> beam.Map(lambda s: (("split",), s))
    summary = ((summed, reasons, split_stat) | "summary" >> beam.Flatten()
               | "summary list" >> beam.combiners.ToList()
               | "summary json" >> beam.Map(lambda kvs: json.dumps(
                   [[list(k), v] for k, v in kvs], ensure_ascii=False)))
    _write_one(summary, os.path.join(staging, STATS_FILE), "write summary")


def run_beam(data_dir: str, staging: str, history_length: int, val_fraction: float,
             test_fraction: float, num_shards: int, features: FeatureSpec,
             train_days: Optional[float], min_count: int, buckets: int,
             dead_letter: Optional[str], beam_args: Sequence[str], shuffle: str = "auto"
             ) -> Dict[str, Any]:
    """Runs the pipeline to completion and returns its summary.

    Args:
      beam_args: pipeline options as on a command line, e.g. ["--runner=FlinkRunner",
        "--flink_master=host:8081"]; the DirectRunner by default.
      shuffle: "runner" (the runner groups), "disk" (`group_on_disk` under the staging
        folder: bounded memory on a local runner) or "auto" (disk on local runners).

    Returns:
      {"rows": {table: n}, "good": {table: n}, "counts": {period: n},
       "reasons": {table: {reason: (count, examples)}}, "split": TimeSplit dict,
       "examples": {"built": n, "before train_days": n}}.

    Raises:
      RuntimeError: rows or examples do not balance (`check_balance`).
    """
    args = list(beam_args)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # -v keeps Beam's own logs
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
            args.append("--default_sdk_harness_log_level=WARNING")  # worker processes
    options = PipelineOptions(args)
    spill = (FileSystems.join(staging, "spill")
             if resolve_shuffle(shuffle, options) == "disk" else None)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, data_dir, staging, history_length, val_fraction, test_fraction,
                       num_shards, features, train_days, min_count, buckets, dead_letter,
                       spill)
    if spill is not None:
        for name in PERIODS:
            found = FileSystems.match([FileSystems.join(spill, RECORDS, name, "*.tfrecord")])
            concat_shards(sorted(m.path for m in found[0].metadata_list),
                          FileSystems.join(staging, name), num_shards)
        FileSystems.delete([spill])
    with FileSystems.open(FileSystems.join(staging, STATS_FILE)) as f:
        entries = json.loads(f.read().decode())
    out: Dict[str, Any] = {"rows": {}, "good": {}, "counts": {name: 0 for name in PERIODS},
                           "reasons": {}, "examples": {}}
    for key, value in entries:
        if key[0] == "split":
            out["split"] = value
        elif key[0] == "reason":
            out["reasons"].setdefault(key[1], {})[key[2]] = value
        elif key[0] == "count":
            out["counts"][key[1]] = int(value)
        else:
            out[key[0]][key[1]] = int(value)
    check_balance(out)
    return out


def resolve_shuffle(shuffle: str, options: PipelineOptions) -> str:
    """"runner" or "disk" for the pipeline's runner ("auto": disk on a local runner).

    Raises:
      ValueError: an unknown shuffle, or "disk" on a distributed runner (its workers
        cannot share the local staging folder, and their own shuffle spills already).
    """
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; expected one of {SHUFFLES}")
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    local = name.split(".")[-1].lower() in {r.lower() for r in LOCAL_RUNNERS} | {"direct"}
    if shuffle == "auto":
        return "disk" if local else "runner"
    if shuffle == "disk" and not local:
        raise ValueError(f"--shuffle disk is for local runners {LOCAL_RUNNERS}; {name} "
                         f"shuffles on its own (use --shuffle runner or auto)")
    return shuffle


def check_balance(summary: Dict[str, Any]) -> None:
    """Every row read must end up used or set aside; anything else is lost data.

    Raises:
      RuntimeError: naming the table and the rows unaccounted for (nothing is written).
    """
    for table in TABLES:
        read = summary["rows"].get(table, 0)
        bad = sum(v[0] for v in summary["reasons"].get(table, {}).values())
        good = summary["good"].get(table, 0)
        if good + bad != read:
            raise RuntimeError(
                f"the Beam pipeline read {read} {table} rows but accounted for {good + bad} "
                f"({good} used, {bad} set aside): {read - good - bad} rows were lost by the "
                f"runner; no records were written. Run again (another runner, or "
                f"--direct_running_mode=in_memory on the DirectRunner)")
    built = summary["examples"].get("built", 0)
    kept = sum(summary["counts"].values()) + summary["examples"].get("before train_days", 0)
    if built != kept:
        raise RuntimeError(f"the Beam pipeline built {built} examples but wrote {kept}: "
                           f"{built - kept} were lost by the runner; no records were written")
