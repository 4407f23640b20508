"""Pseudonymised user ids: a keyed hash (HMAC-SHA256) replaces every raw user id.

The key is a secret kept outside the data (environment variable or key file), so the
records, checkpoints and models written from pseudonymised tables cannot be joined back
to shoppers by whoever reads them, while the same key maps the same id to the same
pseudonym every time (training, evaluation, serving clients, `tfrec forget`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Iterable, List, Optional, Union

import numpy as np
import pandas as pd

from tfrec.config import DataConfig

KEY_ENV = "TFREC_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16  # a short secret can be brute-forced from a known id and its pseudonym
PREFIX = "p_"
HEX_CHARS = 20  # 80 bits: collisions stay improbable far beyond a billion users
PSEUDONYM_RE = re.compile(rf"^{PREFIX}[0-9a-f]{{{HEX_CHARS}}}$")
_FINGERPRINT_LABEL = b"tfrec pseudonym key fingerprint v1"
USER_ID_TABLES = ("users", "events")  # the raw tables holding a user_id column


def read_key(key_file: str = "") -> bytes:
    """The pseudonymisation secret: the key file's bytes, else `$TFREC_PSEUDONYM_KEY`.

    Neither the key nor the file's content is ever written or logged by tfrec; errors
    name where the key was looked for, never what it holds.

    Args:
      key_file: path of a file holding the key (surrounding whitespace ignored); "" reads
        the environment variable.

    Returns:
      The key bytes.

    Raises:
      FileNotFoundError: `key_file` does not exist.
      ValueError: the key is missing, empty or shorter than MIN_KEY_BYTES.
    """
    if key_file:
        if not os.path.isfile(key_file):
            raise FileNotFoundError(f"pseudonym key file {key_file!r} does not exist "
                                    f"(data.pseudonym_key_file / --pseudonym-key-file)")
        with open(key_file, "rb") as f:
            key, where = f.read().strip(), f"key file {key_file!r}"
    else:
        key, where = os.environ.get(KEY_ENV, "").strip().encode("utf-8"), f"${KEY_ENV}"
    if not key:
        raise ValueError(
            f"user pseudonymisation is on but no key was found ({where} is empty or unset): "
            f"set {KEY_ENV} or data.pseudonym_key_file (--pseudonym-key-file) to a secret "
            f"of at least {MIN_KEY_BYTES} bytes kept outside the data, e.g. `export "
            f"{KEY_ENV}=$(openssl rand -hex 32)`")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the pseudonym key in {where} is {len(key)} bytes; use at least "
                         f"{MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)")
    return key


def users_key(data: DataConfig) -> Optional[bytes]:
    """The key when `data.pseudonymize_users` is on, else None (raw ids are used).

    Raises:
      FileNotFoundError, ValueError: see `read_key`.
    """
    if not data.pseudonymize_users:
        return None
    return read_key(data.pseudonym_key_file)


def pseudonym(user_id: str, key: bytes) -> str:
    """One id's pseudonym: "p_" + the first 20 hex digits of HMAC-SHA256(key, UTF-8 id)."""
    digest = hmac.new(key, str(user_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:HEX_CHARS]


def pseudonymize(ids: Union[pd.Series, Iterable[str]], key: bytes
                 ) -> Union[pd.Series, List[str]]:
    """Pseudonyms of ids, hashing each distinct id once.

    Missing and blank values (None, NaN, "", whitespace) stay as they are, so table
    validation still reports them as missing; integers are hashed as their text, as
    validation would read them.

    Args:
      ids: a pandas column (returned as a column with the same index) or any iterable
        of ids (returned as a list).
      key: the secret (`read_key`).

    Returns:
      The pseudonymised ids, same length and order.
    """
    if not key:
        raise ValueError("pseudonymize needs a non-empty key (see read_key)")
    series = ids if isinstance(ids, pd.Series) else pd.Series(list(ids), dtype=object)
    mapping = {}
    for value in pd.unique(series):
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            mapping[value] = pseudonym(str(value), key)
        elif isinstance(value, str) and value.strip():
            mapping[value] = pseudonym(value, key)
    hashed = series.map(mapping)  # a dict lookup per row, in C
    values = hashed.to_numpy(dtype=object)
    kept = hashed.isna().to_numpy()
    values[kept] = series.to_numpy(dtype=object)[kept]  # missing / blank ids as they were
    out = pd.Series(values, index=series.index, dtype=object, name=series.name)
    return out if isinstance(ids, pd.Series) else out.tolist()


def pseudonymize_table(df: pd.DataFrame, table: str, key: Optional[bytes]) -> pd.DataFrame:
    """The table with its user_id column pseudonymised (as is without a key or column)."""
    if key is None or table not in USER_ID_TABLES or "user_id" not in df.columns:
        return df
    out = df.copy()
    out["user_id"] = pseudonymize(out["user_id"], key)
    return out


def is_pseudonym(user_id: str) -> bool:
    """Whether an id has the shape of a pseudonym ("p_" + 20 lowercase hex digits)."""
    return bool(PSEUDONYM_RE.match(str(user_id)))


def key_fingerprint(key: bytes) -> str:
    """An HMAC of a fixed label: tells keys apart in metadata without revealing them."""
    return hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]
