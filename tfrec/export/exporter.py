"""`tfrec export`: rebuild a trained run and write its serving SavedModel."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Optional

import pandas as pd

from tfrec.config import Config, ExportConfig
from tfrec.evaluation.report import validation_queries
from tfrec.models.catalog_index import wants_ivf
from tfrec.models.embedding import tower_fn
from tfrec.export.pipeline import PipelineModule
from tfrec.export.ranking import RankerModule
from tfrec.export.retrieval import RetrievalModule
from tfrec.export.versioned import save_versioned
from tfrec.training.ranking_trainer import load_ranker
from tfrec.training.title_vectors import use_catalog_title_vectors
from tfrec.training.trainer import load_trained_model

log = logging.getLogger(__name__)

RANKER_NAME = "ranker"
PIPELINE_NAME = "pipeline"

# Signature inputs holding catalog item ids. The ranker and `similar_items` refuse ids
# outside the served catalog, so their warm-up requests carry a real one.
ITEM_ID_INPUTS = ("item_id", "candidate_ids", "history", "exclude_item_ids",
                  "purchased_item_ids")


def warmup_values(catalog: pd.DataFrame) -> dict:
    """Warm-up sample values: the exported catalog's first item id for every item-id
    input (other inputs keep `warmup.sample_inputs`' defaults)."""
    if catalog.empty:
        return {}
    return {name: str(catalog["item_id"].iloc[0]) for name in ITEM_ID_INPUTS}


def _index_inputs(run_dir: str, catalog: pd.DataFrame, export: ExportConfig, model) -> dict:
    """The `index` / `queries` arguments of a module (validation queries only for IVF)."""
    queries = None
    if wants_ivf(export, len(catalog)):
        run_cfg = Config.from_yaml(os.path.join(run_dir, "config.yaml"))
        queries = validation_queries(run_cfg.data, tower_fn(model.query_tower))
    return {"index": export, "queries": queries}


def privacy_card(run_dir: str) -> Optional[dict]:
    """The DP block (epsilon, delta, noise, clip, steps, sampling rate, privacy unit) of a
    run trained with `train.dp`, from its metrics.json; None for other runs."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("dp")


def export_retrieval(run_dir: str, catalog: pd.DataFrame, export: ExportConfig,
                     model=None, card: Optional[dict] = None) -> str:
    """Exports the retrieval model of `run_dir` over `catalog`; returns the version dir.

    Args:
      run_dir: training run directory (config.yaml, vocab.json, weights/).
      catalog: items the served index covers (new items can be added by re-exporting).
      export: base dir, model name and optional version.
      model: an already-loaded model of that run (skips rebuilding it).
      card: extra model-card fields (e.g. the export gate's figures).
    """
    if model is None:
        model, _, _ = load_trained_model(run_dir)
    model = _for_catalog(model, catalog)
    module = RetrievalModule(model, catalog, **_index_inputs(run_dir, catalog, export, model))
    card = {"model": "two_tower_retrieval", "run_dir": os.path.abspath(run_dir),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_items": len(catalog),
            "signatures": sorted(module.signatures()), "retrieval_index": module.index_card,
            "precision": module.precision, "privacy": privacy_card(run_dir),
            **(card or {})}
    with _signatures_only():
        return save_versioned(module, module.signatures(), export.base_dir,
                              export.model_name, export.version,
                              extra_files={"tfrec_model.json": card},
                              warmup_values=warmup_values(catalog))


def _signatures_only():
    """Skips Keras' per-layer call traces while saving: serving needs only the signatures.

    The traces let Keras rebuild its layers from the SavedModel; without them export
    and load take about 40% less time. The switch is tf_keras-internal: a no-op if moved.
    """
    try:
        from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope
    except ImportError:  # pragma: no cover - depends on the tf_keras version
        return contextlib.nullcontext()
    return keras_option_scope(save_traces=False, in_tf_saved_model_scope=False)


def _trained_pair(run_dir: str, retrieval, ranker):
    """(retrieval model, ranker) of `run_dir`, loading whichever was not passed in."""
    if retrieval is None:
        retrieval, _, _ = load_trained_model(run_dir)
    if ranker is None:
        ranker, _ = load_ranker(run_dir)
    return retrieval, ranker


def _for_catalog(model, catalog: pd.DataFrame):
    """The retrieval model with the stored title vectors of the exported catalog's items
    (new items get theirs without retraining); unchanged without title vectors."""
    use_catalog_title_vectors(model, catalog)
    return model


def _ranking_card(kind: str, run_dir: str, catalog: pd.DataFrame, ranker, signatures,
                  **extra) -> dict:
    text_mode = ranker.config.text_mode
    return {"model": kind, "run_dir": os.path.abspath(run_dir),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_items": len(catalog),
            "tasks": list(ranker.tasks), "text_mode": text_mode,
            # Text is case-folded with a TF Text op in every mode (stock TF Serving
            # links TF Text's ops); BERT modes also tokenise with them.
            "needs_tensorflow_text": True,
            "signatures": sorted(signatures), **extra}


def export_ranker(run_dir: str, catalog: pd.DataFrame, export: ExportConfig,
                  model_name: str = RANKER_NAME, max_candidates: Optional[int] = None,
                  retrieval=None, ranker=None) -> str:
    """Exports the ranker of `run_dir` (candidate ids in, re-ordered ids out).

    Writes `<export.base_dir>/<model_name>/<version>/` atomically; returns that dir.

    Args:
      run_dir: retrieval run directory with a trained `ranker/`.
      catalog: items that may be candidates (new ones are ranked from their content).
      export: base dir and optional version (its model_name is the retrieval model's).
      model_name: model directory name.
      max_candidates: longest candidate list accepted (default ranking.max_candidates).
      retrieval / ranker: already-loaded models of that run (skip rebuilding them).
    """
    retrieval, ranker = _trained_pair(run_dir, retrieval, ranker)
    module = RankerModule(_for_catalog(retrieval, catalog), ranker, catalog,
                          max_candidates=max_candidates, precision=export.precision)
    signatures = module.signatures()
    card = _ranking_card("ranker", run_dir, catalog, ranker, signatures,
                         max_candidates=module.max_candidates, precision=module.core.precision)
    with _signatures_only():
        return save_versioned(module, signatures, export.base_dir, model_name,
                              export.version, extra_files={"tfrec_model.json": card},
                              warmup_values=warmup_values(catalog))


def export_pipeline(run_dir: str, catalog: pd.DataFrame, export: ExportConfig,
                    max_per_brand: Optional[int] = 3, model_name: str = PIPELINE_NAME,
                    candidates: Optional[int] = None, retrieval=None, ranker=None,
                    search_history: Optional[str] = None) -> str:
    """Exports retrieval -> ranker -> business rules as one SavedModel.

    Writes `<export.base_dir>/<model_name>/<version>/` atomically; returns that dir.

    Args:
      run_dir: retrieval run directory with a trained `ranker/`.
      catalog: items that can be served (optional bool column `in_stock`).
      export: base dir and optional version (its model_name is the retrieval model's).
      max_per_brand: at most this many results per brand; None for no cap.
      model_name: model directory name.
      candidates: retrieval top-K the ranker re-orders (default ranking.candidates).
      retrieval / ranker: already-loaded models of that run (skip rebuilding them).
      search_history: "keep"/"exclude" history items in `search` (None: as trained).
    """
    retrieval, ranker = _trained_pair(run_dir, retrieval, ranker)
    module = PipelineModule(_for_catalog(retrieval, catalog), ranker, catalog,
                            candidates=candidates,
                            max_per_brand=max_per_brand, search_history=search_history,
                            reasons=export.reasons,
                            **_index_inputs(run_dir, catalog, export, retrieval))
    if module.search_history != ranker.config.search_history:
        log.warning("pipeline search %ss history items but the ranker's lists were built "
                    "with search_history=%s", module.search_history,
                    ranker.config.search_history)
    signatures = module.signatures()
    card = _ranking_card("pipeline", run_dir, catalog, ranker, signatures,
                         precision=module.core.precision, candidates=module.candidates,
                         max_per_brand=module.max_per_brand,
                         search_history=module.search_history,
                         in_stock_column=module.core.has_stock,
                         reasons=module.reasons is not None,
                         retrieval_index=module.core.index_card,
                         retrieval_privacy=privacy_card(run_dir))
    with _signatures_only():
        return save_versioned(module, signatures, export.base_dir, model_name,
                              export.version, extra_files={"tfrec_model.json": card},
                              warmup_values=warmup_values(catalog))
