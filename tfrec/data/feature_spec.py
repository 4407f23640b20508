"""One declaration per model feature, from which everything that names a feature derives.

The TFRecord parsing spec, the serving signatures, the catalog columns a model reads,
the dummy batch that builds a model, the vocabularies and the cache key of prepared
data all come from a `FeatureSpec`, so an extra catalog column is configuration
(`features.item_categorical`, `features.item_numeric`), not code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

import tfrec  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf

from tfrec.config import FeaturesConfig
from tfrec.data.schema import CATALOG_SCHEMA, PAD, SchemaError, is_missing

SIDES = ("query", "context", "candidate")
KINDS = ("id", "categorical", "text", "numeric", "sequence")
DTYPES = {"string": tf.string, "int": tf.int64, "float": tf.float32}
# How a raw value becomes model input. Each runs as a Keras layer, inside the model
# (serving takes raw values) or in tf.data (training on integer tensors).
PREPROCESSING = ("lookup", "hash", "tokenize", "normalize", "bucketize", "none")
# Example columns that are not model inputs: loss weight, logQ sampling rate, time.
EXAMPLE_EXTRAS = {"weight": "float", "candidate_prob": "float", "ts": "int"}
# Names the models derive themselves (the ranker's catalog lookup): not declarable.
DERIVED = ("row", "department", "relative_price", "popularity", "recent_popularity", "age_days")


@dataclass(frozen=True)
class Feature:
    """A model input: its name, side, type, default and preprocessing.

    Args:
      name: input name (a catalog column for candidate features).
      side: "query" (who asks), "context" (when and where) or "candidate" (the item).
      kind: id / categorical / text / numeric / sequence (sequence: item ids, "" padded).
      dtype: "string", "int" or "float" (of one element for sequences).
      default: value of a missing entry.
      preprocessing: one of PREPROCESSING.
      dim: embedding size where a generic encoder embeds it (0: its own layer does).
      extra: declared in the config (an extra catalog column) rather than built in.
    """

    name: str
    side: str
    kind: str
    dtype: str
    default: Any
    preprocessing: str = "none"
    dim: int = 0
    extra: bool = False

    def __post_init__(self):
        for field_name, allowed in (("side", SIDES), ("kind", KINDS),
                                    ("dtype", tuple(sorted(DTYPES))),
                                    ("preprocessing", PREPROCESSING)):
            value = getattr(self, field_name)
            if value not in allowed:
                raise ValueError(f"feature {self.name!r}: {field_name} must be one of "
                                 f"{allowed}, got {value!r}")

    @property
    def tf_dtype(self) -> tf.DType:
        return DTYPES[self.dtype]

    def tensor_spec(self) -> tf.TensorSpec:
        """Batch-first input signature ([B] or [B, H] for sequences)."""
        shape = [None, None] if self.kind == "sequence" else [None]
        return tf.TensorSpec(shape, self.tf_dtype, name=self.name)

    def parse_spec(self):
        """tf.Example parsing spec (sequences are variable length)."""
        if self.kind == "sequence":
            return tf.io.RaggedFeature(self.tf_dtype)
        return tf.io.FixedLenFeature([], self.tf_dtype)


def _builtin(dims: Mapping[str, int]) -> Tuple[Feature, ...]:
    return (
        Feature("user_id", "query", "id", "string", "", "lookup"),
        Feature("history", "query", "sequence", "string", PAD, "lookup"),
        Feature("query", "query", "text", "string", "", "tokenize"),
        Feature("device", "context", "categorical", "string", "", "lookup", dims["device"]),
        Feature("hour", "context", "categorical", "int", 0, "none", dims["hour"]),
        Feature("item_id", "candidate", "id", "string", "", "lookup"),
        Feature("title", "candidate", "text", "string", "", "tokenize"),
        Feature("category", "candidate", "categorical", "string", "", "lookup",
                dims["category"]),
        Feature("brand", "candidate", "categorical", "string", "", "lookup", dims["brand"]),
        Feature("price", "candidate", "numeric", "float", 0.0, "bucketize", dims["price"]),
    )


@dataclass
class FeatureSpec:
    """The features of the recommendation models, built-in plus declared extras.

    Args:
      features: every feature, in input order (query, context, candidate).
      department_dim: embedding size of the category path's first level (derived).
    """

    features: Tuple[Feature, ...]
    department_dim: int = 8
    _by_name: Dict[str, Feature] = field(init=False, repr=False)

    def __post_init__(self):
        self._by_name = {}
        for f in self.features:
            if f.name in self._by_name:
                raise ValueError(f"feature {f.name!r} is declared twice")
            self._by_name[f.name] = f

    @classmethod
    def from_config(cls, config: Any = None) -> "FeatureSpec":
        """Built-in features plus `config.item_categorical` / `item_numeric` columns.

        Args:
          config: a `tfrec.config.FeaturesConfig` (None: defaults, no extras).

        Raises:
          ValueError: an extra column clashes with a built-in feature or table column.
        """
        config = config or FeaturesConfig()
        dims = {"device": config.device_dim, "hour": config.hour_dim,
                "category": config.category_dim, "brand": config.brand_dim,
                "price": config.price_dim}
        features = list(_builtin(dims))
        reserved = ({f.name for f in features} | set(CATALOG_SCHEMA) | set(EXAMPLE_EXTRAS)
                    | set(DERIVED))
        for kind, names, dtype, prep, default in (
                ("categorical", config.item_categorical, "string", "lookup", ""),
                ("numeric", config.item_numeric, "float", "normalize", 0.0)):
            for name in names:
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"features.item_{kind}: column names must be non-empty "
                                     f"strings, got {name!r}")
                if name in reserved:
                    raise ValueError(f"features.item_{kind}: {name!r} is a built-in or "
                                     f"derived name (or declared twice); declare each extra "
                                     f"catalog column once")
                reserved.add(name)
                features.append(Feature(name, "candidate", kind, dtype, default, prep,
                                        config.attribute_dim, extra=True))
        return cls(tuple(features), department_dim=config.department_dim)

    @classmethod
    def from_inputs(cls, specs: Mapping[str, tf.TensorSpec]) -> "FeatureSpec":
        """The spec of an exported model, from its `candidate_embedding` input signature.

        Inputs beyond the built-in ones are its extra columns: strings categorical,
        numbers numeric (dims do not matter here: the model is already built).
        """
        builtin = {f.name for f in default_spec().features}
        extras = [name for name in specs if name not in builtin]
        return cls.from_config(FeaturesConfig(
            item_categorical=tuple(n for n in extras if specs[n].dtype == tf.string),
            item_numeric=tuple(n for n in extras if specs[n].dtype != tf.string)))

    def __getitem__(self, name: str) -> Feature:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def side(self, *sides: str) -> Tuple[Feature, ...]:
        return tuple(f for f in self.features if f.side in sides)

    @property
    def query_features(self) -> Tuple[Feature, ...]:
        """What the query tower reads: the asker and the context."""
        return self.side("query", "context")

    @property
    def candidate_features(self) -> Tuple[Feature, ...]:
        return self.side("candidate")

    @property
    def extras(self) -> Tuple[Feature, ...]:
        """Declared extra catalog columns, in declaration order."""
        return tuple(f for f in self.features if f.extra)

    def tensor_specs(self, features: Sequence[Feature]) -> Dict[str, tf.TensorSpec]:
        return {f.name: f.tensor_spec() for f in features}

    @property
    def query_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.tensor_specs(self.query_features)

    @property
    def candidate_specs(self) -> Dict[str, tf.TensorSpec]:
        return self.tensor_specs(self.candidate_features)

    @property
    def example_columns(self) -> Dict[str, str]:
        """Column -> dtype of a training example ("string_list" for sequences)."""
        columns = {f.name: (f"{f.dtype}_list" if f.kind == "sequence" else f.dtype)
                   for f in self.features}
        return {**columns, **EXAMPLE_EXTRAS}

    def parse_spec(self) -> Dict[str, Any]:
        spec = {f.name: f.parse_spec() for f in self.features}
        spec.update({name: tf.io.FixedLenFeature([], DTYPES[d])
                     for name, d in EXAMPLE_EXTRAS.items()})
        return spec

    @property
    def catalog_columns(self) -> Tuple[str, ...]:
        """Catalog columns the models read: the candidate features."""
        return tuple(f.name for f in self.candidate_features)

    def check_catalog(self, catalog: pd.DataFrame) -> pd.DataFrame:
        """The catalog with declared extra columns present and of their declared type.

        Raises:
          SchemaError: naming the missing or mistyped column and where it was declared.
        """
        out = {}
        for f in self.extras:
            if f.name not in catalog.columns:
                raise SchemaError(
                    f"catalog has no column {f.name!r}, declared in features.item_{f.kind}; "
                    f"add it to the catalog or remove it from the config")
            values = catalog[f.name]
            if f.dtype == "string":
                out[f.name] = values.map(lambda v: "" if is_missing(v) else str(v)).astype(object)
            else:
                numeric = pd.to_numeric(values, errors="coerce")
                bad = numeric.isna() | ~np.isfinite(numeric.astype(np.float64))
                if bad.any():
                    row = int(np.flatnonzero(bad.to_numpy())[0])
                    raise SchemaError(
                        f"catalog column {f.name!r} (features.item_numeric) must be a finite "
                        f"number in every row; row {row} has {values.iloc[row]!r}")
                out[f.name] = numeric.astype(np.float64)
        return catalog.assign(**out) if out else catalog

    def catalog_features(self, catalog: pd.DataFrame) -> Dict[str, np.ndarray]:
        """Candidate-tower inputs of every catalog row, as numpy arrays."""
        catalog = self.check_catalog(catalog)
        return {f.name: _column(catalog[f.name], f) for f in self.candidate_features}

    def dummy_batch(self, features: Optional[Sequence[Feature]] = None
                    ) -> Dict[str, tf.Tensor]:
        """One default-valued example of `features` (all: builds a model's variables)."""
        out = {}
        for f in self.features if features is None else features:
            value = tf.constant([f.default], f.tf_dtype)
            out[f.name] = value[:, tf.newaxis] if f.kind == "sequence" else value
        return out

    def fingerprint(self) -> str:
        """Stable hash of the declarations: prepared data is reused only when it matches."""
        raw = json.dumps([[asdict(f) for f in self.features], self.department_dim],
                         sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def names(self) -> List[str]:
        return [f.name for f in self.features]


def _column(values: pd.Series, feature: Feature) -> np.ndarray:
    if feature.dtype == "string":
        return values.astype(str).to_numpy(dtype=object)
    return values.to_numpy(dtype=np.float32 if feature.dtype == "float" else np.int64)


def default_spec() -> FeatureSpec:
    """The built-in features only (what a run without a `features` section uses)."""
    return FeatureSpec.from_config(None)


def spec_of(source: Any = None) -> FeatureSpec:
    """The FeatureSpec of a model, tower or embedding function (its `features`), or of
    a FeatureSpec itself; the built-in features when it has none."""
    if isinstance(source, FeatureSpec):
        return source
    return getattr(source, "features", None) or default_spec()


def catalog_features(catalog: pd.DataFrame, source: Any = None) -> Dict[str, np.ndarray]:
    """Candidate-tower inputs of every catalog row for `source` (see `spec_of`)."""
    return spec_of(source).catalog_features(catalog)
