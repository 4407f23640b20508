"""On-device export: the query tower, the catalog's embeddings and a top-k as TFLite.

Phones and edge boxes run TFLite's builtin ops only (no TF kernels, no TF Text), so text
is tokenised by the caller (`text_tokens`, settings in the model card) and history
pooling is dense. Two files per version: float32, and int8 dynamic-range weights with
one scale per tensor (under a third of the size; activations stay float).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Sequence

import numpy as np
import pandas as pd

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import ExportConfig
from tfrec.data.feature_spec import catalog_features
from tfrec.features.layers import dense_pooling, text_tokens
from tfrec.metrics.retrieval import embed_in_batches
from tfrec.models.embedding import tower_fn
from tfrec.models.retrieval import TwoTowerModel
from tfrec.export.versioned import write_json, write_versioned

EDGE_VARIANTS = ("float32", "int8")
CARD = "tfrec_edge.json"
DEFAULT_K = 20
# Score of "no result" (the converter turns -inf into this anyway).
MISSING = float(np.finfo(np.float32).min)


def edge_model_name(model_name: str) -> str:
    """Directory of a retrieval model's on-device export (beside its SavedModels)."""
    return f"{model_name}_tflite"


def _query_specs(model: TwoTowerModel) -> Dict[str, tf.TensorSpec]:
    """The query tower's inputs with `query` text replaced by its tokens."""
    specs = dict(model.query_tower.input_specs)
    text = getattr(model.query_tower, "text", None)
    if "query" in specs and isinstance(text, tf.keras.layers.Layer):
        del specs["query"]
        specs["query_words"] = tf.TensorSpec([None, text.max_length], tf.string,
                                             name="query_words")
        if text.ngram_bins > 0:
            specs["query_grams"] = tf.TensorSpec([None, None], tf.int64, name="query_grams")
    specs["exclude_seen"] = tf.TensorSpec([None], tf.bool, name="exclude_seen")
    return specs


