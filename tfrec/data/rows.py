"""Row-level validation: split a raw table into rows that fit its schema and bad rows.

Large logs always hold some broken rows; failing the whole preparation on the first one
(`validate_table`) suits small curated tables, while a pipeline over a shop's events must
keep going, set the bad rows aside with their reason and report them. Both preparation
engines (pandas, Beam) call these functions on whole tables or on batches of rows, so
they drop exactly the same rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from tfrec.data.schema import (EVENT_TYPES, OPTIONAL_COLUMNS, REQUIRED_VALUES, SCHEMAS,
                               SchemaError, is_missing)

BAD_COLUMNS = ("table", "reason", "row")  # one bad row: its table, why, its values as JSON
EXAMPLES_PER_REASON = 3


def _string_cells(values: pd.Series) -> Tuple[pd.Series, np.ndarray]:
    inferred = pd.api.types.infer_dtype(values, skipna=True)
    if inferred in ("string", "empty"):  # the common case, checked in C
        return values.astype(object).where(values.notna(), ""), np.zeros(len(values), bool)

    def convert(v: object) -> Optional[str]:
        if isinstance(v, str):
            return v
        if isinstance(v, (bool, np.bool_)):
            return None
        if isinstance(v, (int, np.integer)):
            return str(v)
        if isinstance(v, (float, np.floating)) and np.isfinite(v) and v == np.round(v):
            return str(int(v))  # ids read as floats: 12.0 -> "12"
        return "" if is_missing(v) else None

    converted = values.map(convert)
    bad = converted.isna().to_numpy()
    return converted.where(~bad, "").astype(object), bad


def _number_cells(values: pd.Series, kind: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (numbers, missing, malformed) for an int or float column."""
    if pd.api.types.is_bool_dtype(values.dtype):
        n = len(values)
        return np.zeros(n), np.zeros(n, bool), np.ones(n, bool)
    if pd.api.types.is_numeric_dtype(values.dtype):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        missing, malformed = np.isnan(numbers), np.zeros(len(values), bool)
    else:
        text = values.map(lambda v: v.strip() if isinstance(v, str) else v)
        booleans = text.map(lambda v: isinstance(v, (bool, np.bool_))).to_numpy(bool)
        numbers = pd.to_numeric(text.where(~booleans, None), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
        blank = (text.isna() | (text == "")).to_numpy(bool)
        missing = blank & ~booleans
        malformed = np.isnan(numbers) & ~missing
    if kind == "int":
        fractional = ~missing & ~malformed & (~np.isfinite(numbers)
                                              | (numbers != np.round(numbers)))
        malformed = malformed | fractional
    return numbers, missing, malformed


class _Reasons:
    """The first reason each row fails for (later checks do not overwrite it)."""

    def __init__(self, n: int):
        self.reasons = np.full(n, "", dtype=object)

    def add(self, mask: np.ndarray, reason: str) -> None:
        mask = np.asarray(mask, dtype=bool) & (self.reasons == "")
        self.reasons[mask] = reason

    @property
    def bad(self) -> np.ndarray:
        return self.reasons != ""


def _bad_frame(raw: pd.DataFrame, reasons: np.ndarray, table: str) -> pd.DataFrame:
    records = raw.to_dict("records")
    rows = [json.dumps({k: _plain(v) for k, v in r.items()}, ensure_ascii=False, sort_keys=True)
            for r in records]
    return pd.DataFrame({"table": pd.Series([table] * len(rows), dtype=object),
                         "reason": pd.Series(list(reasons), dtype=object),
                         "row": pd.Series(rows, dtype=object)})


def _plain(value: object) -> object:
    """A JSON-safe cell (numpy scalars unwrapped, NaN as null, other objects as text)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def check_rows(df: pd.DataFrame, table: str) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Splits a raw table (or a batch of its rows) into good rows and bad rows.

    Checks are per row, so the result for a row does not depend on the other rows:
    the Beam engine can check batches and get what pandas gets on the whole table.

    Args:
      df: raw rows (from Parquet, CSV or a generator).
      table: "catalog", "users" or "events".

    Returns:
      (good, bad): good rows with canonical dtypes in schema order (extra columns
      after; as `validate_table` returns them, fresh index); bad rows as
      DataFrame(table, reason, row) with the row's raw values as JSON. A reason reads
      "<column>: <problem>", e.g. "ts: not an int" or "event_type: unknown value".

    Raises:
      SchemaError: the table lacks a required column (no row can be read).
    """
    if table not in SCHEMAS:
        raise SchemaError(f"unknown table {table!r}; expected one of {sorted(SCHEMAS)}")
    schema, optional = SCHEMAS[table], OPTIONAL_COLUMNS[table]
    missing = [c for c in schema if c not in df.columns and c not in optional]
    if missing:
        raise SchemaError(f"{table} table is missing column(s) {missing}; expected columns "
                          f"{list(schema)} (optional: {list(optional)})")
    raw = df.reset_index(drop=True)
    n = len(raw)
    reasons = _Reasons(n)
    out = {}
    for column, kind in schema.items():
        if column not in raw.columns:
            value = optional[column]
            out[column] = (np.full(n, value, dtype=object) if kind == "string" else
                           np.full(n, value, dtype=np.int64 if kind == "int" else np.float64))
            continue
        if kind == "string":
            out[column], bad = _string_cells(raw[column])
            reasons.add(bad, f"{column}: not a string")
            continue
        numbers, empty, malformed = _number_cells(raw[column], kind)
        reasons.add(empty, f"{column}: missing")
        reasons.add(malformed, f"{column}: not {'an int' if kind == 'int' else 'a number'}")
        numbers = np.where(empty | malformed, 0, numbers)
        out[column] = numbers.astype(np.int64) if kind == "int" else numbers
    for column in raw.columns:
        if column not in schema:
            out[column] = raw[column]
    good = pd.DataFrame(out)
    for column in REQUIRED_VALUES[table]:
        empty = (good[column] == "").to_numpy(bool)
        if table == "events" and column == "item_id":
            reasons.add(empty & (good["event_type"] != "search").to_numpy(bool),
                        "item_id: empty (only search events may have none)")
        else:
            reasons.add(empty, f"{column}: empty")
    if table == "catalog":
        price = good["price"].to_numpy(np.float64)
        reasons.add(~np.isfinite(price) | (price < 0), "price: negative or not finite")
    elif table == "events":
        reasons.add(~good["event_type"].isin(EVENT_TYPES).to_numpy(bool),
                    "event_type: unknown value")
    bad = reasons.bad
    return (good[~bad].reset_index(drop=True),
            _bad_frame(raw[bad], reasons.reasons[bad], table))


ID_COLUMN = {"catalog": "item_id", "users": "user_id"}


def split_duplicates(df: pd.DataFrame, table: str) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Sets aside every row whose id occurs more than once (catalog, users).

    All copies go, not all but the first: which copy came first is not defined once
    a table is read in parallel, and guessing would silently pick one of two prices.

    Returns:
      (good, bad) as `check_rows`; other tables pass through unchanged.
    """
    if table not in ID_COLUMN:
        return df, _bad_frame(df.iloc[:0], np.array([], dtype=object), table)
    column = ID_COLUMN[table]
    dup = df[column].duplicated(keep=False).to_numpy(bool)
    reasons = np.full(int(dup.sum()), f"{column}: duplicate", dtype=object)
    return df[~dup].reset_index(drop=True), _bad_frame(df[dup], reasons, table)


def split_unknown_items(events: pd.DataFrame, item_ids) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Sets aside events about items that are not in the (good) catalog.

    Such events cannot become examples (no title, price...) and must not shape
    histories either, so they go before anything is built from the events.

    Args:
      events: good events rows.
      item_ids: ids of the good catalog rows (any container `isin` takes).

    Returns:
      (good, bad) as `check_rows`.
    """
    unknown = ((events["item_id"] != "") & ~events["item_id"].isin(item_ids)).to_numpy(bool)
    reasons = np.full(int(unknown.sum()), "item_id: not in catalog", dtype=object)
    return events[~unknown].reset_index(drop=True), _bad_frame(events[unknown], reasons,
                                                                "events")


def dead_letter_lines(bad: pd.DataFrame) -> Iterator[str]:
    """Bad rows as JSON lines {"table", "reason", "row"} (the dead-letter file of both engines)."""
    for table, reason, row in zip(bad["table"], bad["reason"], bad["row"]):
        yield json.dumps({"table": table, "reason": reason, "row": json.loads(row)},
                         ensure_ascii=False, sort_keys=True)


@dataclass
class BadRowReport:
    """Rows read and set aside per table, by reason, with a few examples each.

    Attributes:
      rows: rows read per table (good + bad).
      reasons: {table: {reason: count}}.
      examples: {table: {reason: [row JSON, ...]}} (at most EXAMPLES_PER_REASON).
    """

    rows: Dict[str, int] = field(default_factory=dict)
    reasons: Dict[str, Dict[str, int]] = field(default_factory=dict)
    examples: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)

    def add(self, bad: pd.DataFrame) -> None:
        """Counts a frame of bad rows (`check_rows` format)."""
        for (table, reason), group in bad.groupby(["table", "reason"], sort=True):
            counts = self.reasons.setdefault(table, {})
            counts[reason] = counts.get(reason, 0) + len(group)
            kept = self.examples.setdefault(table, {}).setdefault(reason, [])
            kept.extend(sorted(group["row"])[:EXAMPLES_PER_REASON - len(kept)])

    def bad(self, table: str) -> int:
        return int(sum(self.reasons.get(table, {}).values()))

    def share(self, table: str) -> float:
        return self.bad(table) / self.rows[table] if self.rows.get(table) else 0.0

    def check(self, max_share: float, where: str = "") -> None:
        """Raises when a table's bad rows exceed `max_share` of its rows.

        Raises:
          ValueError: naming the table, the share, the main reasons and an example.
        """
        for table in sorted(self.rows):
            if self.bad(table) and self.share(table) > max_share:
                raise ValueError(f"{self.bad(table)} of {self.rows[table]} {table} rows "
                                 f"({self.share(table):.2%}) are bad, above data.max_bad_share "
                                 f"{max_share:g}: {self.describe(table)}{where}")

    def describe(self, table: str) -> str:
        parts = []
        for reason, count in sorted(self.reasons.get(table, {}).items(),
                                    key=lambda kv: (-kv[1], kv[0])):
            example = (self.examples.get(table, {}).get(reason) or [""])[0]
            parts.append(f"{count} x {reason!r} (e.g. {example})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {table: {"rows": self.rows[table], "bad": self.bad(table),
                        "share": round(self.share(table), 6),
                        "reasons": dict(sorted(self.reasons.get(table, {}).items())),
                        "examples": self.examples.get(table, {})}
                for table in sorted(self.rows)}
