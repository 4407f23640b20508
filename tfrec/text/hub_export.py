"""TF-Hub-format SavedModels of BERT encoders and preprocessors.

The encoder follows TF Hub's Reusable SavedModel API (`__call__(inputs, training)`,
`variables`, `trainable_variables`, `regularization_losses`), so
`hub.KerasLayer(path, trainable=True)` fine-tunes it; the preprocessor exposes
`__call__`, `tokenize` and `bert_pack_inputs` like TF Hub's BERT preprocessors. Both
need only TensorFlow and tensorflow_text to load: no tfrec, no Keras classes.

Exported directory layout (either kind):
  saved_model.pb, variables/            the SavedModel
  assets/vocab.txt                      the WordPiece vocabulary (`vocab_file` asset)
  assets.extra/tfrec_text.json          kind, BertConfig, casing, seq_length, source
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.text.bert import (INPUT_KEYS, BertEncoder, build_encoder, canonical_weight_name,
                             encoder_weights)
from tfrec.text.config import BertConfig
from tfrec.text.preprocess import DEFAULT_SEQ_LENGTH, MAX_SEGMENTS, BertPreprocessor, tokens_spec
from tfrec.text.vocab import tiny_vocab, validate_vocab, write_vocab

INFO_FILE = os.path.join("assets.extra", "tfrec_text.json")
ENCODER_KIND = "bert_encoder"
PREPROCESSOR_KIND = "bert_preprocessor"
# Outputs of the `serving_default` signature (signatures cannot return lists, so the
# per-layer `encoder_outputs` are only available through `__call__`).
SIGNATURE_OUTPUTS = ("pooled_output", "sequence_output", "default")


def encoder_input_specs() -> Dict[str, tf.TensorSpec]:
    """The encoder's input: three [batch, seq_length] int32 tensors."""
    return {k: tf.TensorSpec([None, None], tf.int32, name=k) for k in INPUT_KEYS}


class _ReusableSavedModel(tf.train.Checkpoint):
    """Root object of an exported SavedModel: a plain bag of saved attributes.

    tf.Module reserves `variables` and `trainable_variables` as read-only properties,
    but TF Hub's Reusable SavedModel API needs them as saved attributes, so the root is
    a generic trackable instead (TF Model Garden's Hub exports do the same).
    """


def _encoder_root(encoder: BertEncoder, vocab_file: str, lower_case: bool
                  ) -> Tuple[_ReusableSavedModel, Dict[str, Any]]:
    """Wraps a built encoder as a Reusable SavedModel root plus its signatures.

    Only functions and variables are saved, not the Keras objects, so loading needs no
    tfrec code and saving does not trace every Keras layer separately.
    """
    root = _ReusableSavedModel()
    root.variables = list(encoder.variables)
    root.trainable_variables = list(encoder.trainable_variables)
    root.regularization_losses = []
    root.vocab_file = tf.saved_model.Asset(vocab_file)
    root.do_lower_case = tf.Variable(lower_case, trainable=False, name="do_lower_case")

    @tf.function(autograph=False)
    def call(inputs: Dict[str, tf.Tensor], training: bool = False) -> Dict[str, Any]:
        return encoder(inputs, training=training)

    specs = encoder_input_specs()
    for training in (False, True):
        call.get_concrete_function(specs, training=training)
    root.__call__ = call

    @tf.function(input_signature=list(specs.values()), autograph=False)
    def serve(input_word_ids, input_mask, input_type_ids):
        outputs = encoder({"input_word_ids": input_word_ids, "input_mask": input_mask,
                           "input_type_ids": input_type_ids}, training=False)
        return {k: outputs[k] for k in SIGNATURE_OUTPUTS}

    return root, {"serving_default": serve.get_concrete_function()}


def _preprocessor_root(preprocessor: BertPreprocessor, vocab_file: str
                       ) -> Tuple[_ReusableSavedModel, Dict[str, Any]]:
    """Wraps a preprocessor as a SavedModel root with TF Hub's three entry points.

    `bert_pack_inputs` keeps `seq_length` as an argument with the export's default,
    traced as an int32 scalar, so callers may pick any length at call time.
    """
    root = _ReusableSavedModel()
    root.preprocessor = preprocessor  # tracks the vocabulary table
    root.vocab_file = tf.saved_model.Asset(vocab_file)
    root.do_lower_case = tf.Variable(preprocessor.lower_case, trainable=False,
                                     name="do_lower_case")
    root.seq_length = tf.Variable(preprocessor.default_seq_length, trainable=False,
                                  name="seq_length")
    sentences = tf.TensorSpec([None], tf.string, name="sentences")

    @tf.function(input_signature=[sentences], autograph=False)
    def call(strings: tf.Tensor) -> Dict[str, tf.Tensor]:
        return preprocessor.preprocess(strings)

    @tf.function(input_signature=[sentences], autograph=False)
    def tokenize(strings: tf.Tensor) -> tf.RaggedTensor:
        return preprocessor.tokenize_strings(strings)

    @tf.function(autograph=False)
    def bert_pack_inputs(inputs, seq_length=preprocessor.default_seq_length):
        return preprocessor.pack(inputs, seq_length)

    length = tf.TensorSpec([], tf.int32, name="seq_length")
    for ragged_rank in (1, 2):
        for n in range(1, MAX_SEGMENTS + 1):
            bert_pack_inputs.get_concrete_function(
                [tokens_spec(ragged_rank) for _ in range(n)], seq_length=length)
    root.__call__ = call
    root.tokenize = tokenize
    root.bert_pack_inputs = bert_pack_inputs
    return root, {"serving_default": call.get_concrete_function()}


