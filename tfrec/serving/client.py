"""A small client for TF Serving's gRPC API and the retrieval model's signatures.

Only the standard PredictionService/ModelService calls are used, so the client talks
to stock TensorFlow Serving and to `tfrec.serving.ModelServer` alike.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfrec.serving import tensors
from tfrec.serving.request_log import REQUEST_ID_KEY, RequestLog, Served

_STATE_NAMES = dict(
    (number, name) for name, number in get_model_status_pb2.ModelVersionStatus.State.items())


class ServingError(Exception):
    """A gRPC call failed; carries the status code and the server's message.

    Args:
      code: The grpc.StatusCode, e.g. NOT_FOUND or INVALID_ARGUMENT.
      message: The server's detail string.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class PredictClient:
    """Calls Predict, GetModelMetadata and GetModelStatus with a deadline on every call.

    Args:
      address: `host:port` of the gRPC endpoint (TF Serving's default is 8500).
      timeout: Deadline in seconds for each call, so a request never hangs.
      max_message_mb: Largest message sent or received, in MiB.
      request_log: Started RequestLog that every answered Predict is queued to: how to
        log what stock TF Serving served, which has no request log of its own
        (propensities 1: its top-k is deterministic).
    """

    def __init__(self, address: str = "127.0.0.1:8500", timeout: float = 10.0,
                 max_message_mb: int = 64, request_log: Optional[RequestLog] = None):
        self.request_log = request_log
        size = int(max_message_mb * 1024 * 1024)
        self.address = address
        self.timeout = float(timeout)
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", size),
                              ("grpc.max_receive_message_length", size)])
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PredictClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float] = None, metadata=None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=metadata)
        except grpc.RpcError as e:
            raise ServingError(e.code(), e.details() or "") from None

    # -- generic API -------------------------------------------------------------

    def predict_response(self, model: str, inputs: Mapping[str, Any],
                         signature: str = "serving_default", version: Optional[int] = None,
                         output_filter: Optional[Sequence[str]] = None,
                         timeout: Optional[float] = None,
                         request_id: Optional[str] = None) -> predict_pb2.PredictResponse:
        """Sends one PredictRequest and returns the raw response (with its model_spec).

        Args:
          model: Model name.
          inputs: Input alias -> array-like (or TensorProto); dtypes must match the
            signature exactly, e.g. np.int32 for `k`.
          signature: Signature name.
          version: Specific version; None asks for the latest.
          output_filter: Output aliases to return; None returns all.
          timeout: Per-call deadline overriding the client's.
          request_id: Sent as `x-request-id` metadata: the id of this call in the
            server's request log (outcome events refer to it).
        """
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = int(version)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tensors.to_proto(value))
        request.output_filter.extend(output_filter or ())
        if self.request_log is not None and not request_id:
            request_id = uuid.uuid4().hex  # the log needs an id outcomes can refer to
        metadata = ((REQUEST_ID_KEY, str(request_id)),) if request_id else None
        response = self._call(self._prediction.Predict, request, timeout, metadata)
        if self.request_log is not None:
            spec = response.model_spec
            self.request_log.log(Served(
                str(request_id), time.time(), spec.name or model, spec.version.value,
                spec.signature_name or signature, "", "",
                {n: tensors.from_proto(p) for n, p in request.inputs.items()},
                {n: tensors.from_proto(p) for n, p in response.outputs.items()}))
        return response

    def predict(self, model: str, inputs: Mapping[str, Any],
                signature: str = "serving_default", version: Optional[int] = None,
                output_filter: Optional[Sequence[str]] = None,
                timeout: Optional[float] = None,
                request_id: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Runs a signature and returns its outputs as numpy arrays (strings as bytes).

        Args: as `predict_response`.
        """
        response = self.predict_response(model, inputs, signature, version, output_filter,
                                         timeout, request_id)
        return {name: tensors.from_proto(proto)
                for name, proto in response.outputs.items()}

    def metadata(self, model: str, version: Optional[int] = None
                 ) -> Dict[str, Dict[str, Dict[str, Tuple[str, Optional[Tuple]]]]]:
        """Signature name -> {"inputs": {alias: (dtype, shape)}, "outputs": {...}}.

        Dtypes are TF names ("string", "int32"); unknown dims are None.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        request.metadata_field.append("signature_def")
        response = self._call(self._prediction.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signature_map):
            raise ServingError(grpc.StatusCode.INTERNAL,
                               "metadata 'signature_def' is not a SignatureDefMap")
        result = {}
        for key, signature_def in sorted(signature_map.signature_def.items()):
            if key.startswith("__"):  # e.g. __saved_model_init_op: not callable
                continue
            result[key] = {
                "inputs": {a: _describe(t) for a, t in sorted(signature_def.inputs.items())},
                "outputs": {a: _describe(t) for a, t in sorted(signature_def.outputs.items())},
            }
        return result

    def status(self, model: str, version: Optional[int] = None) -> List[Tuple[int, str]]:
        """(version, state) pairs, e.g. [(1, "END"), (2, "AVAILABLE")], ascending."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = int(version)
        response = self._call(self._model.GetModelStatus, request)
        return sorted((int(s.version), _STATE_NAMES.get(s.state, str(s.state)))
                      for s in response.model_version_status)

    def wait_until_available(self, model: str, timeout: float = 60.0,
                             interval: float = 0.25) -> int:
        """Polls GetModelStatus until a version is AVAILABLE; returns the highest one.

        Raises:
          TimeoutError: nothing became available in `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        last: Optional[str] = None
        while True:
            try:
                available = [v for v, state in self.status(model) if state == "AVAILABLE"]
                if available:
                    return max(available)
                last = "no AVAILABLE version yet"
            except ServingError as e:
                if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = str(e)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"model {model!r} at {self.address} is not available after "
                                   f"{timeout:.1f}s (last answer: {last})")
            time.sleep(interval)

    # -- retrieval model contract ------------------------------------------------

    def recommend(self, model: str, user_id: str, history: Iterable[str] = (), query: str = "",
                  device: str = "desktop", hour: int = 12, k: int = 10,
                  exclude_seen: bool = True, version: Optional[int] = None,
                  history_width: Optional[int] = None) -> List[Dict[str, Any]]:
        """Top-k items for one user (and optional search text) via `serving_default`.

        Args:
          model: Model name, e.g. "retrieval".
          user_id: User id; unknown ids fall back to the model's OOV handling.
          history: Recently interacted item ids, most recent first (the models weight
            positions by recency).
          query: Search text; "" means pure recommendation.
          device: Device name, e.g. "desktop" or "mobile".
          hour: Hour of day, 0-23.
          k: Number of results.
          exclude_seen: Drop items already in `history`.
          version: Specific model version; None for the latest.
          history_width: Pad history to this width (behind TF Serving batching,
            a fixed width avoids its padding with the first element).
        """
        history = [str(h) for h in history]
        width = max(1, len(history), history_width or 0)
        inputs = {
            "user_id": np.array([user_id], dtype=object),
            "history": np.array([history + [""] * (width - len(history))], dtype=object),
            "query": np.array([query], dtype=object),
            "device": np.array([device], dtype=object),
            "hour": np.array([hour], dtype=np.int64),
            "k": np.array([k], dtype=np.int32),
            "exclude_seen": np.array([bool(exclude_seen)], dtype=bool),
        }
        return rows_from(self.predict(model, inputs, "serving_default", version))

    def similar_items(self, model: str, item_id: str, k: int = 10,
                      version: Optional[int] = None) -> List[Dict[str, Any]]:
        """The k items nearest to `item_id` via the `similar_items` signature."""
        inputs = {"item_id": np.array([item_id], dtype=object),
                  "k": np.array([k], dtype=np.int32)}
        return rows_from(self.predict(model, inputs, "similar_items", version))


    # -- ranker and pipeline contracts (tfrec.export.ranking / .pipeline) ---------

    def rank(self, model: str, user_id: str, candidates: Sequence[str], query: str = "",
             history: Iterable[str] = (), device: str = "desktop", hour: int = 12,
             version: Optional[int] = None, history_width: Optional[int] = None,
             candidates_width: Optional[int] = None) -> List[Dict[str, Any]]:
        """Re-orders `candidates` for one request via the ranker's `serving_default`.

        Rows carry rank, item_id, score (ranker), title, retrieval_score, the per-task
        scores (e.g. click_score) and candidate_index (position in `candidates`).

        Args:
          model: Model name, e.g. "ranker".
          user_id: User id; unknown ids are fine (cold start).
          candidates: Catalog item ids to order (unknown ids -> INVALID_ARGUMENT).
          query: Search text; "" for recommendation lists.
          history: Recently interacted item ids, most recent first (the models weight
            positions by recency).
          device: Device name.
          hour: Hour of day, 0-23.
          version: Specific model version; None for the latest.
          history_width / candidates_width: Pad to these widths ("" padding); behind TF
            Serving batching a fixed width avoids its padding with the first element,
            which would add a copy of another request's candidate.
        """
        inputs = {
            **self._context(user_id, history, device, hour, history_width),
            "query": np.array([query], dtype=object),
            "candidate_ids": _padded(candidates, candidates_width),
        }
        return rows_from(self.predict(model, inputs, "serving_default", version))

    def explain(self, model: str, user_id: str, candidates: Sequence[str], query: str = "",
                history: Iterable[str] = (), device: str = "desktop", hour: int = 12,
                version: Optional[int] = None) -> List[Dict[str, Any]]:
        """Attributions of each candidate's ranker score via the ranker's `explain`.

        Rows (in `candidates` order) carry item_id, score, baseline_score and
        attributions: {feature group: share of score - baseline_score}.

        Args: as `rank`.
        """
        inputs = {
            **self._context(user_id, history, device, hour, None),
            "query": np.array([query], dtype=object),
            "candidate_ids": _padded(candidates),
        }
        out = self.predict(model, inputs, "explain", version)
        groups = sorted(n[:-len(ATTRIBUTIONS)] for n in out if n.endswith(ATTRIBUTIONS))
        rows = []
        for i, item_id in enumerate(out["item_ids"][0]):
            if not _text(item_id):
                continue
            rows.append({"item_id": _text(item_id), "score": float(out["scores"][0][i]),
                         "baseline_score": float(out["baseline_scores"][0][i]),
                         "attributions": {g: float(out[g + ATTRIBUTIONS][0][i])
                                          for g in groups}})
        return rows

    def recommend_pipeline(self, model: str, user_id: str, k: int = 10,
                           history: Iterable[str] = (), device: str = "desktop", hour: int = 12,
                           exclude: Iterable[str] = (), purchased: Iterable[str] = (),
                           version: Optional[int] = None, history_width: Optional[int] = None,
                           list_width: Optional[int] = None) -> List[Dict[str, Any]]:
        """Top-k after retrieval, ranker and business rules via the pipeline's `recommend`.

        Rows carry rank, item_id, score (final), title, brand, retrieval_score and
        ranker_score.

        Args:
          model: Model name, e.g. "pipeline".
          user_id: User id; unknown ids are fine (cold start).
          k: Number of results (1..the export's retrieval candidates).
          history: Recently interacted item ids, most recent first (never recommended).
          device: Device name.
          hour: Hour of day, 0-23.
          exclude: Item ids not to return for this request (e.g. out of stock right now).
          purchased: Item ids the user already bought (not returned).
          version: Specific model version; None for the latest.
          history_width / list_width: Pad history / exclude and purchased to these widths.
        """
        inputs = self._pipeline_inputs(user_id, k, history, device, hour, exclude, purchased,
                                       history_width, list_width)
        return rows_from(self.predict(model, inputs, "recommend", version))

    def search(self, model: str, user_id: str, query: str, k: int = 10,
               history: Iterable[str] = (), device: str = "desktop", hour: int = 12,
               exclude: Iterable[str] = (), purchased: Iterable[str] = (),
               version: Optional[int] = None, history_width: Optional[int] = None,
               list_width: Optional[int] = None) -> List[Dict[str, Any]]:
        """Personalised search through the pipeline's `search` signature.

        An empty `query` is answered with INVALID_ARGUMENT (use `recommend_pipeline`).

        Args: as `recommend_pipeline`, plus `query`, the search text.
        """
        inputs = self._pipeline_inputs(user_id, k, history, device, hour, exclude, purchased,
                                       history_width, list_width)
        inputs["query"] = np.array([query], dtype=object)
        return rows_from(self.predict(model, inputs, "search", version))

    # -- catalog search contract (tfrec.search.export) ---------------------------

    def catalog_search(self, query: str, model: str = "search", k: Optional[int] = None,
                       version: Optional[int] = None, timeout: Optional[float] = None,
                       nprobe: Optional[int] = None) -> List[Dict[str, Any]]:
        """Catalog search (`tfrec search train` export): raw query in, top products out.

        Rows carry rank, product_id, title, score (the ranker's), dense_score (two-tower
        cosine), bm25_score and hybrid_score; padding (fewer products found) is dropped.
        An empty or whitespace-only query is answered with INVALID_ARGUMENT.

        Args:
          query: Search text (cut to the model's max length server-side).
          model: Model name.
          k: Keep at most this many rows (the export returns a fixed number).
          version: Specific model version; None for the latest.
          timeout: Per-call deadline overriding the client's.
          nprobe: IVF lists to probe (the export's `search_nprobe` signature; only IVF
            exports have it); None: the export's tuned default.
        """
        return self.explain_catalog_search(query, model, k, version, timeout,
                                           nprobe)["results"]

    def explain_catalog_search(self, query: str, model: str = "search",
                               k: Optional[int] = None, version: Optional[int] = None,
                               timeout: Optional[float] = None,
                               nprobe: Optional[int] = None) -> Dict[str, Any]:
        """`catalog_search` plus how the query was read: {"query", "corrected_words",
        "query_category", "query_category_prob", "results"}; corrected_words are the
        speller's corrections, query_category the classifier's most probable category
        ("" / 0.0 if none, or if the export predates them)."""
        inputs = {"query": np.array([query], dtype=object)}
        if nprobe is not None:
            inputs["nprobe"] = np.array([nprobe], np.int32)
        outputs = self.predict(model, inputs,
                               "serving_default" if nprobe is None else "search_nprobe",
                               version, timeout=timeout)
        rows = rows_from(outputs, ids="product_ids")
        corrected = outputs.get("corrected_words")
        category = outputs.get("query_category")
        probability = outputs.get("query_category_prob")
        return {"query": query,
                "corrected_words": "" if corrected is None else _text(corrected[0]),
                "query_category": "" if category is None else _text(category[0]),
                "query_category_prob": 0.0 if probability is None else float(probability[0]),
                "results": rows if k is None else rows[:max(0, int(k))]}

    @staticmethod
    def _context(user_id: str, history: Iterable[str], device: str, hour: int,
                 history_width: Optional[int]) -> Dict[str, np.ndarray]:
        return {"user_id": np.array([user_id], dtype=object),
                "history": _padded(history, history_width),
                "device": np.array([device], dtype=object),
                "hour": np.array([hour], dtype=np.int64)}

    def _pipeline_inputs(self, user_id, k, history, device, hour, exclude, purchased,
                         history_width, list_width) -> Dict[str, np.ndarray]:
        return {**self._context(user_id, history, device, hour, history_width),
                "k": np.array([k], dtype=np.int32),
                "exclude_item_ids": _padded(exclude, list_width),
                "purchased_item_ids": _padded(purchased, list_width)}


def _padded(values: Iterable[str], width: Optional[int] = None) -> np.ndarray:
    """One request row [1, W] of strings, "" padded to max(1, len, width)."""
    values = [str(v) for v in values]
    size = max(1, len(values), width or 0)
    return np.array([values + [""] * (size - len(values))], dtype=object)


def _describe(tensor_info) -> Tuple[str, Optional[Tuple]]:
    dtype = tf.as_dtype(tensor_info.dtype).name if tensor_info.dtype else "invalid"
    return dtype, tensors.shape_proto_to_tuple(tensor_info.tensor_shape)


ATTRIBUTIONS = "_attributions"  # suffix of the ranker's `explain` outputs


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def rows_from(outputs: Mapping[str, np.ndarray], row: int = 0,
              ids: str = "item_ids") -> List[Dict[str, Any]]:
    """Result rows of one batch row of <ids>/scores/titles outputs, padding dropped.

    Other per-item outputs (same shape as the ids, e.g. brands, retrieval_scores) are
    added under their singular name (brand, retrieval_score); so is the id
    (item_ids -> item_id, product_ids -> product_id).
    """
    item_ids = outputs[ids][row]
    scores = outputs["scores"][row]
    titles = outputs["titles"][row] if "titles" in outputs else [b""] * len(item_ids)
    shape = np.shape(outputs[ids])
    extras = {name: outputs[name][row] for name in sorted(outputs)
              if name not in (ids, "scores", "titles")
              and np.shape(outputs[name]) == shape}
    rows = []
    for i, (item_id, score, title) in enumerate(zip(item_ids, scores, titles)):
        item_id = _text(item_id)
        if not item_id or score == -math.inf:
            continue
        entry = {"rank": len(rows) + 1, ids[:-1]: item_id, "score": float(score),
                 "title": _text(title)}
        for name, values in extras.items():
            entry[name[:-1] if name.endswith("s") else name] = _value(values[i])
        rows.append(entry)
    return rows


def _value(value: Any) -> Any:
    """A numpy element as a plain Python value (bytes decoded)."""
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value.item() if isinstance(value, np.generic) else value


def format_results(rows: Sequence[Mapping[str, Any]], max_title: int = 60,
                   reasons: bool = False) -> str:
    """Fixed-width table of result rows (rank, item_id, score, title).

    Pipeline and ranker rows also show their brand and retrieval score when present;
    with `reasons`, pipeline rows add why each item is there.
    """
    if not rows:
        return "(no results)"
    id_width = max(len("item_id"), *(len(str(r["item_id"])) for r in rows))
    show_brand = all("brand" in r for r in rows)
    brand_width = max([len("brand")] + [len(str(r["brand"])) for r in rows]) if show_brand else 0
    show_retrieval = all("retrieval_score" in r for r in rows)
    header = f"{'rank':>4}  {'item_id':<{id_width}}  {'score':>9}  "
    if show_retrieval:
        header += f"{'retrieval':>9}  "
    if show_brand:
        header += f"{'brand':<{brand_width}}  "
    lines = [header + "title"]
    for r in rows:
        title = str(r.get("title", ""))
        if len(title) > max_title:
            title = title[: max_title - 3] + "..."
        item_id = str(r["item_id"])
        line = f"{r['rank']:>4}  {item_id:<{id_width}}  {r['score']:>9.4f}  "
        if show_retrieval:
            line += f"{r['retrieval_score']:>9.4f}  "
        if show_brand:
            line += f"{str(r['brand']):<{brand_width}}  "
        lines.append(line + title)
        if reasons and r.get("reason"):
            lines.append(" " * 6 + f"why: {r['reason']}")
    return "\n".join(lines)


def format_attributions(rows: Sequence[Mapping[str, Any]]) -> str:
    """Table of `PredictClient.explain` rows: score, baseline and each group's share."""
    if not rows:
        return "(no candidates)"
    groups = sorted(rows[0]["attributions"])
    id_width = max(len("item_id"), *(len(r["item_id"]) for r in rows))
    header = (f"{'item_id':<{id_width}}  {'score':>8}  {'baseline':>8}  "
              + "  ".join(f"{g:>9}" for g in groups))
    lines = [header]
    for r in rows:
        lines.append(f"{r['item_id']:<{id_width}}  {r['score']:>8.3f}  "
                     f"{r['baseline_score']:>8.3f}  "
                     + "  ".join(f"{r['attributions'][g]:>+9.3f}" for g in groups))
    return "\n".join(lines)
