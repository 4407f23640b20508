"""Names of the lexical analyzers `tfrec.features.tokenize` implements.

Plain Python (no TensorFlow), so configs and the CLI can check a name before a model loads.
"""

from __future__ import annotations

__all__ = ["ANALYZERS", "check_analyzer"]

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
