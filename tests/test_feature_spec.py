"""The feature specification: extra catalog columns are configuration, not code.

A run that declares the synthetic world's `color`, `material` and `rating` columns
trains with them, its ranker looks them up, its export takes them, and its candidate
embeddings change when only such a column changes.
"""

import json
import os
import subprocess
import sys
from copy import deepcopy

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.config import Config, FeaturesConfig
from tfrec.data.feature_spec import FeatureSpec, default_spec
from tfrec.data.schema import SchemaError

EXTRAS = {"item_categorical": ("color", "material"), "item_numeric": ("rating",)}


def _spec(**kwargs) -> FeatureSpec:
    return FeatureSpec.from_config(FeaturesConfig(**kwargs))


def test_builtin_spec_drives_signatures_and_parsing():
    spec = default_spec()
    assert list(spec.query_specs) == ["user_id", "history", "query", "device", "hour"]
    assert list(spec.candidate_specs) == ["item_id", "title", "category", "brand", "price"]
    assert spec.query_specs["history"].shape.as_list() == [None, None]
    assert spec.candidate_specs["price"].dtype == tf.float32
    assert set(spec.parse_spec()) == set(spec.names()) | {"weight", "candidate_prob", "ts"}
    dummy = spec.dummy_batch()
    assert dummy["history"].shape == (1, 1) and dummy["hour"].dtype == tf.int64


def test_extras_join_candidate_side_and_change_the_fingerprint():
    spec = _spec(**EXTRAS)
    assert [f.name for f in spec.extras] == ["color", "material", "rating"]
    assert list(spec.candidate_specs)[-3:] == ["color", "material", "rating"]
    assert spec.candidate_specs["rating"].dtype == tf.float32
    assert spec.example_columns["color"] == "string"
    assert spec.fingerprint() != default_spec().fingerprint()
    assert spec.fingerprint() == _spec(**EXTRAS).fingerprint()
    assert _spec(category_dim=32).fingerprint() != default_spec().fingerprint()


@pytest.mark.parametrize("kwargs, message", [
    ({"item_categorical": ("brand",)}, "built-in"),
    ({"item_numeric": ("popularity",)}, "derived"),
    ({"item_categorical": ("color",), "item_numeric": ("color",)}, "once"),
    ({"item_categorical": ("",)}, "non-empty"),
])
def test_bad_declarations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kwargs)


def test_catalog_check_names_missing_and_mistyped_columns():
    spec = _spec(item_categorical=("color",), item_numeric=("rating",))
    catalog = pd.DataFrame({"item_id": ["a", "b"], "color": ["红色", None],
                            "rating": ["4.5", 3]})
    checked = spec.check_catalog(catalog)
    assert checked["color"].tolist() == ["红色", ""]  # Unicode kept, missing -> ""
    assert checked["rating"].tolist() == [4.5, 3.0]
    with pytest.raises(SchemaError, match="no column 'color'.*item_categorical"):
        spec.check_catalog(catalog.drop(columns="color"))
    with pytest.raises(SchemaError, match="'rating'.*row 1 has 'n/a'"):
        spec.check_catalog(catalog.assign(rating=["4", "n/a"]))


@pytest.fixture(scope="module")
def extra_run(tiny_config, tmp_path_factory):
    """A retrieval run and ranker on the tiny world with three extra columns declared."""
    from tfrec.training.ranking_trainer import train_ranker
    from tfrec.training.trainer import train_retrieval

    work = tmp_path_factory.mktemp("extra")
    cfg = deepcopy(tiny_config)
    cfg.update({"features": dict(EXTRAS)})
    # Same TFRecord directory as the shared run: the cache key must tell them apart.
    cfg.train.checkpoint_dir = str(work / "checkpoints")
    cfg.train.log_dir = str(work / "logs")
    cfg.export.base_dir = str(work / "models")
    cfg.train.run_name = "extra"
    cfg.train.epochs = 2
    run = train_retrieval(cfg)
    rcfg = deepcopy(cfg)
    rcfg.ranking.epochs = 1
    ranker = train_ranker(rcfg, run=run.run_name, retrieval=run.model)
    return cfg, run, ranker


