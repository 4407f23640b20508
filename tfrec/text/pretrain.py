"""Domain-adaptive masked-LM pretraining of a BERT encoder on catalog text and queries.

A general-purpose encoder has never seen the shop's brands, model numbers and query
style; a short masked-LM run on titles, descriptions and queries adapts it before it is
used for ranking. The result is exported in the same TF Hub format as its input.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.data.io import Tables, atomic_write, load_tables
from tfrec.text.bert import BertEncoder, build_encoder, gelu
from tfrec.text.config import BertConfig
from tfrec.text.hub_export import (PREPROCESSOR_KIND, ensure_free, export_encoder,
                                   export_preprocessor, load_keras_encoder, read_export_info,
                                   save_dir_atomic, vocab_path)
from tfrec.text.masking import MaskingConfig, mask_tokens
from tfrec.text.preprocess import BertPreprocessor, TextCasing
from tfrec.text.vocab import read_vocab
from tfrec.text.wordpiece import WordPieceOptions, learn_wordpiece

log = logging.getLogger(__name__)

METRICS = ("mlm_loss", "mlm_accuracy")


@dataclasses.dataclass
class PretrainConfig:
    """Hyper-parameters of a masked-LM run.

    Args:
      seq_length: packed length of each text (longer texts are truncated).
      batch_size: texts per step.
      epochs: passes of `steps_per_epoch` steps.
      steps_per_epoch: default: one pass over the training texts.
      learning_rate: peak rate (default 1e-4 continuing a pretrained encoder, 1e-3
        from scratch).
      warmup_fraction: share of all steps with a linear warm-up.
      weight_decay: AdamW decay (not applied to LayerNorm and biases).
      masking: which tokens are predicted and how they are corrupted.
      validation_fraction: texts held out to measure the loss before and after.
      seed: seeds data order, masks and fresh weights.
      scratch_layers: from scratch only: transformer blocks.
      scratch_hidden: from scratch only: hidden size.
      scratch_heads: from scratch only: attention heads.
      scratch_vocab_size: from scratch without a vocabulary file: size of the WordPiece
        vocabulary learned from the texts (CJK characters as units, accents kept).
    """

    seq_length: int = 64
    batch_size: int = 32
    epochs: int = 1
    steps_per_epoch: Optional[int] = None
    learning_rate: Optional[float] = None
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    validation_fraction: float = 0.05
    seed: int = 0
    scratch_layers: int = 2
    scratch_hidden: int = 128
    scratch_heads: int = 2
    scratch_vocab_size: int = 8000

    def validate(self) -> None:
        for name in ("seq_length", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ValueError("validation_fraction must be in (0, 0.5), "
                             f"got {self.validation_fraction}")


@dataclasses.dataclass
class PretrainResult:
    """Where the adapted encoder went, and how the run went."""

    encoder_path: str
    preprocessor_path: str
    tensorboard_dir: str
    initial: Dict[str, float]  # validation metrics before training
    final: Dict[str, float]  # validation metrics after training
    history: Dict[str, List[float]]  # per-epoch training and validation metrics
    steps: int
    seconds: float  # wall time of fit, including tracing and validation
    examples_per_second: float  # training steps only, first (tracing) step excluded


def pretraining_texts(tables: Tables) -> List[str]:
    """Catalog titles and descriptions and search queries, non-empty, de-duplicated."""
    columns = [tables.catalog["title"], tables.catalog["description"], tables.events["query"]]
    seen, texts = set(), []
    for column in columns:
        for value in column.astype(str):
            value = value.strip()
            if value and value not in seen:
                seen.add(value)
                texts.append(value)
    return texts


class WarmupLinearDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then linear decay to 0 at `total_steps` (BERT's schedule).

    Warm-up protects pretrained weights from large early updates of a fresh head.

    Args:
      peak: highest learning rate.
      warmup_steps: steps of the warm-up.
      total_steps: step at which the rate reaches 0.
    """

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps "
                             f"({total_steps})")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / float(max(1, self.warmup_steps))
        decay = self.peak * tf.maximum(0.0, (self.total_steps - step)
                                       / float(self.total_steps - self.warmup_steps))
        return tf.where(step < self.warmup_steps, warm, decay)

    def get_config(self) -> Dict[str, object]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}


