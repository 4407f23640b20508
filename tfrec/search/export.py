"""Export of catalog search as a TF Serving SavedModel: raw query in, top products out.

One Predict call runs the whole SearchPipeline in the graph: BERT query tower (TF Text
tokeniser ops, which stock TF Serving links in), in-graph BM25 (core ops), the union of
both top lists, the ranker and the top `num_results`, with every stage's score returned
for debugging and logging. What the exported model answers is what
`SearchPipeline.search` answers in the training process.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tfrec.export.retrieval import same_batch
from tfrec.export.versioned import SignatureModule, save_versioned
from tfrec.features.quantize import (QuantizedTable, check_precision, quantized_tables,
                                     table_key)
from tfrec.models.catalog_index import NPROBE_SPEC
from tfrec.search.pipeline import MAX_QUERY_CHARS, SearchPipeline
from tfrec.search.word_bag import WordBagEncoder

__all__ = ["SearchModule", "export_search", "SEARCH_NAME", "QUERY_SPEC", "EMPTY_QUERY",
           "OUTPUTS"]

SEARCH_NAME = "search"
QUERY_SPEC = tf.TensorSpec([None], tf.string, name="query")
# In-graph message of an empty query; {} is the index of the first one in the batch.
EMPTY_QUERY = "query {} is empty (blank or whitespace only); search needs query text"
OUTPUTS = ("product_ids", "titles", "scores", "dense_scores", "bm25_scores", "hybrid_scores")


class SearchModule(SignatureModule):
    """Serving graph of a SearchPipeline.

    `serving_default` input: query [B] string. Outputs, all [B, num_results] in final
    order (the ranker's, or the hybrid score's without a ranker): product_ids, titles
    (both "" past the products found), scores, dense_scores (two-tower cosine),
    bm25_scores, hybrid_scores (float32, 0 for padding); corrected_words [B] string,
    the speller's corrections of words the catalog never uses ("" if none); and
    query_category [B] string / query_category_prob [B] float32, the classifier's most
    probable category of the query ("" and 0 without a classifier). With an IVF index,
    `search_nprobe` takes one more input, nprobe [B] int32 (1..nlist; out of range is
    INVALID_ARGUMENT), to trade latency against recall per request. An empty or whitespace-only
    query fails with InvalidArgument naming its index (INVALID_ARGUMENT over gRPC);
    over-long queries are cut to MAX_QUERY_CHARS characters and answered; an empty batch
    gets empty [0, num_results] outputs.

    Only the parts the signature runs are tracked (query tower, word lookup, BM25 index,
    ranker, product vectors, ids and titles), so training state such as optimizer slots
    stays out of the SavedModel.

    The product vectors, the part that grows with the catalog (1.5 GB of float32 at 1M
    products x 384), can be stored in bfloat16 or int8 (a float32 scale per product);
    the graph scores queries against that copy (`QuantizedTable.scores`). So are a coarse
    first pass's table (`SearchPipeline.set_coarse`) and a word bag query encoder's piece
    and word tables (a BERT encoder stays float32).

    Args:
      pipeline: trained SearchPipeline (its product vectors current).
      num_results: products returned per query, >= 1.
      precision: storage of the product vectors (and a word bag's tables), one of
        EXPORT_PRECISIONS.

    Raises:
      ValueError: a bad num_results or precision, or a pipeline without word lookup.
    """

    def __init__(self, pipeline: SearchPipeline, num_results: int = 10,
                 precision: str = "float32"):
        super().__init__(name="tfrec_search")
        if not isinstance(num_results, int) or isinstance(num_results, bool) or num_results < 1:
            raise ValueError(f"num_results must be an integer >= 1, got {num_results!r}")
        check_precision(precision)
        two_tower = pipeline.two_tower
        if two_tower.word_lookup is None:
            raise ValueError("the pipeline's two-tower has no word lookup (set_word_lookup); "
                             "build it with tfrec.search.train.build_pipeline")
        # Not tracked (object.__setattr__): saving the whole pipeline would also write the
        # two-tower's optimizers; the pieces the graph uses are tracked below instead.
        object.__setattr__(self, "_pipeline", pipeline)
        self.num_results = int(num_results)
        self.num_products = pipeline.num_products
        encoder = two_tower.query_encoder
        tables: Dict[int, QuantizedTable] = {}  # float table key -> stored copy
        if precision != "float32" and isinstance(encoder, WordBagEncoder):
            # The bag's tables are the query side's bulk: stored like the product vectors,
            # with the float layer untracked (the tokenizer and word keys tracked instead).
            tables = encoder.stored_tables(precision)
            object.__setattr__(self, "query_encoder", encoder)
            self.query_tables = list(tables.values())
            self.query_state = encoder.serving_state()
        else:
            self.query_encoder = encoder
        self.query_adapter = two_tower.query_adapter
        self.words = two_tower.words
        self.word_lookup = two_tower.word_lookup
        self.lexical = pipeline.lexical
        self.speller = pipeline.speller
        self.ranker = pipeline.ranker
        self.product_vectors = pipeline.product_vectors
        if precision != "float32":
            self.product_vectors = QuantizedTable(pipeline.product_vectors.numpy(), precision,
                                                  name=f"product_vectors_{precision}")
            tables[table_key(pipeline.product_vectors)] = self.product_vectors
        object.__setattr__(self, "_tables", tables)  # read while tracing `signatures`
        self.product_ids = pipeline.product_ids
        self.titles = pipeline.titles
        self.title_terms = pipeline.title_terms
        self.category_head = pipeline.category_head
        if pipeline.category_head is not None:
            self.product_categories = pipeline.product_categories
            self.category_names = pipeline.category_names
        self.ivf = pipeline.ivf
        if pipeline.ivf is not None or pipeline.coarse_dims:
            self.dense_mean, self.dense_cov = pipeline.dense_mean, pipeline.dense_cov
        if pipeline.coarse_dims:  # the first pass's table, stored as the product vectors
            self.coarse_basis = pipeline.coarse_basis
            self.coarse_vectors = pipeline.coarse_vectors
            if precision != "float32":
                self.coarse_vectors = QuantizedTable(pipeline.coarse_vectors.numpy(),
                                                     precision,
                                                     name=f"coarse_vectors_{precision}")
                tables[table_key(pipeline.coarse_vectors)] = self.coarse_vectors
        if pipeline.ivf is not None:
            self.search_nprobe = tf.function(self._search, autograph=False,
                                             input_signature=[QUERY_SPEC, NPROBE_SPEC])

    def _search(self, query: tf.Tensor, nprobe: Optional[tf.Tensor] = None
                ) -> Dict[str, tf.Tensor]:
        cleaned = SearchPipeline.clean_queries(query)
        empty = tf.equal(tf.strings.length(cleaned), 0)
        batch = tf.size(cleaned)
        first = tf.reduce_min(tf.where(empty, tf.range(batch), batch))
        checks = [tf.debugging.Assert(tf.logical_not(tf.reduce_any(empty)),
                                      [tf.strings.format(EMPTY_QUERY, first)])]
        if nprobe is not None:
            checks += self.ivf.check_nprobe(nprobe) + same_batch(query, {"nprobe": nprobe})
        with tf.control_dependencies(checks):
            found = self._pipeline.search(tf.identity(cleaned), num_results=self.num_results,
                                          nprobe=nprobe)
        width = self.num_results
        # pipeline.search returns min(width, retrieved union) columns: pad the rest.
        pad = width - min(width, self._pipeline.list_width)
        out = {}
        for name in OUTPUTS:
            value = found[name]
            if pad:
                value = tf.pad(value, [[0, 0], [0, pad]],
                               constant_values="" if value.dtype == tf.string else 0.0)
            out[name] = tf.ensure_shape(value, [None, width])
        for name in ("corrected_words", "query_category", "query_category_prob"):
            out[name] = found[name]
        return out

    @tf.function(input_signature=[QUERY_SPEC], autograph=False)
    def search(self, query):
        return self._search(query)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        with quantized_tables(self._tables):
            out = {"serving_default": self.search.get_concrete_function()}
            if self.ivf is not None:
                out["search_nprobe"] = self.search_nprobe.get_concrete_function()
        return out


def search_card(pipeline: SearchPipeline, num_results: int, precision: str = "float32",
                **extra: Any) -> Dict[str, Any]:
    """The JSON model card of a search export (assets.extra/tfrec_model.json)."""
    encoder = pipeline.two_tower.query_encoder
    return {"model": "catalog_search",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "num_products": pipeline.num_products,
            "encoder": encoder.encoder_handle, "preprocessor": encoder.preprocessor_handle,
            "query_length": encoder.seq_length,
            "candidates_per_retriever": pipeline.candidates,
            "hybrid_weight": pipeline.hybrid_weight,
            "feedback": {"weight": pipeline.feedback_weight, "keep": pipeline.feedback_keep,
                         "top": pipeline.feedback_top, "extra": pipeline.feedback_extra,
                         "pool": pipeline.feedback_pool},
            "speller": None if pipeline.speller is None else {
                "words": pipeline.speller.num_words, "keys": pipeline.speller.num_keys,
                "cjk_contexts": pipeline.speller.num_contexts,
                "compound_parts": pipeline.speller.num_parts,
                "dense_corrections": pipeline.dense_corrections},
            "ranker": pipeline.ranker is not None,
            "query_category": None if pipeline.category_head is None else {
                "categories": pipeline.category_head.num_categories,
                "filter": pipeline.category_filter},
            "num_results": int(num_results), "max_query_chars": MAX_QUERY_CHARS,
            "product_vector_precision": precision,
            # The BERT preprocessor tokenises with TF Text ops (stock TF Serving links them).
            "needs_tensorflow_text": True,
            "retrieval_index": pipeline.index_card,
            "signatures": ["serving_default"] + (["search_nprobe"] if pipeline.ivf else []),
            **extra}


def export_search(pipeline: SearchPipeline, base_dir: str, model_name: str = SEARCH_NAME,
                  version: Optional[int] = None, num_results: int = 10,
                  card: Optional[Dict[str, Any]] = None, precision: str = "float32") -> str:
    """Exports `pipeline` as `<base_dir>/<model_name>/<version>/`, atomically.

    Args:
      pipeline: trained SearchPipeline.
      base_dir: export root (the server's base path is `<base_dir>/<model_name>`).
      model_name: model directory name.
      version: explicit version (refuses to overwrite); default the next integer.
      num_results: products returned per query.
      card: extra model-card fields, e.g. {"metrics": run.metrics, "config": ...}.
      precision: storage of the product vectors and a word bag's tables (`SearchModule`).

    Returns:
      The version directory.

    Raises:
      ValueError: a bad num_results or precision (before anything is written).
    """
    from tfrec.export.exporter import _signatures_only

    module = SearchModule(pipeline, num_results=num_results, precision=precision)
    signatures = module.signatures()
    extra = search_card(pipeline, num_results, precision, **(card or {}))
    with _signatures_only():
        return save_versioned(module, signatures, os.fspath(base_dir), model_name, version,
                              extra_files={"tfrec_model.json": extra})
