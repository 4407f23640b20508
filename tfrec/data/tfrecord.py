"""Retrieval examples as sharded TFRecord files and the tf.data pipeline over them.

TFRecords stream from disk (or GCS) in parallel without holding the table in
memory, and several shards let tf.distribute split input by file across workers.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional

import pandas as pd
import tensorflow as tf

from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.io import atomic_write
from tfrec.data.packing import ColumnPacker

def shard_name(prefix: str, index: int, num_shards: int) -> str:
    """File name of one shard, e.g. "train-00001-of-00004.tfrecord"."""
    return f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord"


def _bytes(values) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


# Column dtype (FeatureSpec.example_columns) -> one value's tf.train.Feature.
_FEATURE_OF = {
    "string": lambda v: _bytes([v.encode()]),
    "string_list": lambda v: _bytes([x.encode() for x in v]),
    "int": lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[v])),
    "float": lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=[v])),
}


def serialize_examples(df: pd.DataFrame, columns: Mapping[str, str]) -> List[bytes]:
    """tf.train.Example bytes of each row (columns in `columns` order, as written).

    Both preparation engines serialize through here, so their records are byte-equal
    (map keys sorted: protobuf map order otherwise differs between processes).

    Args:
      df: examples (`build_retrieval_examples` columns).
      columns: FeatureSpec.example_columns (name -> "string", "string_list", "int", "float").
    """
    # Row by row: protos of a whole table held at once would cost ~10 KB per example.
    names = list(columns)
    makers = [_FEATURE_OF[columns[c]] for c in names]
    records = []
    for row in zip(*(df[c].tolist() for c in names)):
        feature = {name: make(value) for name, make, value in zip(names, makers, row)}
        records.append(tf.train.Example(features=tf.train.Features(feature=feature))
                       .SerializeToString(deterministic=True))
    return records


def write_tfrecords(examples_df: pd.DataFrame, out_dir: str, prefix: str,
                    num_shards: int = 4, features: Optional[FeatureSpec] = None) -> List[str]:
    """Writes examples as `<prefix>-XXXXX-of-NNNNN.tfrecord` tf.train.Example shards.

    Rows go round-robin to shards so each shard spans the whole time range. Each
    shard is written under a temp name then renamed, and stale shards of the same
    prefix (e.g. from a run with more shards) are removed, so a glob never mixes
    two preparations.

    Args:
      examples_df: output of `build_retrieval_examples` (history as lists).
      out_dir: destination directory (created).
      prefix: split name, e.g. "train".
      num_shards: number of files; shards may be empty for tiny tables.
      features: the feature specification (columns and types); built-ins if None.

    Returns:
      The shard paths, in order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    columns = (features or default_spec()).example_columns
    missing = [c for c in columns if c not in examples_df.columns]
    if missing:
        raise ValueError(f"examples are missing column(s) {missing}; build them with "
                         f"build_retrieval_examples")
    os.makedirs(out_dir, exist_ok=True)
    records = serialize_examples(examples_df, columns)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(out_dir, shard_name(prefix, shard, num_shards))

        def write(tmp: str, shard: int = shard) -> None:
            with tf.io.TFRecordWriter(tmp) as writer:
                for record in records[shard::num_shards]:
                    writer.write(record)

        paths.append(atomic_write(path, write))
    remove_stale_shards(out_dir, prefix, keep=paths)
    return paths


def remove_stale_shards(out_dir: str, prefix: str, keep: List[str]) -> None:
    """Deletes `<prefix>-XXXXX-of-NNNNN.tfrecord` shards not in `keep` (an older layout)."""
    stale = re.compile(re.escape(prefix) + r"-\d{5}-of-\d{5}\.tfrecord$")
    for old in tf.io.gfile.glob(os.path.join(out_dir, f"{prefix}-*")):
        if stale.search(os.path.basename(old)) and old not in keep:
            tf.io.gfile.remove(old)


def parse_batch(serialized: tf.Tensor, history_length: int,
                features: Optional[FeatureSpec] = None) -> Dict[str, tf.Tensor]:
    """Parses a batch of serialized examples; sequences -> [B, history_length] "" padded."""
    features = features or default_spec()
    parsed = tf.io.parse_example(serialized, features.parse_spec())
    for f in features.features:
        if f.kind == "sequence":
            parsed[f.name] = parsed[f.name].to_tensor(default_value=f.default,
                                                      shape=[None, history_length])
    return parsed


