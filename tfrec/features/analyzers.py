"""Lexical settings: the analyzers `tfrec.features.tokenize` implements, BM25's k1 and b.

Plain Python (no TensorFlow), so configs and the CLI can check them before a model loads.
"""

from __future__ import annotations

import numbers

__all__ = ["ANALYZERS", "check_analyzer", "check_bm25"]

# "plain": the shared tokenizer's terms; "light": also letter/digit runs split and plural
# suffixes folded (tfrec.features.tokenize.split_letters_digits / fold_plurals).
ANALYZERS = ("plain", "light")


def check_analyzer(analyzer: str, name: str = "analyzer") -> str:
    """Returns `analyzer` if it is one of `ANALYZERS`.

    Args:
      analyzer: the value to check.
      name: what the error calls it (a config field, e.g. "search.lexical_analyzer").

    Raises:
      ValueError: naming the accepted analyzers.
    """
    if analyzer not in ANALYZERS:
        raise ValueError(f"{name} must be one of {', '.join(ANALYZERS)}, got {analyzer!r}")
    return analyzer


def check_bm25(k1: float, b: float, prefix: str = "") -> None:
    """Raises a ValueError unless k1 >= 0 (term-frequency saturation) and b is in [0, 1]
    (document-length normalisation).

    Args:
      prefix: prepended to the names in the message (e.g. "search.bm25_").
    """
    if isinstance(k1, bool) or not isinstance(k1, numbers.Real) or not k1 >= 0:
        raise ValueError(f"{prefix}k1 must be a number >= 0, got {k1!r}")
    if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0.0 <= b <= 1.0:
        raise ValueError(f"{prefix}b must be a number in [0, 1], got {b!r}")