class MaskedLMHead(tf.keras.layers.Layer):
    """Dense + GELU + LayerNorm, then logits against the (tied) word embedding table.

    Tying the output projection to the input embeddings, as BERT does, keeps the head
    small and makes the masked-LM gradient train the embeddings the encoder uses.

    Args:
      config: the encoder's hyper-parameters.
    """

    def __init__(self, config: BertConfig, **kwargs):
        super().__init__(**kwargs)
        self.transform = tf.keras.layers.Dense(
            config.hidden_size, activation=gelu, name="transform",
            kernel_initializer=tf.keras.initializers.TruncatedNormal(
                stddev=config.initializer_range))
        self.layer_norm = tf.keras.layers.LayerNormalization(
            epsilon=config.layer_norm_eps, name="layer_norm")
        self.vocab_size = config.vocab_size

    def build(self, input_shape) -> None:
        self.output_bias = self.add_weight("output_bias", shape=[self.vocab_size],
                                           initializer="zeros")
        super().build(input_shape)

    def call(self, hidden: tf.Tensor, word_embeddings: tf.Tensor) -> tf.Tensor:
        hidden = self.layer_norm(self.transform(hidden))
        return tf.matmul(hidden, word_embeddings, transpose_b=True) + self.output_bias


class MaskedLMModel(tf.keras.Model):
    """Encoder + masked-LM head, trained on the outputs of `mask_tokens`.

    Loss and accuracy are averaged over predicted tokens only (padding slots have
    weight 0) and logged as `mlm_loss` / `mlm_accuracy`.

    Args:
      encoder: a built BertEncoder (its weights are what gets exported).
    """

    def __init__(self, encoder: BertEncoder, **kwargs):
        kwargs.setdefault("name", "masked_lm")
        super().__init__(**kwargs)
        self.encoder = encoder
        self.head = MaskedLMHead(encoder.config, name="mlm_head")
        self.loss_tracker = tf.keras.metrics.Mean(METRICS[0])
        self.accuracy = tf.keras.metrics.SparseCategoricalAccuracy(METRICS[1])

    @property
    def metrics(self) -> List[tf.keras.metrics.Metric]:
        return [self.loss_tracker, self.accuracy]

    def call(self, features: Dict[str, tf.Tensor], training: Optional[bool] = None) -> tf.Tensor:
        inputs = {k: features[k] for k in ("input_word_ids", "input_mask", "input_type_ids")}
        sequence = self.encoder(inputs, training=training)["sequence_output"]
        hidden = tf.gather(sequence, features["masked_lm_positions"], batch_dims=1)
        return self.head(hidden, self.encoder.embeddings.word_embeddings)

    def _loss(self, features: Dict[str, tf.Tensor], logits: tf.Tensor) -> tf.Tensor:
        weights = features["masked_lm_weights"]
        losses = tf.keras.losses.sparse_categorical_crossentropy(
            features["masked_lm_ids"], logits, from_logits=True)
        return tf.math.divide_no_nan(tf.reduce_sum(losses * weights), tf.reduce_sum(weights))

    def _update_metrics(self, features, logits, loss) -> Dict[str, tf.Tensor]:
        weights = features["masked_lm_weights"]
        self.loss_tracker.update_state(loss, sample_weight=tf.reduce_sum(weights))
        self.accuracy.update_state(features["masked_lm_ids"], logits, sample_weight=weights)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, features):
        with tf.GradientTape() as tape:
            logits = self(features, training=True)
            loss = self._loss(features, logits)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        # The [CLS] pooler is not on the masked-LM path; it keeps its weights.
        self.optimizer.apply_gradients(
            [(g, v) for g, v in zip(gradients, variables) if g is not None])
        return self._update_metrics(features, logits, loss)

    def test_step(self, features):
        logits = self(features, training=False)
        return self._update_metrics(features, logits, self._loss(features, logits))