def make_dataset(file_pattern: str, batch_size: int, history_length: int,
                 shuffle: bool = True, seed: Optional[int] = None,
                 deterministic: bool = False, repeat: bool = False, cache: bool = False,
                 drop_remainder: bool = False, shuffle_buffer: int = 10000,
                 features: Optional[FeatureSpec] = None,
                 preprocess: Optional[Callable[[Dict[str, tf.Tensor]], Any]] = None
                 ) -> tf.data.Dataset:
    """Batched dict dataset of retrieval examples from TFRecord shards.

    Parsing runs once per batch (vectorised), and files are read in parallel; set
    `deterministic=True` (with a seed) for reproducible order at some speed cost.

    Args:
      file_pattern: glob of shards, e.g. "<dir>/train-*.tfrecord".
      batch_size: examples per batch.
      history_length: history is padded/truncated to this length.
      shuffle: shuffle file order and records.
      seed: shuffle seed.
      deterministic: keep element order reproducible in parallel stages.
      repeat: repeat forever (use with steps_per_epoch).
      cache: keep examples in memory after the first pass: serialized records, or with
        `preprocess` the preprocessed integer tensors (later epochs then skip parsing
        and every string op; examples are still reshuffled and re-batched each epoch).
      drop_remainder: drop the last partial batch (static batch size).
      shuffle_buffer: records held by the shuffle buffer.
      features: the feature specification the records were written with.
      preprocess: applied to each parsed batch in the parallel map (e.g.
        `TwoTowerModel.preprocess`: string work leaves the training step).

    Returns:
      Dataset of dicts, one [B] tensor per feature of the specification (history
      [B, history_length]) plus weight, candidate_prob (float32) and ts (int64); with
      `preprocess`, what it returns.
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise ValueError(f"no TFRecord files match {file_pattern!r}; prepare the data first "
                         f"(tfrec.data.prepare.prepare_dataset, run by `tfrec train`)")
    if batch_size < 1 or history_length < 1:
        raise ValueError(f"batch_size and history_length must be >= 1, got {batch_size} and "
                         f"{history_length}")
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

    def parse(serialized: tf.Tensor):
        batch = parse_batch(serialized, history_length, features)
        return preprocess(batch) if preprocess is not None else batch

    # With a cache and `preprocess`, examples are parsed and preprocessed (in batches)
    # before the cache, packed into one row per dtype (tf.data pays per component for
    # every example it shuffles and batches), kept singly without the -1 padding of
    # their variable-length columns, re-batched (re-padded) and unpacked every epoch;
    # otherwise records are batched, then parsed.
    early = cache and preprocess is not None
    if early:
        ds = ds.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                      deterministic=deterministic)
        packer = ColumnPacker(ds.element_spec)
        ds = ds.map(packer.pack, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=deterministic)
        _check_padded(ds.element_spec, packer.variable_keys)
        # Slices are copied out of each batch (flat_map), not moved: `unbatch()` moves
        # them and crashed (SIGSEGV in MaybeMoveSliceToElement) on the Chinese world.
        ds = ds.flat_map(tf.data.Dataset.from_tensor_slices).map(
            functools.partial(_strip_padding, keys=packer.variable_keys),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if early:
        ds = ds.padded_batch(batch_size, padding_values=_padding_values(
            ds.element_spec, packer.variable_keys), drop_remainder=drop_remainder)
        ds = ds.map(packer.unpack, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=deterministic)
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options)


# Variable-length preprocessed inputs (TextEncoder trigram buckets) pad with -1.
PAD_INDEX = -1


def _check_padded(spec: Dict[str, tf.TensorSpec], keys: List[str]) -> None:
    """Variable-length preprocessed columns must be [B, n] integer ids padded with -1.

    Raises:
      ValueError: a variable-length column of another dtype or rank (its padding is
        unknown).
    """
    bad = [spec[k] for k in keys if not spec[k].dtype.is_integer or spec[k].shape.rank != 2]
    if bad:
        raise ValueError(f"make_dataset(cache=True, preprocess=...) re-pads variable-length "
                         f"columns with {PAD_INDEX}, so they must be [batch, n] integer ids; "
                         f"preprocess returned {bad}")


def _strip_padding(example: Dict[str, tf.Tensor], keys: List[str]) -> Dict[str, tf.Tensor]:
    """One packed example without the -1 padding its batch gave its variable columns."""
    return {k: (tf.boolean_mask(v, v != PAD_INDEX) if k in keys else v)
            for k, v in example.items()}


def _padding_values(spec: Dict[str, tf.TensorSpec], keys: List[str]) -> Dict[str, tf.Tensor]:
    """padded_batch values: -1 for the variable columns, a zero of its dtype elsewhere."""
    return {k: tf.constant("" if v.dtype == tf.string else PAD_INDEX if k in keys else 0,
                           v.dtype) for k, v in spec.items()}


def count_records(file_pattern: str) -> int:
    """Number of records in the files matching a pattern (reads them all)."""
    files = sorted(tf.io.gfile.glob(file_pattern))
    return int(sum(1 for f in files for _ in tf.data.TFRecordDataset(f)))