class EdgeModule(tf.Module):
    """`recommend` (query features -> top k items) and `similar_items` (item -> top k)
    with TFLite builtin ops only.

    Args:
      model: trained two-tower model (ids from vocabularies: hashed user ids need a
        TF kernel TFLite does not have).
      catalog: items that can be returned.
      k: results per request (fixed in the graph, as an app's screen is).

    Raises:
      ValueError: empty catalog, k < 1, or a model with hashed user ids.
    """

    def __init__(self, model: TwoTowerModel, catalog: pd.DataFrame, k: int = DEFAULT_K):
        super().__init__(name="tfrec_edge")
        if len(catalog) < 2:
            raise ValueError("an on-device export needs a catalog of at least 2 items")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        user = getattr(model.query_tower, "user", None)
        if user is not None and user.oov_row is None:
            raise ValueError("model.user_hash_bins > 0: hashing user ids needs a TF kernel "
                             "TFLite lacks; train with user_hash_bins=0 (a vocabulary) "
                             "or leave user_id out of model.query_features")
        features = catalog_features(catalog, model)
        embeddings = embed_in_batches(tower_fn(model.candidate_tower), features)
        self.query_tower = model.query_tower
        self.num_items = len(catalog)
        self.k = min(int(k), self.num_items - 1)
        self.embeddings = tf.constant(embeddings.astype(np.float32))
        ids = features["item_id"].astype(str)
        # Row N is "": rows with no result point there (TFLite selects no strings).
        self.item_ids = tf.constant(np.append(ids, ""))
        self.item_index = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids),
                                                tf.range(self.num_items, dtype=tf.int64)),
            default_value=-1)  # int64 values: TFLite's HASHTABLE maps string -> int64
        specs = _query_specs(model)
        # Kept as JSON: a dict attribute of a tf.Module becomes a tracked wrapper.
        self._card = json.dumps(self._describe(specs))
        # Signature keys of the .tflite are the wrapped methods' names.
        self.recommend_fn = tf.function(self.recommend, input_signature=[specs])
        self.similar_items_fn = tf.function(
            self.similar_items,
            input_signature=[tf.TensorSpec([None], tf.string, name="item_id")])

    def _query(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
        inputs = {}
        with dense_pooling():
            for key, layer, get in self.query_tower.parts:
                if key == "query":
                    tokens = {"words": features["query_words"]}
                    if "query_grams" in features:
                        tokens["grams"] = features["query_grams"]
                    inputs[key] = layer.token_ids(tokens)
                else:
                    inputs[key] = layer.preprocess(get(features))
            return self.query_tower.encode(inputs, training=False)

    def _top_k(self, query: tf.Tensor, blocked: tf.Tensor) -> Dict[str, tf.Tensor]:
        """Top k rows by dot product, leaving out `blocked` [B, H] rows (-1: none); rows
        past the results are N (the "" id)."""
        scores = tf.matmul(query, self.embeddings, transpose_b=True)
        # Take k + H, drop blocked hits, keep the best k: no [B, N] mask is built.
        width = tf.minimum(self.k + tf.shape(blocked)[1], self.num_items)
        values, rows = tf.math.top_k(scores, width)
        hit = tf.reduce_any(tf.equal(tf.expand_dims(rows, -1), tf.expand_dims(blocked, 1)),
                            axis=-1)
        values = tf.where(hit, tf.fill(tf.shape(values), MISSING), values)
        values, order = tf.math.top_k(values, self.k)
        rows = tf.gather(rows, order, batch_dims=1)
        return {"rows": tf.where(values > MISSING, rows, self.num_items), "scores": values}

    def recommend(self, features: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        query = self._query(features)
        seen = tf.cast(self.item_index.lookup(features["history"]), tf.int32)
        blocked = tf.where(tf.expand_dims(features["exclude_seen"], -1), seen,
                           tf.fill(tf.shape(seen), -1))
        top = self._top_k(query, blocked)
        return {"item_ids": tf.gather(self.item_ids, top["rows"]), "scores": top["scores"],
                "embedding": query}

    def similar_items(self, item_id: tf.Tensor) -> Dict[str, tf.Tensor]:
        row = tf.cast(self.item_index.lookup(item_id), tf.int32)
        query = tf.gather(self.embeddings, tf.maximum(row, 0))
        out = self._top_k(query, tf.expand_dims(row, -1))  # an item is not similar to itself
        known = tf.expand_dims(row >= 0, -1)  # unknown ids answer nothing
        rows = tf.where(known, out["rows"], self.num_items)
        return {"item_ids": tf.gather(self.item_ids, rows),
                "scores": tf.where(known, out["scores"], MISSING)}

    def convert(self, variant: str) -> bytes:
        """The TFLite flatbuffer of both signatures ("float32" or "int8" weights).

        Raises:
          ValueError: an unknown variant.
        """
        if variant not in EDGE_VARIANTS:
            raise ValueError(f"unknown TFLite variant {variant!r}; choose among {EDGE_VARIANTS}")
        functions = [self.recommend_fn.get_concrete_function(),
                     self.similar_items_fn.get_concrete_function()]
        converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, self)
        if variant == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range weights
            # One scale per tensor: per-row scales and int64 zero points cost an embedding
            # row 12 bytes beside its 64 int8 ones (int8 file 0.33x of float32 -> 0.29x;
            # top-10 overlap with float32 0.992 -> 0.988 on the small world).
            converter._experimental_disable_per_channel = True
        return converter.convert()

    def _describe(self, specs: Dict[str, tf.TensorSpec]) -> dict:
        card = {"k": self.k, "num_items": self.num_items,
                "embedding_dim": int(self.embeddings.shape[1]),
                "inputs": {name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}
                           for name, spec in specs.items()},
                "signatures": ["recommend", "similar_items"]}
        if "query_words" in specs:
            text = self.query_tower.text
            card["text"] = {"max_length": text.max_length, "ngram_bins": text.ngram_bins,
                            "tokenizer": "tfrec.features.layers.text_tokens",
                            "grams_hash": "FarmHash Fingerprint64 mod ngram_bins "
                                          "(tf.strings.to_hash_bucket_fast)"}
        return card

    def card(self) -> dict:
        """What an app needs beside the file: inputs, k and the text tokenisation."""
        return json.loads(self._card)


