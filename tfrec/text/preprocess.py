"""BERT preprocessing in TensorFlow ops: raw strings -> input_word_ids/mask/type_ids.

Built from tensorflow_text so it is saved inside a SavedModel and runs in the serving
graph; its interface (`__call__`, `tokenize`, `bert_pack_inputs`) is that of TF Hub's
BERT preprocessors, so code written against those works with ours unchanged.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_text as text
# Not re-exported by tensorflow_text; its own vocabulary learner imports it the same way.
from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer

from tfrec.text.vocab import UNK, special_ids, validate_vocab

DEFAULT_SEQ_LENGTH = 128
MAX_SEGMENTS = 2
# Words longer than this many bytes become [UNK], as in BERT (bounds the cost of junk input).
MAX_BYTES_PER_WORD = 100

SeqLength = Union[int, tf.Tensor]


def tokens_spec(ragged_rank: int = 2) -> tf.RaggedTensorSpec:
    """Spec of tokenized text: [batch, words, pieces] (rank 2) or [batch, tokens] (rank 1)."""
    return tf.RaggedTensorSpec([None] * (ragged_rank + 1), tf.int32, ragged_rank=ragged_rank)


class TextCasing:
    """How text is normalised before it is split into words and word pieces.

    BERT's uncased models fold case and strip accents ("Größe" -> "große" -> "groe" is
    not what a German shopper typed), so vocabularies learned here fold case with NFKC
    and keep accents as letters; converted models keep the casing they were trained with.

    Args:
      lower_case: fold case (False: cased models see the text as typed).
      keep_accents: with `lower_case`, keep accents (NFKC case folding) instead of
        BERT's accent stripping.
    """

    def __init__(self, lower_case: bool = True, keep_accents: bool = False):
        self.lower_case = bool(lower_case)
        self.keep_accents = bool(keep_accents) and self.lower_case

    def normalize(self, sentences: tf.Tensor) -> tf.Tensor:
        """[B] strings -> [B] strings as the tokenizer's word splitter must see them."""
        sentences = tf.convert_to_tensor(sentences, tf.string)
        if self.keep_accents:
            # Invalid UTF-8 becomes U+FFFD rather than failing the whole request.
            sentences = tf.strings.unicode_transcode(sentences, "UTF-8", "UTF-8",
                                                     errors="replace")
            sentences = text.case_fold_utf8(sentences)
        return sentences

    def tokenizer_options(self) -> Dict[str, bool]:
        """`lower_case` for text.BertTokenizer / BasicTokenizer after `normalize`."""
        return {"lower_case": self.lower_case and not self.keep_accents}

    def words(self, sentences: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings -> ragged [B, words] strings: the units WordPiece splits further.

        CJK ideographs come out one per word, like punctuation marks.
        """
        basic = BasicTokenizer(**self.tokenizer_options())
        return basic.tokenize(self.normalize(sentences))


class BertPreprocessor(tf.Module):
    """Lower-casing, WordPiece tokenization and [CLS]/[SEP] packing over one vocabulary.

    The vocabulary is held in a static hash table inside the module, so the exported
    SavedModel is self-contained (no file path to resolve at load time).

    Args:
      vocab: tokens in id order (vocab.txt lines), with the BERT special tokens.
      lower_case: lower-case before WordPiece (uncased models); strips accents unless
        `keep_accents`.
      seq_length: length of the packed inputs produced by `__call__`.
      keep_accents: with `lower_case`, NFKC case folding that keeps accented letters.
      name: module name.
    """

    def __init__(self, vocab: Sequence[str], lower_case: bool = True,
                 seq_length: int = DEFAULT_SEQ_LENGTH, keep_accents: bool = False,
                 name: str = "bert_preprocessor"):
        super().__init__(name=name)
        vocab = list(vocab)
        validate_vocab(vocab)
        if not isinstance(seq_length, int) or seq_length < MAX_SEGMENTS + 1:
            raise ValueError(f"seq_length must be an integer >= {MAX_SEGMENTS + 1} "
                             f"([CLS] and [SEP] take room), got {seq_length!r}")
        self.special = special_ids(vocab)
        self.vocab_size = len(vocab)
        self.casing = TextCasing(lower_case, keep_accents)
        self.lower_case = self.casing.lower_case
        self.keep_accents = self.casing.keep_accents
        self.default_seq_length = seq_length
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(vocab), tf.range(len(vocab), dtype=tf.int64)),
            num_oov_buckets=1)
        self.tokenizer = text.BertTokenizer(
            table, token_out_type=tf.int64, unknown_token=UNK,
            max_bytes_per_word=MAX_BYTES_PER_WORD, **self.casing.tokenizer_options())

    def tokenize_strings(self, sentences: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings -> ragged [B, words, pieces] int32 token ids."""
        return tf.cast(self.tokenizer.tokenize(self.casing.normalize(sentences)), tf.int32)

    def pack(self, segments: Sequence[tf.RaggedTensor],
             seq_length: Optional[SeqLength] = None) -> Dict[str, tf.Tensor]:
        """Packs 1 or 2 tokenized segments into fixed-length encoder inputs.

        One segment gives `[CLS] a [SEP]`; two give `[CLS] a [SEP] b [SEP]` with type ids
        0 up to the first [SEP] and 1 after it. Segments too long together are trimmed
        round-robin (one token at a time from each segment that still has some), so a
        long description cannot push a short query out.

        Args:
          segments: ragged [B, words, pieces] or [B, tokens] int token ids, same batch.
          seq_length: output length, a Python int or int32 scalar (default: the
            module's `default_seq_length`).

        Returns:
          `input_word_ids`, `input_mask`, `input_type_ids`, each [B, seq_length] int32.
        """
        segments = list(segments) if isinstance(segments, (list, tuple)) else [segments]
        if not 1 <= len(segments) <= MAX_SEGMENTS:
            raise ValueError(f"bert_pack_inputs takes 1 or {MAX_SEGMENTS} segments, "
                             f"got {len(segments)}")
        if seq_length is None:
            seq_length = self.default_seq_length
        n_special = len(segments) + 1
        if isinstance(seq_length, int):
            if seq_length < n_special:
                raise ValueError(f"seq_length {seq_length} leaves no room for {n_special} "
                                 "special tokens")
        else:
            seq_length = tf.cast(seq_length, tf.int32)
            tf.debugging.assert_greater_equal(
                seq_length, n_special, message="seq_length leaves no room for [CLS]/[SEP]")
        flat = []
        for segment in segments:
            if not isinstance(segment, tf.RaggedTensor):
                raise ValueError("bert_pack_inputs segments must be ragged token ids "
                                 f"(output of tokenize), got {type(segment).__name__}")
            if segment.ragged_rank > 1:
                segment = segment.merge_dims(-2, -1)
            flat.append(tf.cast(segment, tf.int32))
        trimmed = text.RoundRobinTrimmer(max_seq_length=seq_length - n_special).trim(flat)
        ids, type_ids = text.combine_segments(
            trimmed, start_of_sequence_id=self.special.cls, end_of_segment_id=self.special.sep)
        word_ids, mask = text.pad_model_inputs(ids, max_seq_length=seq_length,
                                               pad_value=self.special.pad)
        type_ids, _ = text.pad_model_inputs(type_ids, max_seq_length=seq_length, pad_value=0)
        return {"input_word_ids": tf.cast(word_ids, tf.int32),
                "input_mask": tf.cast(mask, tf.int32),
                "input_type_ids": tf.cast(type_ids, tf.int32)}

    def preprocess(self, sentences: tf.Tensor,
                   seq_length: Optional[SeqLength] = None) -> Dict[str, tf.Tensor]:
        """[B] strings -> encoder inputs of one segment (what TF Hub's `__call__` does)."""
        return self.pack([self.tokenize_strings(sentences)], seq_length)

    def __call__(self, sentences: tf.Tensor) -> Dict[str, tf.Tensor]:
        return self.preprocess(sentences)

