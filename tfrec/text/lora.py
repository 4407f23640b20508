"""Low-rank adapters (LoRA) on the projections of a Keras `BertEncoder`.

Fine-tuning all of BERT updates (and keeps optimizer slots for) every weight; a LoRA
adapter learns W + (alpha / r) A B with A [in, r], B [r, out] and W frozen, well under
1% of the weights. `merge_lora` folds A B into W after training, so the served graph is
the plain encoder: serving pays nothing for the adapters.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.text.bert import BertEncoder, dummy_inputs

__all__ = ["LORA_TARGETS", "LoRADense", "add_lora", "merge_lora", "lora_layers"]

# Projection name -> (sub-layer path in a TransformerBlock). "output" is the feed-forward
# output; "attention_output" the attention's.
LORA_TARGETS = {"query": ("attention", "query"), "key": ("attention", "key"),
                "value": ("attention", "value"),
                "attention_output": ("attention", "output_dense"),
                "intermediate": ("intermediate",), "output": ("output_dense",)}


class LoRADense(tf.keras.layers.Layer):
    """A frozen Dense plus a trainable low-rank update: act(x W + b + scale * (x A) B).

    B starts at zero, so the adapted encoder starts as the pretrained one.

    Args:
      base: the Dense layer to adapt (built; it is frozen here).
      rank: r, the adapter's inner width.
      alpha: scale numerator (scale = alpha / rank).
      dropout: dropout on the adapter's input while training.
      seed: initializer seed of A.

    Raises:
      ValueError: rank < 1, alpha <= 0 or dropout outside [0, 1).
    """

    def __init__(self, base: tf.keras.layers.Dense, rank: int, alpha: float = 16.0,
                 dropout: float = 0.0, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.trainable = False
        self.rank, self.alpha, self.dropout_rate = rank, float(alpha), float(dropout)
        self.scale = self.alpha / rank
        self.seed = seed
        self.dropout = tf.keras.layers.Dropout(dropout, seed=seed)
        # Python flag, read while tracing: a merged layer's graph has no adapter ops.
        self.merged = False

    def build(self, input_shape) -> None:
        fan_in, fan_out = int(self.base.kernel.shape[0]), int(self.base.kernel.shape[1])
        self.lora_a = self.add_weight(
            "lora_a", shape=(fan_in, self.rank),
            initializer=tf.keras.initializers.HeUniform(seed=self.seed))
        self.lora_b = self.add_weight("lora_b", shape=(self.rank, fan_out),
                                      initializer="zeros")
        super().build(input_shape)

    def call(self, x: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        base = self.base
        out = tf.tensordot(x, base.kernel, axes=1)
        if base.use_bias:
            out = tf.nn.bias_add(out, base.bias)
        if not self.merged:
            # Before the activation: the update is to the weights, W + scale A B.
            low = tf.tensordot(self.dropout(x, training=training), self.lora_a, axes=1)
            out += self.scale * tf.tensordot(low, self.lora_b, axes=1)
        return base.activation(out) if base.activation is not None else out

    def merge(self) -> None:
        """Folds the update into the base kernel and zeroes B (so a reload of the merged
        weights into an adapted encoder counts it once)."""
        if not self.built:
            raise ValueError("cannot merge a LoRA layer before it has run once")
        self.base.kernel.assign_add(self.scale * tf.matmul(self.lora_a, self.lora_b))
        self.lora_b.assign(tf.zeros_like(self.lora_b))
        self.merged = True

    def get_config(self) -> Dict[str, object]:
        return {**super().get_config(), "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout_rate, "seed": self.seed}


def add_lora(encoder: BertEncoder, rank: int, alpha: float = 16.0,
             targets: Sequence[str] = ("query", "value"), top_layers: int = 0,
             dropout: float = 0.0, seed: int = 0) -> List[LoRADense]:
    """Adapts `targets` projections of the last `top_layers` blocks (0: all) of a built
    encoder in place and freezes every other weight.

    Returns:
      The adapters, in block order.

    Raises:
      ValueError: an unknown target, none given, or top_layers out of range.
    """
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: choose one or more of "
                         f"{list(LORA_TARGETS)}")
    blocks = encoder.blocks
    if not 0 <= top_layers <= len(blocks):
        raise ValueError(f"top_layers={top_layers} but the encoder has {len(blocks)} blocks "
                         "(0 adapts all)")
    adapters = []
    for i, block in enumerate(blocks[len(blocks) - (top_layers or len(blocks)):]):
        for target in targets:
            *path, attr = LORA_TARGETS[target]
            owner = block
            for step in path:
                owner = getattr(owner, step)
            adapter = LoRADense(getattr(owner, attr), rank, alpha, dropout,
                                seed=seed + 7 * i + len(adapters), name=f"{attr}_lora")
            setattr(owner, attr, adapter)
            adapters.append(adapter)
    with tf.init_scope():  # creates the adapters' weights now, named under the encoder
        encoder(dummy_inputs(), training=False)
    _train_only(encoder, adapters)
    return adapters


def _train_only(encoder: tf.keras.layers.Layer, adapters: List["LoRADense"]) -> None:
    """Freezes every layer of `encoder` that holds no adapter, and the adapters' bases.

    Keras collects trainable weights top-down and stops at a frozen layer, so the
    adapters' ancestors stay trainable and everything else is switched off.
    """
    encoder.trainable = True
    holders = {id(a) for a in adapters}
    for layer in encoder.submodules:
        if not isinstance(layer, tf.keras.layers.Layer):
            continue
        if isinstance(layer, LoRADense):
            layer.base.trainable = False
        elif id(layer) not in holders and not any(
                isinstance(sub, LoRADense) for sub in layer.submodules):
            layer.trainable = False


def lora_layers(model: tf.keras.layers.Layer) -> List[LoRADense]:
    """The LoRA adapters inside `model`."""
    return [layer for layer in model.submodules if isinstance(layer, LoRADense)]


def merge_lora(model: tf.keras.layers.Layer) -> int:
    """Merges every adapter of `model` into its base weights; returns how many."""
    adapters = lora_layers(model)
    for adapter in adapters:
        adapter.merge()
    return len(adapters)
