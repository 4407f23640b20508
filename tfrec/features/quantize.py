"""Embedding tables stored in int8 (per-row scale) or bfloat16 inside served models.

Catalog-sized tables (item ids, users, words, trigrams, catalog embeddings) are most of
a retrieval SavedModel; TF Serving holds them in memory. Stored at lower precision and
read back as float32 row by row, they cost a quarter (int8) or half (bfloat16) with core
TF ops only; the arithmetic after the read stays float32.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import EXPORT_PRECISIONS

PRECISIONS = EXPORT_PRECISIONS
# Tables with fewer rows stay float32: they weigh nothing and int8 rounding would show
# in every request (hours, devices, price buckets).
MIN_ROWS = 1024

_TABLES: contextvars.ContextVar = contextvars.ContextVar("tfrec_quantized_tables",
                                                          default=None)


def check_precision(precision: str) -> str:
    """Returns `precision`.

    Raises:
      ValueError: not one of PRECISIONS.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose among {PRECISIONS}")
    return precision


class QuantizedTable(tf.Module):
    """A [N, D] float table kept as int8 with a float32 scale per row, or as bfloat16.

    Per-row symmetric int8: each row's largest magnitude maps to 127, so rows of very
    different norms (frequent vs rare ids) keep their own resolution.

    Args:
      values: the float table.
      precision: "int8" or "bfloat16".
      name: module name (variables are saved under it).

    Raises:
      ValueError: another precision, or a table that is not 2-D.
    """

    def __init__(self, values: np.ndarray, precision: str, name: Optional[str] = None):
        super().__init__(name=name)
        values = np.asarray(values, np.float32)
        if values.ndim != 2:
            raise ValueError(f"a quantized table must be [rows, dim], got shape {values.shape}")
        if precision == "int8":
            scale = np.abs(values).max(axis=1) / 127.0
            scale[scale == 0] = 1.0
            codes = np.clip(np.rint(values / scale[:, None]), -127, 127).astype(np.int8)
            self.values = tf.Variable(codes, trainable=False, name="values")
            self.scale = tf.Variable(scale.astype(np.float32), trainable=False, name="scale")
        elif precision == "bfloat16":
            self.values = tf.Variable(tf.cast(values, tf.bfloat16), trainable=False,
                                      name="values")
            self.scale = None
        else:
            raise ValueError(f"QuantizedTable stores 'int8' or 'bfloat16', got {precision!r}")
        self.precision = precision

    @property
    def shape(self) -> tf.TensorShape:
        return self.values.shape

    def gather(self, ids: tf.Tensor) -> tf.Tensor:
        """Rows `ids` (any shape) as float32 [..., D]."""
        # From whole reads, not the variables: `scores` reads them whole (catalog_rows).
        rows = tf.cast(tf.gather(self.values.value(), ids), tf.float32)
        if self.scale is None:
            return rows
        return rows * tf.expand_dims(tf.gather(self.scale.value(), ids), -1)

    def scores(self, queries: tf.Tensor) -> tf.Tensor:
        """queries [B, D] @ table^T -> [B, N] float32 (scale applied per column).

        bfloat16 multiplies in bfloat16 (queries rounded to it): a float32 copy of the
        table per call costs ~4x the float32 matmul (41k x 384, batch 1), a bfloat16
        matmul ~0.65x on CPUs with native bfloat16. int8 has no fast matmul in core TF.
        """
        if self.scale is None:
            return tf.cast(tf.matmul(tf.cast(queries, tf.bfloat16), self.values,
                                     transpose_b=True), tf.float32)
        scores = tf.matmul(tf.cast(queries, tf.float32), tf.cast(self.values, tf.float32),
                           transpose_b=True)
        return scores * self.scale[tf.newaxis, :]

    def nbytes(self) -> int:
        n, d = self.values.shape
        return int(n * d * self.values.dtype.size + (n * 4 if self.scale is not None else 0))


def table_key(table) -> int:
    """Identity of a float table variable (the key `quantized_tables` maps from)."""
    return id(table)


@contextlib.contextmanager
def quantized_tables(tables: Dict[int, QuantizedTable]) -> Iterator[None]:
    """Graphs traced inside read the given tables (float variable id -> QuantizedTable)
    through their quantized copies (`lookup_table`)."""
    token = _TABLES.set(dict(tables))
    try:
        yield
    finally:
        _TABLES.reset(token)


def lookup_table(table):
    """The quantized copy of `table` inside `quantized_tables`, else `table` itself."""
    tables = _TABLES.get()
    if tables:
        return tables.get(table_key(table), table)
    return table