class _StepTimer(tf.keras.callbacks.Callback):
    """Wall time of training steps, without the first (which traces the graph)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.steps = 0
        self._seen = 0
        self._start = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self._seen > 1:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1


def _pack_all(preprocessor: BertPreprocessor, texts: Sequence[str], seq_length: int,
              batch: int = 1024) -> Dict[str, np.ndarray]:
    parts: Dict[str, List[np.ndarray]] = {}
    for i in range(0, len(texts), batch):
        packed = preprocessor.preprocess(tf.constant(list(texts[i:i + batch])), seq_length)
        for k, v in packed.items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _source_encoder(encoder_path: Optional[str], vocab_file: Optional[str],
                    texts: Sequence[str], config: PretrainConfig):
    """(encoder, vocab, casing, description) to start from."""
    if encoder_path:
        encoder, info = load_keras_encoder(encoder_path)
        vocab = read_vocab(vocab_path(encoder_path))
        casing = TextCasing(bool(info.get("lower_case", True)),
                            bool(info.get("keep_accents", False)))
        return encoder, vocab, casing, os.path.abspath(encoder_path)
    # From scratch: fold case, keep accents; CJK characters are their own words.
    casing = TextCasing(lower_case=True, keep_accents=True)
    if vocab_file:
        vocab = read_vocab(vocab_file)
    else:
        vocab = learn_wordpiece(texts, casing,
                                WordPieceOptions(vocab_size=config.scratch_vocab_size))
    bert = BertConfig(vocab_size=len(vocab), hidden_size=config.scratch_hidden,
                      num_layers=config.scratch_layers, num_heads=config.scratch_heads,
                      intermediate_size=4 * config.scratch_hidden,
                      max_position_embeddings=max(128, config.seq_length))
    return build_encoder(bert, seed=config.seed), vocab, casing, "scratch"


def _check_preprocessor(path: str, vocab: Sequence[str], casing: TextCasing) -> None:
    """Refuses a preprocessor whose ids would not mean the same tokens to the encoder."""
    info = read_export_info(path, PREPROCESSOR_KIND)
    same_casing = (info.get("lower_case") == casing.lower_case
                   and bool(info.get("keep_accents", False)) == casing.keep_accents)
    if read_vocab(vocab_path(path)) != list(vocab) or not same_casing:
        raise ValueError(f"preprocessor {path!r} does not match the encoder's vocabulary "
                         "or lower-casing")


def pretrain(data_dir: str, out_dir: str, encoder_path: Optional[str] = None,
             preprocessor_path: Optional[str] = None,
             config: Optional[PretrainConfig] = None, log_dir: str = "tensorboard_logs",
             run_name: Optional[str] = None, overwrite: bool = False,
             verbose: int = 0, vocab_file: Optional[str] = None) -> PretrainResult:
    """Runs masked-LM pretraining and exports the adapted encoder + preprocessor.

    Args:
      data_dir: tables (catalog titles/descriptions, event queries) to train on.
      out_dir: writes `out_dir/encoder`, `out_dir/preprocessor`, `out_dir/pretrain.json`.
      encoder_path: TF-Hub-format encoder to continue from; None trains a small encoder
        from scratch with a WordPiece vocabulary learned from the data (or `vocab_file`).
      preprocessor_path: its exported preprocessor, copied to `out_dir` (default: a new
        one is exported from the encoder's vocabulary).
      config: hyper-parameters.
      log_dir: TensorBoard root; the run logs to `log_dir/run_name/`.
      run_name: default `mlm-<timestamp>`.
      overwrite: replace existing exports in `out_dir`.
      verbose: Keras fit verbosity.
      vocab_file: from scratch only: vocab.txt to use (`tfrec text build-vocab`).

    Raises:
      ValueError: too few texts, mismatched preprocessor, or a vocabulary given
        together with an encoder (which brings its own).
    """
    config = config or PretrainConfig()
    config.validate()
    paths = [os.path.join(out_dir, "encoder"), os.path.join(out_dir, "preprocessor")]
    ensure_free(paths, overwrite)
    if preprocessor_path and not encoder_path:
        raise ValueError("preprocessor_path needs encoder_path: from scratch, the "
                         "vocabulary (and so the preprocessor) is built from the data")
    if vocab_file and encoder_path:
        raise ValueError("vocab_file is for training from scratch; an encoder brings its "
                         "own vocabulary (drop one of them)")
    tf.keras.utils.set_random_seed(config.seed)
    texts = pretraining_texts(load_tables(data_dir))
    if len(texts) < 4:
        raise ValueError(f"only {len(texts)} distinct texts in {data_dir!r}: too few to train")
    encoder, vocab, casing, source = _source_encoder(encoder_path, vocab_file, texts, config)
    if preprocessor_path:
        _check_preprocessor(preprocessor_path, vocab, casing)
    if config.seq_length > encoder.config.max_position_embeddings:
        raise ValueError(f"seq_length {config.seq_length} exceeds the encoder's "
                         f"max_position_embeddings {encoder.config.max_position_embeddings}")
    preprocessor = BertPreprocessor(vocab, lower_case=casing.lower_case,
                                    seq_length=config.seq_length,
                                    keep_accents=casing.keep_accents)

    order = np.random.default_rng(config.seed).permutation(len(texts))
    n_val = max(1, int(round(len(texts) * config.validation_fraction)))
    packed = _pack_all(preprocessor, [texts[i] for i in order], config.seq_length)
    train = {k: v[n_val:] for k, v in packed.items()}
    val = {k: v[:n_val] for k, v in packed.items()}
    special = preprocessor.special

    def corrupt(batch):
        return mask_tokens(batch, config.masking, len(vocab), special.mask, special.all())

    n_train = len(train["input_word_ids"])
    train_ds = (tf.data.Dataset.from_tensor_slices(train)
                .shuffle(n_train, seed=config.seed, reshuffle_each_iteration=True).repeat()
                .batch(config.batch_size, drop_remainder=True)
                .map(corrupt, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2))
    # Masks of the validation texts are drawn once and cached: before/after comparable.
    val_ds = (tf.data.Dataset.from_tensor_slices(val).batch(config.batch_size)
              .map(corrupt).cache())

    steps_per_epoch = config.steps_per_epoch or max(1, n_train // config.batch_size)
    total = steps_per_epoch * config.epochs
    peak = config.learning_rate or (1e-4 if encoder_path else 1e-3)
    schedule = WarmupLinearDecay(peak, int(total * config.warmup_fraction), total)
    optimizer = tf.keras.optimizers.AdamW(learning_rate=schedule,
                                          weight_decay=config.weight_decay, global_clipnorm=1.0)
    optimizer.exclude_from_weight_decay(var_names=["layer_norm", "bias"])
    model = MaskedLMModel(encoder)
    model.compile(optimizer=optimizer)

    run_name = run_name or datetime.datetime.now().strftime("mlm-%Y%m%d-%H%M%S")
    tb_dir = os.path.join(log_dir, run_name)
    initial = model.evaluate(val_ds, verbose=0, return_dict=True)
    timer = _StepTimer()
    start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
        validation_data=val_ds, verbose=verbose,
        callbacks=[timer, tf.keras.callbacks.TensorBoard(tb_dir, update_freq="epoch",
                                                         write_graph=False, profile_batch=0)])
    seconds = time.perf_counter() - start
    final = model.evaluate(val_ds, verbose=0, return_dict=True)
    log.info("masked LM: validation loss %.4f -> %.4f, accuracy %.4f -> %.4f",
             initial["mlm_loss"], final["mlm_loss"], initial["mlm_accuracy"],
             final["mlm_accuracy"])

    description = f"masked-LM adapted from {source} on {os.path.abspath(data_dir)}"
    encoder_out = export_encoder(encoder, paths[0], vocab, casing.lower_case,
                                 overwrite=overwrite, source=description,
                                 keep_accents=casing.keep_accents)
    if preprocessor_path:
        preprocessor_out = save_dir_atomic(
            paths[1], overwrite, lambda tmp: shutil.copytree(preprocessor_path, tmp))
    else:
        preprocessor_out = export_preprocessor(vocab, paths[1], lower_case=casing.lower_case,
                                               seq_length=config.seq_length,
                                               overwrite=overwrite, source=description,
                                               keep_accents=casing.keep_accents)
    result = PretrainResult(
        encoder_path=encoder_out, preprocessor_path=preprocessor_out,
        tensorboard_dir=os.path.abspath(tb_dir),
        initial={k: float(v) for k, v in initial.items()},
        final={k: float(v) for k, v in final.items()},
        history={k: [float(x) for x in v] for k, v in history.history.items()},
        steps=total, seconds=seconds,
        examples_per_second=timer.steps * config.batch_size / max(timer.seconds, 1e-9))
    summary = dict(dataclasses.asdict(result), config=dataclasses.asdict(config),
                   texts=len(texts), source=source)
    _write_json(os.path.join(out_dir, "pretrain.json"), summary)
    return result


def _write_json(path: str, payload: Dict[str, object]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=str)

    atomic_write(path, write)