def test_prepared_records_are_keyed_on_the_features(extra_run, tiny_config):
    from tfrec.data.prepare import load_meta
    from tfrec.data.tfrecord import make_dataset
    from tfrec.training.trainer import ensure_prepared

    cfg, run, _ = extra_run
    meta = load_meta(cfg.data.tfrecord_dir)
    assert meta["features"] == FeatureSpec.from_config(cfg.features).fingerprint()
    batch = next(iter(make_dataset(meta["patterns"]["train"], 8, cfg.data.history_length,
                                   shuffle=False, features=run.model.features)))
    assert batch["color"].dtype == tf.string and batch["rating"].dtype == tf.float32
    # Back to the built-in features: the records are written again, without the extras.
    plain = ensure_prepared(tiny_config)
    assert plain["features"] == default_spec().fingerprint()
    batch = next(iter(make_dataset(plain["patterns"]["train"], 8,
                                   tiny_config.data.history_length, shuffle=False)))
    assert "color" not in batch


def test_vocabularies_and_ranker_lookup_hold_the_extras(extra_run, tiny_world):
    cfg, run, ranker = extra_run
    assert set(run.model.vocab.attributes["color"]) == set(tiny_world.catalog["color"]) - {""}
    mean, std = run.model.vocab.numeric_stats["rating"]
    assert mean == pytest.approx(tiny_world.catalog["rating"].mean(), rel=1e-6) and std > 0
    looked_up = ranker.model.catalog(tf.constant([tiny_world.catalog["item_id"].iloc[0]]))
    assert looked_up["color"].numpy()[0].decode() == tiny_world.catalog["color"].iloc[0]
    assert looked_up["rating"].numpy()[0] == pytest.approx(tiny_world.catalog["rating"].iloc[0])
    table = ranker.model.attributes.embed["color"].embeddings.numpy()
    assert table.shape == (len(run.model.vocab.attributes["color"]) + 1,
                           cfg.features.attribute_dim)


_FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # the text case-folding op, as TF Serving links it
model = tf.saved_model.load(sys.argv[1])
fn = model.signatures["candidate_embedding"]
base = dict(item_id=tf.constant(["I000001"] * 3), title=tf.constant(["Blue Cotton Shirt"] * 3),
            category=tf.constant(["fashion>shirts"] * 3), brand=tf.constant(["Veleon"] * 3),
            price=tf.constant([20.0] * 3), material=tf.constant(["cotton"] * 3),
            color=tf.constant(["blue", "red", "blue"]), rating=tf.constant([4.0, 4.0, 1.5]))
emb = fn(**base)["embedding"].numpy()
print(json.dumps({"inputs": sorted(fn.structured_input_signature[1]),
                  "color_delta": float(np.abs(emb[0] - emb[1]).max()),
                  "rating_delta": float(np.abs(emb[0] - emb[2]).max())}))
"""


def test_export_takes_and_uses_the_extra_columns(extra_run, tiny_world, tmp_path):
    from tfrec.export.exporter import export_retrieval

    cfg, run, _ = extra_run
    path = export_retrieval(run.run_dir, tiny_world.catalog, cfg.export, model=run.model)
    out = subprocess.run([sys.executable, "-c", _FRESH, path], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"color", "material", "rating"} <= set(result["inputs"])
    assert result["color_delta"] > 1e-6 and result["rating_delta"] > 1e-6
    # `tfrec evaluate --saved-model` reads the extra columns the signature asks for.
    from tfrec import workflow

    rows = workflow.evaluate(cfg, saved_model=path)
    assert rows["two_tower"]["recall@100"] > 0


def test_evaluate_runs_with_the_extra_columns(extra_run):
    from tfrec import workflow

    cfg, run, _ = extra_run
    rows = workflow.evaluate(Config.from_yaml(os.path.join(run.run_dir, "config.yaml")),
                             run=run.run_name)
    assert rows["two_tower"]["recall@100"] > 0
    assert "two_tower+ranker" in rows


_FRESH_PIPELINE = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # the text case-folding op, as TF Serving links it
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["recommend"](
    user_id=tf.constant([sys.argv[2]]), history=tf.constant([[""]]),
    device=tf.constant(["desktop"]), hour=tf.constant([9], tf.int64), k=tf.constant([5]),
    exclude_item_ids=tf.constant([[""]]), purchased_item_ids=tf.constant([[""]]))
print(json.dumps(out["item_ids"].numpy()[0].astype(str).tolist()))
"""


def test_pipeline_export_ranks_with_the_extra_columns(extra_run, tiny_world):
    from tfrec.export.exporter import export_pipeline

    cfg, run, ranker = extra_run
    path = export_pipeline(run.run_dir, tiny_world.catalog, cfg.export, retrieval=run.model,
                           ranker=ranker.model)
    user = tiny_world.users["user_id"].iloc[0]
    out = subprocess.run([sys.executable, "-c", _FRESH_PIPELINE, path, user],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(ids) == 5 and set(ids) <= set(tiny_world.catalog["item_id"])