def quantize_embeddings(models: Sequence[tf.keras.layers.Layer], precision: str,
                        keep: Sequence[tf.Module] = ()) -> Dict[int, QuantizedTable]:
    """Quantized copies of the Embedding tables of `models` with >= MIN_ROWS rows,
    keyed by `table_key` of the float variable (shared layers once).

    Args:
      keep: sub-modules whose tables stay float32 (layers that read their tables
        without `lookup_table`, e.g. a BERT encoder).
    """
    kept = {id(layer) for module in keep for layer in (module, *module.submodules)}
    out: Dict[int, QuantizedTable] = {}
    for model in models:
        for layer in model.submodules:
            if (not isinstance(layer, tf.keras.layers.Embedding) or not layer.built
                    or id(layer) in kept):
                continue
            table = layer.embeddings
            if table.shape[0] >= MIN_ROWS and table_key(table) not in out:
                out[table_key(table)] = QuantizedTable(table.numpy(), precision,
                                                       name=f"{layer.name}_{precision}")
    return out


def track_quantized(module: tf.Module, models: Dict[str, tf.keras.layers.Layer],
                    precision: str, keep: Sequence[tf.Module] = ()
                    ) -> Dict[int, QuantizedTable]:
    """Makes `models` attributes of `module`, so a SavedModel of it stores them with
    their large tables quantized instead of float32.

    At float32 the models are ordinary tracked attributes. Otherwise they are set
    untracked, and the module tracks what their graphs read instead: the quantized
    tables, every other variable, the lookup layers' hash tables and the `keep`
    modules whole. Graphs must be traced inside `quantized_tables(<returned dict>)`.

    Returns:
      The quantized tables keyed by `table_key` ({} at float32).
    """
    check_precision(precision)
    if precision == "float32":
        for name, model in models.items():
            setattr(module, name, model)
        return {}
    tables = quantize_embeddings(list(models.values()), precision, keep)
    for name, model in models.items():
        object.__setattr__(module, name, model)  # bypasses tf.Module's tracking
    module.quantized_tables = list(tables.values())
    variables = {table_key(v): v for model in models.values() for v in model.variables}
    module.model_variables = [v for key, v in variables.items() if key not in tables]
    # Hash tables (resources, not variables) the graphs read: lookup layers' and any
    # other layer's own (e.g. a speller's).
    layers = [layer for model in models.values() for layer in model.submodules]
    module.lookups = [layer for layer in layers
                      if isinstance(layer, tf.keras.layers.StringLookup)]
    module.resources = [value for layer in layers for value in vars(layer).values()
                        if isinstance(value, tf.saved_model.experimental.TrackableResource)]
    module.kept_modules = list(keep)
    return tables


def table_scores(table, queries: tf.Tensor) -> tf.Tensor:
    """queries [B, D] against every row of a float table variable or a QuantizedTable
    (its quantized copy inside `quantized_tables`), [B, N] float32."""
    table = lookup_table(table)
    if isinstance(table, QuantizedTable):
        return table.scores(queries)
    return tf.matmul(queries, table, transpose_b=True)


def catalog_rows(table, ids: tf.Tensor) -> tf.Tensor:
    """Rows `ids` of a serving-time catalog table (float variable or QuantizedTable;
    its quantized copy inside `quantized_tables`) that is also read whole, e.g. by an
    exact top-k matmul.

    A gather on the variable itself (ResourceGather) puts it in copy-on-read mode for
    good, after which every whole read copies the table (~45 ms per call for 41k x 384
    floats); gathering from one read of it keeps whole reads free. Not for trained
    tables: their sparse updates would make that read copy on every step.
    """
    table = lookup_table(table)
    if isinstance(table, QuantizedTable):
        return table.gather(ids)
    return tf.gather(tf.convert_to_tensor(table), ids)  # a variable: one whole read


def dense_reads(variable: tf.Variable) -> None:
    """Ends copy-on-read mode of a variable filled by sparse writes (scatter_update),
    so whole reads stop copying it (see `catalog_rows`); each replica's copy."""
    for part in getattr(variable, "values", (variable,)):
        tf.raw_ops.DisableCopyOnRead(resource=part.handle)


def gather_rows(table, ids: tf.Tensor) -> tf.Tensor:
    """Rows `ids` of a float table variable or a QuantizedTable."""
    if isinstance(table, QuantizedTable):
        return table.gather(ids)
    return tf.nn.embedding_lookup(table, ids)  # also reads sharded (PS) tables by row
