"""Table schemas of the package: catalog, users and events.

Every loader (synthetic world, MovieLens, user CSVs) produces these tables, so the
rest of the package depends on column names here and nowhere else.
"""

from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import pandas as pd

# Column name -> logical type ("string", "int", "float").
CATALOG_SCHEMA: Dict[str, str] = {
    "item_id": "string",
    "title": "string",
    "description": "string",
    "category": "string",  # path, "department>leaf"
    "brand": "string",
    "price": "float",
    "created_ts": "int",  # unix seconds; items created late are cold-start items
}

USERS_SCHEMA: Dict[str, str] = {
    "user_id": "string",
    "signup_ts": "int",
}

EVENTS_SCHEMA: Dict[str, str] = {
    "ts": "int",  # unix seconds
    "user_id": "string",
    "session_id": "string",
    "event_type": "string",  # one of EVENT_TYPES
    "item_id": "string",  # "" for search events
    "query": "string",  # search text of the session, "" when browsing
    "device": "string",  # one of DEVICES (free text accepted)
    "position": "int",  # rank of the impression, -1 when not applicable
}

SCHEMAS: Dict[str, Dict[str, str]] = {
    "catalog": CATALOG_SCHEMA,
    "users": USERS_SCHEMA,
    "events": EVENTS_SCHEMA,
}

