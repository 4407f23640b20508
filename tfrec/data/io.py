"""Reading and writing the raw tables (Parquet or CSV) with validation.

Tables are written atomically (temp file + rename) so a crash never leaves a
half-written table that a later run would read as valid data.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

import pandas as pd

from tfrec.data.schema import SCHEMAS, SchemaError, validate_references, validate_table

TABLE_FORMATS = (".parquet", ".csv")


@dataclass(frozen=True)
class Tables:
    """The three validated tables of a data directory."""

    catalog: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Calls `write(tmp_path)` then renames the temp file over `path`.

    The temp file lives in the destination directory so `os.replace` is a same
    filesystem rename, which is atomic: readers see the old file or the new one.

    Args:
      path: final file path; parent directories are created.
      write: callable writing the whole file to the path it is given.

    Returns:
      `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_table(df: pd.DataFrame, path: str) -> str:
    """Writes a table as Parquet (`.parquet`) or CSV (`.csv`), atomically.

    Args:
      df: the table; its index is not written.
      path: destination; the extension picks the format.

    Returns:
      `path`.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    if ext == ".csv":
        return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    raise ValueError(f"cannot write {path!r}: unsupported extension {ext!r}; "
                     f"use one of {TABLE_FORMATS}")


def read_table(path: str, table: str) -> pd.DataFrame:
    """Reads a Parquet or CSV table and validates it against its schema.

    CSV columns are read as text and converted by `validate_table`, so ids such
    as "007" keep their leading zeros instead of being guessed as numbers.

    Args:
      path: a `.parquet` or `.csv` file.
      table: "catalog", "users" or "events".

    Raises:
      FileNotFoundError: the file does not exist.
      SchemaError: the file cannot be parsed or does not match the schema.
    """
    if table not in SCHEMAS:
        raise SchemaError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{table} file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise SchemaError(f"cannot read {table} file {path!r}: unsupported extension "
                          f"{ext!r}; use one of {TABLE_FORMATS}")
    if os.path.getsize(path) == 0:
        raise SchemaError(f"could not read {table} file {path!r}: the file is empty")
    try:
        if ext == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pyarrow/pandas raise many types for corrupt input
        kind = "Parquet" if ext == ".parquet" else "CSV"
        raise SchemaError(f"could not read {table} file {path!r}: not a valid {kind} "
                          f"file ({type(e).__name__}: {e})") from e
    try:
        return validate_table(df, table)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from e


def find_table(data_dir: str, table: str) -> Optional[str]:
    """Returns `<data_dir>/<table>.parquet` or `.csv` if present (Parquet first)."""
    for ext in TABLE_FORMATS:
        path = os.path.join(data_dir, table + ext)
        if os.path.isfile(path):
            return path
    return None


def load_tables(data_dir: str, strict: bool = True) -> Tables:
    """Loads and validates catalog, users and events from a data directory.

    Args:
      data_dir: directory holding `<name>.parquet` or `<name>.csv` per table.
      strict: events referencing items missing from the catalog raise (True) or
        are dropped with a warning (False).

    Raises:
      FileNotFoundError: the directory or one of the tables is missing.
      SchemaError: a table is unreadable or invalid.
    """
    hint = "run `tfrec generate` to create a synthetic world there"
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist; {hint}")
    tables = {}
    for name in ("catalog", "users", "events"):
        path = find_table(data_dir, name)
        if path is None and name == "events" and os.path.isdir(os.path.join(data_dir, name)):
            # A streamed world (events/part-*.parquet) is too large to load whole.
            raise FileNotFoundError(
                f"data directory {data_dir!r} holds a streamed world (events in "
                f"events/part-*.parquet, from `tfrec generate --stream`); this reads one "
                f"events.parquet or events.csv: generate a smaller world without --stream")
        if path is None:
            raise FileNotFoundError(
                f"no {name} table in data directory {data_dir!r} (expected {name}.parquet "
                f"or {name}.csv); {hint}, or add the file")
        tables[name] = read_table(path, name)
    events = validate_references(tables["catalog"], tables["events"], strict=strict)
    return Tables(catalog=tables["catalog"], users=tables["users"], events=events)
