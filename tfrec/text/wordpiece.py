"""Learning a WordPiece vocabulary from a shop's own text, in any script.

No pretrained Chinese BERT installs offline, so an encoder trained from scratch needs a
vocabulary of the catalog and its queries. Words are split exactly as the preprocessor
will split them (CJK ideographs one per word), then TF Text's learner picks the pieces.
"""

from __future__ import annotations

import collections
import dataclasses
import string
from typing import Iterable, List, Optional, Sequence

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as learner

from tfrec.text.preprocess import TextCasing
from tfrec.text.vocab import CONTINUATION, SPECIAL_TOKENS, validate_vocab

_BATCH = 4096  # texts per word-splitting call


@dataclasses.dataclass(frozen=True)
class WordPieceOptions:
    """How big the vocabulary is and what may enter it.

    Args:
      vocab_size: most tokens, special tokens included.
      min_count: a piece seen fewer times is not added as a whole (its characters are).
      max_chars: most distinct characters; rarer ones become [UNK]. Chinese text needs
        thousands, so the default is a quarter of `vocab_size`.
      max_piece_length: longer words are not counted (junk, URLs).
    """

    vocab_size: int = 8000
    min_count: int = 2
    max_chars: Optional[int] = None
    max_piece_length: int = 50

    def validate(self) -> None:
        if self.vocab_size < len(reserved_tokens()) + 1:
            raise ValueError(f"vocab_size must be at least {len(reserved_tokens()) + 1} "
                             "(special tokens and ASCII characters come first), "
                             f"got {self.vocab_size}")
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")


def reserved_tokens() -> List[str]:
    """Special tokens, then ASCII letters and digits in both word positions.

    Model numbers and brand names keep arriving; with every ASCII character in the
    vocabulary a new one is spelled out instead of becoming [UNK].
    """
    chars = string.ascii_lowercase + string.digits
    return list(SPECIAL_TOKENS) + list(chars) + [CONTINUATION + c for c in chars]


def count_words(texts: Iterable[str], casing: TextCasing) -> collections.Counter:
    """Counts the words `casing` splits `texts` into (the preprocessor's own splitting)."""
    counts: collections.Counter = collections.Counter()
    batch: List[str] = []

    def flush() -> None:
        if batch:
            words = casing.words(tf.constant(batch)).flat_values.numpy()
            counts.update(w.decode("utf-8") for w in words)
            batch.clear()

    for value in texts:
        batch.append(str(value))
        if len(batch) == _BATCH:
            flush()
    flush()
    return counts


def learn_wordpiece(texts: Sequence[str], casing: TextCasing,
                    options: Optional[WordPieceOptions] = None) -> List[str]:
    """A WordPiece vocabulary for `texts`: special tokens, characters, then pieces.

    Args:
      texts: raw strings (titles, descriptions, queries); any script.
      casing: the preprocessor's casing (words are counted as it will see them).
      options: size and filters.

    Returns:
      Tokens in id order, starting with the BERT special tokens.

    Raises:
      ValueError: no text, or the options are invalid.
    """
    options = options or WordPieceOptions()
    options.validate()
    counts = count_words(texts, casing)
    if not counts:
        raise ValueError("no words in the texts: cannot learn a vocabulary")
    max_chars = options.max_chars or max(1, options.vocab_size // 4)
    vocab = learner.learn(
        counts, vocab_size=options.vocab_size, reserved_tokens=reserved_tokens(),
        lower_thresh=options.min_count, max_token_length=options.max_piece_length,
        max_unique_chars=max_chars, include_joiner_token=True, joiner=CONTINUATION)
    # The learner may exceed the size by its character set; the rarest pieces go first
    # (it lists them last), never a special token or a character.
    vocab = list(vocab)[:options.vocab_size]
    validate_vocab(vocab)
    return vocab