EVENT_TYPES = ("search", "impression", "click", "add_to_cart", "purchase")
# Interactions that count as positives for retrieval, weighted by funnel depth.
POSITIVE_EVENT_WEIGHTS: Dict[str, float] = {"click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
DEVICES = ("desktop", "mobile", "tablet", "app")

PAD = ""  # padding value of history sequences


class SchemaError(ValueError):
    """Raised when a table does not match its schema; the message names the problem."""


# Columns a loader may omit; they are filled with these values, so sources without
# sessions, search or devices (e.g. rating logs) still fit the schema.
OPTIONAL_COLUMNS: Dict[str, Dict[str, object]] = {
    "catalog": {"description": "", "category": "", "brand": "", "created_ts": 0},
    "users": {"signup_ts": 0},
    "events": {"session_id": "", "query": "", "device": "", "position": -1},
}

# String columns that must be non-empty in every row (events.item_id is special:
# empty only for search events).
REQUIRED_VALUES: Dict[str, tuple] = {
    "catalog": ("item_id", "title"),
    "users": ("user_id",),
    "events": ("user_id", "event_type", "item_id"),
}

_TYPE_NAMES = {"string": "a string", "int": "int", "float": "a number"}
_UNIX_SECONDS = ("ts", "created_ts", "signup_ts")


def validate_table(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Checks one raw table against its schema and returns it with canonical dtypes.

    Loaders are many and downstream code assumes exact columns and dtypes, so every
    table passes through here once: bad data fails early with a message naming the
    problem instead of as a cryptic error deep inside tf.data.

    Args:
      df: the raw table (from Parquet, CSV or a generator).
      table: "catalog", "users" or "events".

    Returns:
      A new DataFrame with the schema columns in schema order and a fresh RangeIndex:
      strings as object columns of Python `str` (missing -> ""), ints as int64, floats
      as float64. Other columns follow unchanged: a shop's own attributes, which the
      feature specification validates when a config declares them.

    Raises:
      SchemaError: naming the table, the column, and the first offending row.
    """
    if table not in SCHEMAS:
        raise SchemaError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    if not isinstance(df, pd.DataFrame):
        raise SchemaError(f"{table} table must be a pandas DataFrame, got {type(df).__name__}")
    schema = SCHEMAS[table]
    optional = OPTIONAL_COLUMNS[table]
    missing = [c for c in schema if c not in df.columns and c not in optional]
    if missing:
        raise SchemaError(
            f"{table} table is missing column(s) {missing}; expected columns "
            f"{list(schema)} (optional: {list(optional)})")
    if len(df) == 0:
        raise SchemaError(f"{table} table is empty")

    out = {}
    for column, kind in schema.items():
        if column not in df.columns:
            out[column] = _default_column(optional[column], kind, len(df))
            continue
        values = df[column].reset_index(drop=True)
        if kind == "string":
            out[column] = _as_string(values, table, column)
        elif kind == "int":
            out[column] = _as_int(values, table, column)
        else:
            out[column] = _as_float(values, table, column)
    for column in df.columns:
        if column not in schema:
            out[column] = df[column].reset_index(drop=True)
    result = pd.DataFrame(out)
    _check_values(result, table)
    return result


def validate_references(catalog: pd.DataFrame, events: pd.DataFrame,
                        strict: bool = True) -> pd.DataFrame:
    """Checks that every event item id exists in the catalog.

    Events about unknown items cannot become training examples (they have no
    title, price...), so they are an error by default; `strict=False` drops them
    with a warning, which suits logs that outlive catalog entries.

    Args:
      catalog: validated catalog table.
      events: validated events table.
      strict: raise (True) or drop the offending events and warn (False).

    Returns:
      The events, without the unknown-item rows when `strict=False`.
    """
    has_item = events["item_id"] != ""
    unknown = has_item & ~events["item_id"].isin(catalog["item_id"])
    count = int(unknown.sum())
    if count == 0:
        return events
    ids = pd.unique(events.loc[unknown, "item_id"])
    examples = ", ".join(repr(i) for i in ids[:5])
    message = (f"{count} events reference {len(ids)} item id(s) missing from the catalog "
               f"(e.g. {examples})")
    if strict:
        raise SchemaError(message + "; add them to the catalog or pass strict=False to "
                          "drop those events")
    warnings.warn(message + "; dropping those events", stacklevel=2)
    return events.loc[~unknown].reset_index(drop=True)


def _default_column(value: object, kind: str, n: int) -> np.ndarray:
    if kind == "string":
        return np.full(n, value, dtype=object)
    return np.full(n, value, dtype=np.int64 if kind == "int" else np.float64)


def _describe(table: str, column: str, kind: str) -> str:
    unit = " (unix seconds)" if column in _UNIX_SECONDS else ""
    return f"{table} column {column!r} must be {_TYPE_NAMES[kind]}{unit}"


def _as_string(values: pd.Series, table: str, column: str) -> pd.Series:
    # infer_dtype runs in C: the common all-str case costs no Python loop.
    inferred = pd.api.types.infer_dtype(values, skipna=True)
    if inferred in ("string", "empty"):
        return values.astype(object).where(values.notna(), "")
    if pd.api.types.is_bool_dtype(values.dtype) or inferred == "boolean":
        raise SchemaError(f"{_describe(table, column, 'string')}; got booleans")
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if (finite == np.round(finite)).all():  # ids read as floats: 12.0 -> "12"
            values = values.astype("Int64")
    if inferred in ("integer", "floating", "mixed-integer", "mixed-integer-float",
                    "decimal") or pd.api.types.is_numeric_dtype(values.dtype):
        return values.map(lambda v: "" if pd.isna(v) else str(v)).astype(object)
    bad = values.map(lambda v: not (isinstance(v, (str, int, np.integer)) or is_missing(v)))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SchemaError(f"{_describe(table, column, 'string')}; row {row} has "
                          f"{_show(values.iloc[row])} ({type(values.iloc[row]).__name__})")
    return values.map(lambda v: "" if is_missing(v) else str(v)).astype(object)


def _show(value: object) -> str:
    """repr of a cell without numpy wrappers: 1.5, not np.float64(1.5)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def is_missing(value: object) -> bool:
    """pd.isna for one cell; lists and arrays are values, not missing."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists/arrays are not scalars: not missing
        return False


def _as_numeric(values: pd.Series, table: str, column: str, kind: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values.dtype):
        raise SchemaError(f"{_describe(table, column, kind)}; got booleans")
    if pd.api.types.is_numeric_dtype(values.dtype):
        numeric = values.astype(np.float64) if kind == "float" else values
    else:
        text = values.map(lambda v: v.strip() if isinstance(v, str) else v)
        numeric = pd.to_numeric(text, errors="coerce")
        bad = numeric.isna() & text.notna() & (text != "")
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise SchemaError(f"{_describe(table, column, kind)}; row {row} has "
                              f"{_show(values.iloc[row])}")
    missing = numeric.isna()
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise SchemaError(f"{_describe(table, column, kind)}; row {row} is missing a value")
    return numeric


def _as_int(values: pd.Series, table: str, column: str) -> np.ndarray:
    numeric = _as_numeric(values, table, column, "int")
    if pd.api.types.is_integer_dtype(numeric.dtype):
        return numeric.to_numpy(dtype=np.int64)
    floats = numeric.to_numpy(dtype=np.float64)
    fractional = ~np.isfinite(floats) | (floats != np.round(floats))
    if fractional.any():
        row = int(np.flatnonzero(fractional)[0])
        raise SchemaError(f"{_describe(table, column, 'int')}; row {row} has {_show(floats[row])}")
    return floats.astype(np.int64)


def _as_float(values: pd.Series, table: str, column: str) -> np.ndarray:
    return _as_numeric(values, table, column, "float").to_numpy(dtype=np.float64)


def _first_row(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0])


def _check_values(df: pd.DataFrame, table: str) -> None:
    """Checks value constraints on a table that already has canonical dtypes."""
    for column in REQUIRED_VALUES[table]:
        empty = df[column] == ""
        if table == "events" and column == "item_id":
            empty &= df["event_type"] != "search"
            if empty.any():
                raise SchemaError(
                    f"events column 'item_id' is empty in {int(empty.sum())} row(s) "
                    f"(first: row {_first_row(empty)}); only 'search' events may have "
                    f"an empty item_id")
        elif empty.any():
            raise SchemaError(
                f"{table} column {column!r} is empty or missing in {int(empty.sum())} "
                f"row(s) (first: row {_first_row(empty)}); every row needs a {column}")

    if table == "catalog":
        price = df["price"]
        bad = ~np.isfinite(price) | (price < 0)
        if bad.any():
            row = _first_row(bad)
            raise SchemaError(f"catalog column 'price' must be a non-negative number; "
                              f"row {row} has {_show(price.iloc[row])}")
        duplicated = df["item_id"].duplicated()
        if duplicated.any():
            ids = pd.unique(df.loc[duplicated, "item_id"])
            raise SchemaError(
                f"catalog has {len(ids)} duplicate item_id value(s) (e.g. "
                f"{', '.join(repr(i) for i in ids[:5])}); item ids must be unique")
    elif table == "users":
        duplicated = df["user_id"].duplicated()
        if duplicated.any():
            ids = pd.unique(df.loc[duplicated, "user_id"])
            raise SchemaError(
                f"users table has {len(ids)} duplicate user_id value(s) (e.g. "
                f"{', '.join(repr(i) for i in ids[:5])}); user ids must be unique")
    elif table == "events":
        unknown = ~df["event_type"].isin(EVENT_TYPES)
        if unknown.any():
            names = sorted(pd.unique(df.loc[unknown, "event_type"]))
            raise SchemaError(
                f"events column 'event_type' has unknown value(s) {names[:10]} in "
                f"{int(unknown.sum())} row(s); allowed: {', '.join(EVENT_TYPES)}")
