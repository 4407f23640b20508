"""DP-SGD for the two-tower model: per-example clipping and Gaussian noise.

In-batch negatives make one example's loss depend on the others in its batch, so clipping
would not bound its influence; under DP each example is scored against a shared sample
of catalog items (public data) instead, and its loss depends on its own data only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.features.layers import IdEmbedding, dense_pooling
from tfrec.models.retrieval import NEGATIVES, PREPROCESSED, TwoTowerModel

# Added to the logit of a sampled negative that is the example's own positive.
_MASKED = -1e9


def with_id_dropout(tower: tf.keras.Model, inputs: Mapping[str, Any]) -> Dict[str, Any]:
    """Id dropout of `tower`'s id parts, drawn once on its preprocessed inputs.

    The clipping weights must come from the gradients the update uses, so the random
    ids dropped are fixed before the norm pass and reused by the update pass.
    """
    out = dict(inputs)
    for key, layer, _ in tower.parts:
        if isinstance(layer, IdEmbedding) and layer.dropout > 0:
            out[key] = layer.drop(inputs[key], training=True)
    return out


def sampled_softmax_losses(model: TwoTowerModel, features: Mapping[str, Any],
                           negatives: Mapping[str, Any]) -> tf.Tensor:
    """[B] softmax cross-entropy of each positive against the shared sampled negatives.

    A negative that is the example's own positive (same `item_key`) is masked out. The
    negatives are uniform catalog samples: no logQ correction is needed.

    Args:
      model: the two-tower model (temperature from its config).
      features: a preprocessed batch ("query_inputs", "candidate_inputs", optional
        "item_key" and "weight").
      negatives: {"candidate_inputs": ..., "item_key": [S]} of the sampled catalog items.
    """
    query = model.query_tower.encode(features["query_inputs"], training=False)
    positive = model.candidate_tower.encode(features[PREPROCESSED], training=False)
    sampled = model.candidate_tower.encode(negatives[PREPROCESSED], training=False)
    temperature = tf.constant(model.config.temperature, tf.float32)
    pos = tf.reduce_sum(query * positive, axis=1, keepdims=True) / temperature
    neg = tf.matmul(query, sampled, transpose_b=True) / temperature
    if "item_key" in features and "item_key" in negatives:
        hit = tf.equal(features["item_key"][:, tf.newaxis], negatives["item_key"][tf.newaxis, :])
        neg += tf.cast(hit, neg.dtype) * _MASKED
    losses = -tf.nn.log_softmax(tf.concat([pos, neg], axis=1), axis=1)[:, 0]
    if "weight" in features:
        losses *= tf.cast(tf.reshape(features["weight"], [-1]), losses.dtype)
    return losses


def _register_resource_gather() -> bool:
    """Teaches pfor to vectorise reads of embedding rows (ResourceGather).

    TensorFlow has no converter for it and runs each example's lookups in a while loop
    (~500x slower than the vectorised pass on the tiny world). Rows of a loop-invariant
    table at stacked indices are one gather at all the indices. Uses pfor's registry
    (TF-internal): when it moves, the loop fallback keeps results exact, only slower.
    """
    try:
        from tensorflow.python.ops import gen_resource_variable_ops
        from tensorflow.python.ops.parallel_for import pfor
    except ImportError:  # pragma: no cover - depends on the TensorFlow version
        return False
    if "ResourceGather" in getattr(pfor, "_pfor_converter_registry", {}):
        return True

    @pfor.RegisterPFor("ResourceGather")
    def _convert(pfor_input):
        resource, resource_stacked, _ = pfor_input.input(0)
        indices, indices_stacked, _ = pfor_input.input(1)
        if resource_stacked or pfor_input.get_attr("batch_dims") != 0:
            raise ValueError("ResourceGather of a per-iteration table is not vectorised")
        output = gen_resource_variable_ops.resource_gather(
            resource, indices, dtype=pfor_input.get_attr("dtype"),
            validate_indices=pfor_input.get_attr("validate_indices"))
        return pfor.wrap(output, indices_stacked)

    return True


_VECTORISED_GATHER = _register_resource_gather()


def _squared_norm(grad: Any) -> tf.Tensor:
    """Squared L2 norm of a gradient; IndexedSlices stay sparse, duplicate rows merged.

    Rows are merged by sorting (not tf.unique) so the computation vectorises in pfor.
    """
    if grad is None:
        return tf.constant(0.0)
    if not isinstance(grad, tf.IndexedSlices):
        return tf.reduce_sum(tf.square(tf.cast(grad, tf.float32)))
    indices = tf.reshape(grad.indices, [-1])
    n = tf.shape(indices)[0]
    values = tf.reshape(tf.cast(grad.values, tf.float32), [n, -1])
    order = tf.argsort(indices)
    indices, values = tf.gather(indices, order), tf.gather(values, order)
    starts = tf.concat([tf.ones([1], tf.int32),
                        tf.cast(tf.not_equal(indices[1:], indices[:-1]), tf.int32)], axis=0)
    rows = tf.math.unsorted_segment_sum(values, tf.cumsum(starts) - 1, n)
    return tf.reduce_sum(tf.square(rows))


def per_example_norms(loss_fn: Callable[[Any], tf.Tensor], examples: Any,
                      variables: Sequence[tf.Variable], chunk: int = 32) -> tf.Tensor:
    """[B] L2 norm of the gradient of each example's loss over `variables`.

    Vectorised over examples (pfor) in chunks of `chunk`, which bound the memory of the
    per-example sparse gradients; embedding gradients are never made dense.

    Args:
      loss_fn: a batch of examples (leading axis) -> [n] per-example losses.
      examples: nested structure of tensors with a leading batch axis.
      variables: the variables whose gradient is clipped.
      chunk: examples per vectorised call.
    """

    def one(example):
        batch = tf.nest.map_structure(lambda t: tf.expand_dims(t, 0), example)
        with tf.GradientTape() as tape:
            with dense_pooling():  # gathers and sums: ops pfor vectorises
                loss = tf.reduce_sum(loss_fn(batch))
        grads = tape.gradient(loss, variables)
        return tf.sqrt(tf.add_n([_squared_norm(g) for g in grads]))

    size = tf.shape(tf.nest.flatten(examples)[0])[0]

    def body(start, norms):
        end = tf.minimum(start + chunk, size)
        part = tf.nest.map_structure(lambda t: t[start:end], examples)
        return end, norms.write(start // chunk, tf.vectorized_map(one, part))

    _, norms = tf.while_loop(lambda start, _: start < size, body,
                             (tf.constant(0), tf.TensorArray(tf.float32, size=0,
                                                              dynamic_size=True,
                                                              infer_shape=False)))
    return norms.concat()


def noisy_clipped_mean(loss_fn: Callable[[Any], tf.Tensor], examples: Any,
                       variables: Sequence[tf.Variable], l2_clip: float,
                       noise_multiplier: float, chunk: int = 16
                       ) -> Tuple[List[tf.Tensor], tf.Tensor, tf.Tensor]:
    """DP-SGD gradient: (sum of per-example gradients clipped to `l2_clip` + N(0, (sigma
    C)^2) noise on every coordinate) / batch size.

    The clipped sum is the gradient of sum_i min(1, C / ||g_i||) * loss_i with the factors
    held constant: one ordinary (sparse) backward pass after the norm pass. The noise is
    dense on every variable, embedding tables included: inherent to DP-SGD.

    Args:
      loss_fn: a batch of examples -> [n] per-example losses; deterministic (the two
        passes must see the same gradients).
      examples: nested tensors with a leading batch axis.
      variables: trainable variables.
      l2_clip: C, the bound on each example's gradient norm.
      noise_multiplier: sigma; the noise std is sigma * C.
      chunk: examples per vectorised norm pass.

    Returns:
      (gradients aligned with `variables`, [B] norms before clipping, [B] losses).
    """
    norms = per_example_norms(loss_fn, examples, variables, chunk)
    scale = tf.stop_gradient(tf.minimum(1.0, l2_clip / tf.maximum(norms, 1e-12)))
    with tf.GradientTape() as tape:
        losses = loss_fn(examples)
        total = tf.reduce_sum(scale * losses)
    grads = tape.gradient(total, variables)
    size = tf.cast(tf.shape(norms)[0], tf.float32)
    out = []
    for grad, var in zip(grads, variables):
        dense = tf.zeros(var.shape, tf.float32) if grad is None else tf.convert_to_tensor(grad)
        noise = tf.random.normal(var.shape, stddev=noise_multiplier * l2_clip)
        out.append((dense + noise) / size)
    return out, norms, losses


class DPTwoTowerModel(TwoTowerModel):
    """Two-tower model whose training step is DP-SGD over sampled catalog negatives.

    Each training batch carries `NEGATIVES` (uniform catalog samples, see
    `tfrec.training.negatives`); evaluation keeps the in-batch loss of `TwoTowerModel`.

    Args:
      vocab, config, precision, features: as `TwoTowerModel` (precision must be float32).
      l2_clip: per-example gradient norm bound C.
      noise_multiplier: sigma (noise std sigma * C on every coordinate of the sum).
      chunk: examples per vectorised per-example-gradient pass.
    """

    def __init__(self, vocab, config, precision: str = "float32", features=None, *,
                 l2_clip: float, noise_multiplier: float, chunk: int = 16, **kwargs):
        if precision != "float32":
            raise ValueError(f"DP-SGD needs float32 towers, got precision {precision!r}; "
                             "set train.mixed_precision: float32")
        super().__init__(vocab, config, precision=precision, features=features, **kwargs)
        self.l2_clip = float(l2_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.chunk = int(chunk)
        self.clipped_tracker = tf.keras.metrics.Mean(name="dp_clipped")

    @property
    def metrics(self):
        return super().metrics + [self.clipped_tracker]

    def train_step(self, features):
        if NEGATIVES not in features:
            raise ValueError("a DP training batch needs sampled catalog negatives "
                             f"({NEGATIVES!r}; see tfrec.training.negatives.with_negatives)")
        negatives = dict(features[NEGATIVES])
        negatives[PREPROCESSED] = with_id_dropout(self.candidate_tower, negatives[PREPROCESSED])
        examples = {k: v for k, v in features.items() if k not in (NEGATIVES, "candidate_prob")}
        examples["query_inputs"] = with_id_dropout(self.query_tower, examples["query_inputs"])
        examples[PREPROCESSED] = with_id_dropout(self.candidate_tower, examples[PREPROCESSED])
        grads, norms, losses = noisy_clipped_mean(
            lambda batch: sampled_softmax_losses(self, batch, negatives), examples,
            self.trainable_variables, self.l2_clip, self.noise_multiplier, self.chunk)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.clipped_tracker.update_state(tf.cast(norms > self.l2_clip, tf.float32))
        return self._track(tf.reduce_sum(losses), examples)

    def test_step(self, features):
        logs = super().test_step(features)
        logs.pop(self.clipped_tracker.name, None)  # a training-only figure
        return logs
