"""Reading and writing the raw tables (Parquet or CSV) with validation.

Tables are written atomically (temp file + rename) so a crash never leaves a
half-written table that a later run would read as valid data.
"""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import pandas as pd

from tfrec.config import DataConfig
from tfrec.data.pseudonym import pseudonymize_table, users_key
from tfrec.data.rows import BadRowReport, check_rows, split_duplicates, split_unknown_items
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


def read_raw(path: str, table: str) -> pd.DataFrame:
    """Reads one Parquet or CSV file of a table as it is, without validation.

    CSV columns are read as text (converted later), so ids such as "007" keep their
    leading zeros instead of being guessed as numbers.

    Raises:
      FileNotFoundError: the file does not exist.
      SchemaError: the file cannot be parsed (corrupt, empty, unknown extension).
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
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pyarrow/pandas raise many types for corrupt input
        kind = "Parquet" if ext == ".parquet" else "CSV"
        raise SchemaError(f"could not read {table} file {path!r}: not a valid {kind} "
                          f"file ({type(e).__name__}: {e})") from e


def read_table(path: str, table: str) -> pd.DataFrame:
    """Reads a Parquet or CSV table and validates it against its schema.

    Args:
      path: a `.parquet` or `.csv` file.
      table: "catalog", "users" or "events".

    Raises:
      FileNotFoundError: the file does not exist.
      SchemaError: the file cannot be parsed or does not match the schema.
    """
    df = read_raw(path, table)
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


def table_files(data_dir: str, table: str) -> List[str]:
    """The files of one table: `<table>.parquet|.csv`, or the parts in a `<table>/` folder.

    A folder of parts (`events/part-00000.parquet`, ...) is what streaming writers and
    distributed jobs produce; its files are read in name order.

    Raises:
      FileNotFoundError: neither a file nor a non-empty folder of parts exists.
    """
    single = find_table(data_dir, table)
    if single is not None:
        return [single]
    folder = os.path.join(data_dir, table)
    if os.path.isdir(folder):
        for ext in TABLE_FORMATS:
            parts = sorted(glob.glob(os.path.join(glob.escape(folder), "*" + ext)))
            if parts:
                return parts
    raise FileNotFoundError(
        f"no {table} table in data directory {data_dir!r} (expected {table}.parquet or "
        f"{table}.csv, or a {table}/ folder of .parquet or .csv parts); run `tfrec generate` "
        f"to create a synthetic world there, or add the file")


def read_table_raw(data_dir: str, table: str, users_key: Optional[bytes] = None
                   ) -> pd.DataFrame:
    """All files of a table (`table_files`) concatenated, unvalidated.

    With `users_key`, user ids are pseudonymised here, before any check, so even
    error messages and set-aside rows carry pseudonyms (`tfrec.data.pseudonym`).
    """
    frames = [read_raw(path, table) for path in table_files(data_dir, table)]
    raw = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return pseudonymize_table(raw, table, users_key)


def clean_tables(data_dir: str, users_key: Optional[bytes] = None
                 ) -> Tuple[Tables, "BadRowReport", pd.DataFrame]:
    """Loads a data directory keeping the rows that pass every check, and the rest aside.

    The lenient twin of `load_tables`: row checks (`check_rows`), then duplicate ids,
    then events about items the good catalog lacks.

    Args:
      users_key: pseudonymise user ids with this key (None: raw ids).

    Returns:
      (tables, report, bad rows in `check_rows` format).

    Raises:
      FileNotFoundError, SchemaError: a table is missing, unreadable or lacks a column.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist; run `tfrec "
                                f"generate` to create a synthetic world there")
    report, bad_frames, good = BadRowReport(), [], {}
    for name in ("catalog", "users", "events"):
        raw = read_table_raw(data_dir, name, users_key)
        report.rows[name] = len(raw)
        rows, bad = check_rows(raw, name)
        rows, duplicates = split_duplicates(rows, name)
        good[name] = rows
        bad_frames += [bad, duplicates]
    good["events"], unknown = split_unknown_items(good["events"], good["catalog"]["item_id"])
    bad_frames.append(unknown)
    bad = pd.concat(bad_frames, ignore_index=True)
    report.add(bad)
    for name in ("catalog", "users", "events"):
        if len(good[name]) == 0:
            raise SchemaError(f"no valid {name} rows in {data_dir!r}: "
                              f"{report.describe(name) or 'the table is empty'}")
    return Tables(**good), report, bad


def load_tables(data_dir: str, strict: bool = True, max_bad_share: float = 0.0,
                users_key: Optional[bytes] = None) -> Tables:
    """Loads and validates catalog, users and events from a data directory.

    Args:
      data_dir: directory holding `<name>.parquet` or `<name>.csv` per table (or a
        `<name>/` folder of parts).
      strict: events referencing items missing from the catalog raise (True) or
        are dropped with a warning (False).
      max_bad_share: 0 (default): the first bad row raises. Above 0: bad rows are set
        aside as `tfrec prepare` does (`clean_tables`), with a warning, unless a
        table's share of them exceeds this.
      users_key: pseudonymise user ids with this key (None: raw ids).

    Raises:
      FileNotFoundError: the directory or one of the tables is missing.
      SchemaError: a table is unreadable or invalid.
      ValueError: more bad rows than `max_bad_share` allows.
    """
    if max_bad_share:
        tables, report, _ = clean_tables(data_dir, users_key)
        report.check(max_bad_share)
        for table in sorted(report.rows):
            if report.bad(table):
                warnings.warn(f"{data_dir}: set aside {report.bad(table)} bad {table} rows: "
                              f"{report.describe(table)}", stacklevel=2)
        return tables
    hint = "run `tfrec generate` to create a synthetic world there"
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir!r} does not exist; {hint}")
    tables = {}
    for name in ("catalog", "users", "events"):
        paths = table_files(data_dir, name)
        raw = read_table_raw(data_dir, name, users_key)
        try:
            tables[name] = validate_table(raw, name)
        except SchemaError as e:  # named by its file, or its folder of parts
            where = paths[0] if len(paths) == 1 else os.path.join(data_dir, name) + "/"
            raise SchemaError(f"{where}: {e}") from e
    events = validate_references(tables["catalog"], tables["events"], strict=strict)
    return Tables(catalog=tables["catalog"], users=tables["users"], events=events)


def load_data_tables(data: DataConfig) -> Tables:
    """`load_tables` as a run's data section says: bad-row share and user pseudonyms.

    Every reader of a run's tables (training, evaluation, export, reports) goes through
    here, so with `data.pseudonymize_users` none of them ever sees a raw user id.

    Raises:
      FileNotFoundError, SchemaError, ValueError: see `load_tables` and
        `tfrec.data.pseudonym.read_key`.
    """
    return load_tables(data.data_dir, max_bad_share=data.max_bad_share,
                       users_key=users_key(data))