def save_dir_atomic(path: str, overwrite: bool, write: Callable[[str], None]) -> str:
    """Runs `write(tmp_dir)` (which creates tmp_dir) and renames it to `path` when done.

    A reader (or hub.KerasLayer) never sees a half-written export; with `overwrite` an
    existing export is replaced only after the new one is complete.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output directory or "
                              "pass overwrite=True (--overwrite)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    old = None
    try:
        write(tmp)
        if os.path.exists(path):
            old = os.path.join(parent, f".old-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return path


def ensure_free(paths: Sequence[str], overwrite: bool) -> None:
    """Refuses to start a multi-directory export that would stop half-way on an existing one."""
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not overwrite:
        raise FileExistsError(f"{taken[0]} already exists; choose another output directory "
                              "or pass overwrite=True (--overwrite)")


def _save(root: tf.train.Checkpoint, signatures: Dict[str, Any], out: str,
          info: Dict[str, Any]) -> None:
    """Saves `root` to `out` and writes the export info JSON beside it."""
    # TF and absl log notes about internal resource names of signatures; keep output clean.
    loggers = [tf.get_logger(), logging.getLogger("absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        tf.saved_model.save(root, out, signatures=signatures)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    os.makedirs(os.path.join(out, "assets.extra"), exist_ok=True)
    with open(os.path.join(out, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _with_vocab_file(vocab: Sequence[str], use: Callable[[str], None]) -> None:
    """Writes `vocab` to a temporary vocab.txt for the duration of `use(path)`."""
    with tempfile.TemporaryDirectory(prefix="tfrec-vocab-") as d:
        use(write_vocab(vocab, os.path.join(d, "vocab.txt")))


def export_encoder(encoder: BertEncoder, path: str, vocab: Sequence[str], lower_case: bool,
                   overwrite: bool = False, source: str = "", keep_accents: bool = False
                   ) -> str:
    """Exports a built BertEncoder as a TF-Hub-format SavedModel.

    Args:
      encoder: the encoder (from `build_encoder` or trained).
      path: output directory (written atomically).
      vocab: the vocabulary its word ids refer to (saved as assets/vocab.txt).
      lower_case: whether the matching preprocessor lower-cases.
      overwrite: replace an existing export at `path`.
      source: free-text provenance recorded in assets.extra/tfrec_text.json.
      keep_accents: whether the matching preprocessor keeps accents when lower-casing.

    Returns:
      The absolute export path.
    """
    if not isinstance(encoder, BertEncoder) or not encoder.built:
        raise ValueError("export_encoder needs a built BertEncoder (see build_encoder)")
    vocab = list(vocab)
    validate_vocab(vocab)
    if len(vocab) != encoder.config.vocab_size:
        raise ValueError(f"vocabulary has {len(vocab)} tokens but the encoder's word table "
                         f"has {encoder.config.vocab_size} rows")
    info = {"kind": ENCODER_KIND, "config": encoder.config.to_dict(),
            "lower_case": bool(lower_case), "keep_accents": bool(keep_accents),
            "source": source,
            "inputs": list(INPUT_KEYS), "signature_outputs": list(SIGNATURE_OUTPUTS)}

    def write(out: str) -> None:
        def save(vocab_file: str) -> None:
            root, signatures = _encoder_root(encoder, vocab_file, bool(lower_case))
            _save(root, signatures, out, info)
        _with_vocab_file(vocab, save)

    return save_dir_atomic(path, overwrite, write)


def export_preprocessor(vocab: Sequence[str], path: str, lower_case: bool = True,
                        seq_length: int = DEFAULT_SEQ_LENGTH, overwrite: bool = False,
                        source: str = "", keep_accents: bool = False) -> str:
    """Exports a BertPreprocessor over `vocab` as a TF-Hub-format SavedModel.

    Args:
      vocab: tokens in id order, with the BERT special tokens.
      path: output directory (written atomically).
      lower_case: lower-case and strip accents (uncased models).
      seq_length: length produced by `__call__` and default of `bert_pack_inputs`.
      overwrite: replace an existing export at `path`.
      source: free-text provenance recorded in assets.extra/tfrec_text.json.
      keep_accents: with `lower_case`, NFKC case folding that keeps accented letters.

    Returns:
      The absolute export path.
    """
    vocab = list(vocab)
    preprocessor = BertPreprocessor(vocab, lower_case=lower_case, seq_length=seq_length,
                                    keep_accents=keep_accents)
    info = {"kind": PREPROCESSOR_KIND, "lower_case": preprocessor.lower_case,
            "keep_accents": preprocessor.keep_accents,
            "seq_length": int(seq_length), "vocab_size": len(vocab), "source": source,
            "special_ids": preprocessor.special.__dict__}

    def write(out: str) -> None:
        def save(vocab_file: str) -> None:
            root, signatures = _preprocessor_root(preprocessor, vocab_file)
            _save(root, signatures, out, info)
        _with_vocab_file(vocab, save)

    return save_dir_atomic(path, overwrite, write)


def read_export_info(path: str, kind: Optional[str] = None) -> Dict[str, Any]:
    """Reads assets.extra/tfrec_text.json of an export, checking its kind.

    Raises:
      FileNotFoundError: `path` is not a tfrec text export.
      ValueError: it is an export of another kind.
    """
    info_path = os.path.join(path, INFO_FILE)
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"{path!r} is not a SavedModel directory (no saved_model.pb)")
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"{path!r} has no {INFO_FILE}: not exported by tfrec.text")
    with open(info_path) as f:
        info = json.load(f)
    if kind is not None and info.get("kind") != kind:
        raise ValueError(f"{path!r} holds a {info.get('kind')!r}, expected a {kind!r}")
    return info


def vocab_path(path: str) -> str:
    """assets/vocab.txt of an exported encoder or preprocessor."""
    vocab = os.path.join(path, "assets", "vocab.txt")
    if not os.path.exists(vocab):
        raise FileNotFoundError(f"{path!r} has no assets/vocab.txt")
    return vocab


def load_keras_encoder(path: str) -> Tuple[BertEncoder, Dict[str, Any]]:
    """Rebuilds an exported encoder as a Keras BertEncoder with its trained weights.

    Pretraining continues from this Keras model (it needs the word table for the tied
    masked-LM head), then exports again; weights are matched by canonical name.

    Returns:
      (encoder, export info).
    """
    info = read_export_info(path, ENCODER_KIND)
    encoder = build_encoder(BertConfig.from_dict(info["config"]))
    targets = encoder_weights(encoder)
    loaded = tf.saved_model.load(path)
    sources = {canonical_weight_name(v.name): v for v in loaded.variables}
    missing = sorted(set(targets) - set(sources))
    unexpected = sorted(set(sources) - set(targets))
    if missing or unexpected:
        raise ValueError(f"encoder weights in {path!r} do not match its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in targets.items():
        source = sources[name]
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"weight {name!r} in {path!r} has shape {tuple(source.shape)}, "
                             f"the config implies {tuple(target.shape)}")
        target.assign(source)
    return encoder, info


def build_tiny_encoder(out_dir: str, vocab_tokens: Optional[Sequence[str]] = None,
                       layers: int = 2, hidden: int = 64, heads: int = 2,
                       seq_length: int = 64, seed: int = 0, overwrite: bool = False
                       ) -> Tuple[str, str]:
    """Exports a small randomly initialised encoder and its preprocessor.

    For tests and fast runs: the same interface as MiniLM at a fraction of the cost.
    The vocabulary is the special tokens, single characters and `vocab_tokens`.

    Args:
      out_dir: writes `out_dir/encoder` and `out_dir/preprocessor`.
      vocab_tokens: words or word pieces to add (see tfrec.text.vocab.words_from_texts).
      layers: transformer blocks.
      hidden: hidden size (intermediate is 4x).
      heads: attention heads (must divide hidden).
      seq_length: preprocessor output length.
      seed: weight initialisation seed.
      overwrite: replace existing exports.

    Returns:
      (encoder_path, preprocessor_path).
    """
    paths = [os.path.join(out_dir, "encoder"), os.path.join(out_dir, "preprocessor")]
    ensure_free(paths, overwrite)
    vocab = tiny_vocab(vocab_tokens)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_layers=layers,
                        num_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=max(seq_length, 128))
    encoder = build_encoder(config, seed=seed)
    source = f"tiny random encoder (seed {seed})"
    encoder_path = export_encoder(encoder, paths[0], vocab, True, overwrite=overwrite,
                                  source=source)
    preprocessor_path = export_preprocessor(vocab, paths[1],
                                            lower_case=True, seq_length=seq_length,
                                            overwrite=overwrite, source=source)
    return encoder_path, preprocessor_path
