"""Grouping by bucket through files on disk, for Beam's local runners.

The DirectRunner keeps every GroupByKey in the driver's memory, so a pipeline that
groups 100M events needs the memory of 100M events. Distributed runners spill their
shuffles to disk; this module gives the local runner the same bound: (bucket, frame)
elements are appended to per-bucket part files, and a later stage reads one bucket at a
time once every part is written. Memory then holds one bucket (plus a write buffer).

Import needs the `beam` extra (`pip install 'tfrec[beam]'`).
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import apache_beam as beam
import pandas as pd
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner",
                 "PrismRunner")
FLUSH_ROWS = 200_000  # rows buffered per writer before its part files are written


def bucket_dir(root: str, bucket: int) -> str:
    """Folder of one bucket's part files."""
    return FileSystems.join(root, f"bucket-{bucket:05d}")


class SpillWriter(beam.DoFn):
    """(bucket, frame) -> part files `<root>/bucket-XXXXX/<name>-<uuid>.pkl`; emits rows written.

    Buffers up to `flush_rows` rows so a bucket's data lands in a few files, not one per
    element. Part names are unique, so parallel workers never write the same file.
    """

    def __init__(self, root: str, name: str, flush_rows: int = FLUSH_ROWS):
        self.root, self.name, self.flush_rows = root, name, flush_rows

    def start_bundle(self):
        self._buffer: Dict[int, List[pd.DataFrame]] = defaultdict(list)
        self._rows = 0

    def process(self, element: Tuple[int, pd.DataFrame]):
        bucket, frame = element
        self._buffer[bucket].append(frame)
        self._rows += len(frame)
        if self._rows >= self.flush_rows:
            yield self._flush()

    def finish_bundle(self):
        if self._buffer:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> int:
        written = 0
        for bucket, frames in self._buffer.items():
            frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
            path = FileSystems.join(bucket_dir(self.root, bucket),
                                    f"{self.name}-{uuid.uuid4().hex}.pkl")
            _write_bytes(path, pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))
            written += len(frame)
        self._buffer, self._rows = defaultdict(list), 0
        return written


def _write_bytes(path: str, data: bytes) -> None:
    """Writes under a temporary name then renames: a reader never sees half a part."""
    tmp = path + ".tmp"
    with FileSystems.create(tmp, compression_type="uncompressed") as f:  # makes the folder
        f.write(data)
    FileSystems.rename([tmp], [path])


def read_bucket(bucket: int, root: str, names: Sequence[str], _written=None
                ) -> Iterator[Tuple[int, Dict[str, List[pd.DataFrame]]]]:
    """One bucket's frames by input name, in CoGroupByKey's form; nothing for an empty bucket.

    Args:
      _written: the writers' side input; only makes this stage wait for them.
    """
    # A glob, not exists(): object stores (gs://) have no folders to test for.
    found = FileSystems.match([FileSystems.join(bucket_dir(root, bucket), "*.pkl")]
                              )[0].metadata_list
    if not found:
        return
    grouped: Dict[str, List[pd.DataFrame]] = {name: [] for name in names}
    for path in sorted(m.path for m in found):
        name = os.path.basename(path).rsplit("-", 1)[0]
        with FileSystems.open(path, compression_type="uncompressed") as f:
            grouped[name].append(pickle.loads(f.read()))
    yield bucket, grouped


def group_on_disk(inputs: Dict[str, Sequence[beam.PCollection]], root: str, buckets: int,
                  label: str) -> Callable[[str], beam.PCollection]:
    """CoGroupByKey of (bucket, frame) collections through part files under `root`.

    Args:
      inputs: name -> the collections grouped under that name. Each is written by its
        own writer: a Flatten would make the local runner buffer them all in memory.

    Returns:
      read(label): a new PCollection of (bucket, {name: [frames]}) each call, so two
      consumers each stream the buckets instead of the runner holding them for both.
    """
    names = sorted(inputs)
    if any("-" in name for name in names):
        raise ValueError(f"input names must not contain '-': {names}")
    written = [pcoll | f"{label}: spill {name} {i}" >> beam.ParDo(SpillWriter(root, name))
               for name in names for i, pcoll in enumerate(inputs[name])]
    done = beam.pvalue.AsList(tuple(written) | f"{label}: spilled" >> beam.Flatten())
    pipeline = written[0].pipeline

    def read(read_label: str) -> beam.PCollection:
        return (pipeline | f"{read_label}: buckets" >> beam.Create(range(buckets))
                | f"{read_label}: read" >> beam.FlatMap(read_bucket, root, names, done))

    return read


def concat_shards(parts: Sequence[str], out_prefix: str, num_shards: int) -> List[str]:
    """Concatenates per-bucket TFRecord files into `<prefix>-XXXXX-of-NNNNN.tfrecord` shards.

    TFRecord framing is per record, so concatenated files are valid files. Part i goes
    to shard i % num_shards, streamed (no record is held in memory).
    """
    paths = []
    for shard in range(num_shards):
        path = f"{out_prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord"
        with FileSystems.create(path, compression_type="uncompressed") as out:
            for part in parts[shard::num_shards]:
                with FileSystems.open(part, compression_type="uncompressed") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        paths.append(path)
    return paths