def export_edge(run_dir: str, catalog: pd.DataFrame, export: ExportConfig, model=None,
                k: int = DEFAULT_K) -> str:
    """Writes `<base>/<model_name>_tflite/<version>/` with `float32.tflite`,
    `int8.tflite` and the card `tfrec_edge.json`, atomically; returns that dir.

    Args:
      run_dir: training run directory.
      catalog: items the device may return.
      export: base dir, model name and optional version.
      model: an already-loaded model of that run.
      k: results per request.
    """
    from tfrec.training.trainer import load_trained_model

    if model is None:
        model, _, _ = load_trained_model(run_dir)
    module = EdgeModule(model, catalog, k=k)
    card = {"model": "two_tower_edge", "run_dir": os.path.abspath(run_dir),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **module.card()}

    def write(tmp: str) -> None:
        os.makedirs(tmp)
        for variant in EDGE_VARIANTS:
            data = module.convert(variant)
            with open(os.path.join(tmp, f"{variant}.tflite"), "wb") as f:
                f.write(data)
            card.setdefault("bytes", {})[variant] = len(data)
        write_json(tmp, {CARD: card})

    return write_versioned(export.base_dir, edge_model_name(export.model_name),
                           export.version, write)


class EdgeRecommender:
    """Runs an on-device export with the LiteRT interpreter (`ai-edge-litert`), taking raw
    text: the reference client of the file, and what the tests and bench compare.

    Args:
      version_dir: a directory written by `export_edge`.
      variant: "float32" or "int8".
      threads: interpreter threads.

    Raises:
      ImportError: ai-edge-litert is not installed (`pip install tfrec[edge]`).
      FileNotFoundError: no such export.
    """

    def __init__(self, version_dir: str, variant: str = "float32", threads: int = 1):
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("running TFLite models needs ai-edge-litert: "
                              "pip install 'tfrec[edge]'") from e
        path = os.path.join(version_dir, f"{variant}.tflite")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {variant} TFLite model at {path} (variants: "
                                    f"{EDGE_VARIANTS}; written by tfrec export --format tflite)")
        with open(os.path.join(version_dir, CARD)) as f:
            self.card = json.load(f)
        # Hybrid int8 kernels are the builtin reference ones; XNNPACK may refuse them.
        resolver = (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if variant == "int8"
                    else OpResolverType.AUTO)
        self.interpreter = Interpreter(model_path=path, num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        self._recommend = self.interpreter.get_signature_runner("recommend")
        self._similar = self.interpreter.get_signature_runner("similar_items")

    def inputs(self, features: Dict[str, Sequence], exclude_seen: bool = True
               ) -> Dict[str, np.ndarray]:
        """Raw query features (as the SavedModel takes them) -> the file's inputs.

        Raises:
          ValueError: a feature the file needs is missing.
        """
        needed = [n for n in self.card["inputs"]
                  if n not in ("query_words", "query_grams", "exclude_seen")]
        missing = [n for n in needed if n not in features]
        if missing or not features:
            raise ValueError(f"missing query feature(s) {missing}; this model reads {needed} "
                             "(+ query text)")
        n = len(next(iter(features.values())))
        out = {}
        for name, spec in self.card["inputs"].items():
            if name in ("query_words", "query_grams"):
                continue
            if name == "exclude_seen":
                out[name] = np.full(n, exclude_seen)
            else:
                out[name] = np.asarray(features[name], dtype=object if spec["dtype"] == "string"
                                       else spec["dtype"])
                if out[name].ndim == 2 and out[name].shape[1] == 0:  # LiteRT: no [B, 0]
                    out[name] = np.full((len(out[name]), 1), "", dtype=object)
        if "text" in self.card:
            texts = list(features["query"]) if "query" in features else [""] * n
            tokens = text_tokens(tf.constant(texts, tf.string),
                                 self.card["text"]["max_length"],
                                 self.card["text"]["ngram_bins"])
            out["query_words"] = tokens["words"].numpy()
            if "grams" in tokens:
                grams = tokens["grams"].numpy()
                # LiteRT cannot run a [B, 0] input: an all-padding column instead.
                out["query_grams"] = grams if grams.shape[1] else np.full((len(grams), 1), -1)
        return out

    def recommend(self, features: Dict[str, Sequence], exclude_seen: bool = True
                  ) -> Dict[str, np.ndarray]:
        """Top k for a batch of raw query features: item_ids, scores, embedding."""
        return self._recommend(**self.inputs(features, exclude_seen))

    def similar_items(self, item_ids: Sequence[str]) -> Dict[str, np.ndarray]:
        """Top k similar items of each id ("" / `MISSING` rows for unknown ids)."""
        return self._similar(item_id=np.asarray(item_ids, dtype=object))
