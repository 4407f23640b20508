"""The steps of a run, each callable from Python or the CLI: generate -> train ->
evaluate -> export -> serve -> query. `demo` chains them on the synthetic world.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, List, Optional

import tfrec  # noqa: F401

from tfrec.config import Config

log = logging.getLogger(__name__)


def generate(cfg: Config, world: Optional[str] = None, seed: Optional[int] = None,
             stream: Optional[bool] = None, users_per_chunk: Optional[int] = None) -> dict:
    """Writes a synthetic world to cfg.data.data_dir and returns its summary.

    Worlds too large for memory (STREAM_PRESETS, or `stream=True`) are written with
    their events in parts (events/part-*.parquet), one chunk of users at a time.

    Args:
      cfg: config (data.world, data.seed, data.lang, data.data_dir).
      world: preset name (default cfg.data.world).
      seed: random seed (default cfg.data.seed).
      stream: stream the events in parts; None streams the presets that need it.
      users_per_chunk: users per events part when streaming (default 10,000).

    Returns:
      world, lang, seed, items, users, events, data_dir, seconds; `parts` when streamed.

    Raises:
      ValueError: users_per_chunk given for a world that is not streamed.
    """
    from tfrec.data.synthetic import generate_world, get_spec
    from tfrec.data.synthetic_stream import (DEFAULT_USERS_PER_CHUNK, STREAM_PRESETS,
                                             write_world_streaming)

    world = world or cfg.data.world
    seed = cfg.data.seed if seed is None else seed
    stream = world in STREAM_PRESETS if stream is None else stream
    if users_per_chunk is not None and not stream:
        raise ValueError(f"users_per_chunk (--users-per-chunk) applies only to a streamed "
                         f"world: add --stream (streamed by default: "
                         f"{sorted(STREAM_PRESETS)})")
    start = time.perf_counter()
    spec = dataclasses.replace(get_spec(world), lang=cfg.data.lang)
    info = {"world": world, "lang": cfg.data.lang, "seed": seed,
            "data_dir": cfg.data.data_dir}
    if stream:
        chunk = DEFAULT_USERS_PER_CHUNK if users_per_chunk is None else users_per_chunk
        meta = write_world_streaming(spec, seed, cfg.data.data_dir, chunk)
        info.update(items=meta["num_items"], users=meta["num_users"],
                    events=meta["num_events"], parts=meta["event_parts"])
    else:
        w = generate_world(spec, seed=seed)
        w.save(cfg.data.data_dir)
        info.update(items=len(w.catalog), users=len(w.users), events=len(w.events))
    info["seconds"] = round(time.perf_counter() - start, 1)
    return info


def train(cfg: Config):
    from tfrec.training.trainer import train_retrieval

    return train_retrieval(cfg)


def prepare(cfg: Config, dead_letter: Optional[str] = None, buckets: int = 256,
            shuffle: str = "auto") -> dict:
    """Validates the tables and writes the records `train` reads (data.engine decides how).

    Unlike `train`'s implicit preparation it always counts bad rows by reason, so the
    report covers every problem, not the first one.
    """
    from tfrec.data.prepare import prepare_records

    return prepare_records(cfg, max_bad_share=cfg.data.max_bad_share,
                           dead_letter=dead_letter, buckets=buckets, shuffle=shuffle)


def train_ranker(cfg: Config, run: Optional[str] = None, retrieval=None, teacher=None):
    """Trains the ranker of a retrieval run on its validation-period candidate lists.

    Args:
      teacher: a trained ranker (model, or the name/path of a run whose ranker/ it is)
        the new one also learns from (`ranking.distill_weight`); None: labels only.
    """
    from tfrec.training.ranking_trainer import load_ranker, train_ranker as _train_ranker
    from tfrec.training.trainer import resolve_run_dir

    if isinstance(teacher, str):
        teacher, _ = load_ranker(resolve_run_dir(cfg.train.checkpoint_dir, teacher))
    return _train_ranker(cfg, run=run, retrieval=retrieval, teacher=teacher)


def evaluate(cfg: Config, run: Optional[str] = None, saved_model: Optional[str] = None,
             split: str = "test", max_users: Optional[int] = None,
             report_dir: Optional[str] = None, search_history: Optional[str] = None
             ) -> Dict[str, Dict[str, float]]:
    """Metrics of a trained run (or an exported SavedModel) beside the baselines.

    Args:
      cfg: config (data locations).
      run: run name under cfg.train.checkpoint_dir, default the latest.
      saved_model: evaluate this exported version directory instead of a run.
      split: "test" (held-out last period) or "val".
      max_users: sample of users to evaluate.
      report_dir: also write an HTML/JSON report there (adds a co-occurrence baseline
        row) and log it to TensorBoard under <log_dir>/<run>/evaluation.
      search_history: "keep"/"exclude" the searcher's history items in the search rows
        (default: as the ranker was trained, ranking.search_history).
    """
    from tfrec.data.io import load_data_tables
    from tfrec.metrics.candidates import excludes_history
    from tfrec.evaluation.report import evaluate_period
    from tfrec.models.embedding import tower_fn
    from tfrec.training.trainer import ensure_prepared, load_trained_model, resolve_run_dir

    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    if search_history is not None:
        excludes_history(search_history)  # a clear error before any work
    ranker = None
    if saved_model:
        from tfrec.export.gate import signature_embedding_fn

        loaded = _load_saved_model(saved_model)
        query_fn = signature_embedding_fn(loaded.signatures["query_embedding"])
        candidate_fn = signature_embedding_fn(loaded.signatures["candidate_embedding"])
    else:
        from tfrec.training.ranking_trainer import load_ranker, ranker_dir_of

        run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
        model, run_cfg, _ = load_trained_model(run_dir)
        cfg.data = run_cfg.data
        query_fn, candidate_fn = tower_fn(model.query_tower), tower_fn(model.candidate_tower)
    meta = ensure_prepared(cfg)
    tables = load_data_tables(cfg.data)
    if not saved_model and os.path.isdir(os.path.join(ranker_dir_of(run_dir), "weights")):
        # Adds the two_tower+ranker row, over today's catalog (items may have been added).
        ranker, ranker_cfg = load_ranker(run_dir, catalog=tables.catalog)
        cfg.ranking = ranker_cfg.ranking
    if search_history is not None:
        cfg.ranking.search_history = search_history
    index = _evaluation_index(cfg, query_fn, len(tables.catalog)) if not saved_model else None
    times = meta["split"]
    start, end = ((int(times["t_test"]), int(times["t_end"])) if split == "test"
                  else (int(times["t_val"]), int(times["t_test"])))
    if report_dir:
        from tfrec.evaluation.period import write_period_report

        tb_dir = (os.path.join(report_dir, "tensorboard") if saved_model else
                  os.path.join(cfg.train.log_dir, os.path.basename(run_dir), "evaluation"))
        return write_period_report(report_dir, tables, start, end, cfg, query_fn, candidate_fn,
                                   split=split, max_users=max_users, tensorboard_dir=tb_dir,
                                   source=saved_model or run_dir, ranker=ranker,
                                   index=index)
    return evaluate_period(tables.events, tables.catalog, start, end, cfg.data.history_length,
                           query_fn, candidate_fn, ks=cfg.train.eval_ks,
                           # the synthetic truth (oracle rows) knows raw ids, not pseudonyms
                           data_dir=None if cfg.data.pseudonymize_users else cfg.data.data_dir,
                           max_users=max_users, ranker=ranker,
                           candidates=cfg.ranking.candidates,
                           search_history=cfg.ranking.search_history, index=index)


def _evaluation_index(cfg: Config, query_fn, num_items: int):
    """The IVF index the export would serve (None: exact), so evaluation measures it."""
    from tfrec.evaluation.report import validation_queries
    from tfrec.models.catalog_index import IndexSearch, wants_ivf

    if not wants_ivf(cfg.export, num_items):
        return None
    log.info("evaluating retrieval through the IVF index (export.index=%s)", cfg.export.index)
    return IndexSearch(cfg.export, validation_queries(cfg.data, query_fn))


def _load_saved_model(path: str):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (text is case-folded with a TF Text op)

    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"{path!r} is not a SavedModel directory (no saved_model.pb)")
    return tf.saved_model.load(path)


def export(cfg: Config, run: Optional[str] = None, model=None,
           catalog: Optional[str] = None, gate: Optional[float] = None) -> str:
    """Exports the retrieval model of a run; returns the version directory.

    Args:
      catalog: Parquet/CSV product table to index (default: the run's data catalog).
      gate: refuse (GateRefused, nothing written) when the run's validation recall@100
        is below the currently exported version's by more than this; both figures go
        into the model card. None: no gate.
    """
    from tfrec.export.exporter import export_retrieval
    from tfrec.training.trainer import resolve_run_dir

    run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
    items = export_catalog(run_dir, catalog)
    card = {}
    if gate is not None:
        result = gate_check(cfg, run_dir, items, gate, model)
        card["gate"] = result.card()
        if not result.passed:
            from tfrec.export.gate import refusal
            raise refusal(result)
    return export_retrieval(run_dir, items, cfg.export, model=model, card=card)


def export_edge(cfg: Config, run: Optional[str] = None, catalog: Optional[str] = None,
                k: int = 20) -> str:
    """Exports the run's on-device (TFLite) retrieval model; returns the version dir.

    Args:
      catalog: Parquet/CSV product table the device may return (default: the run's).
      k: results per request, fixed in the file.
    """
    from tfrec.export.edge import export_edge as _export_edge
    from tfrec.training.trainer import resolve_run_dir

    run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
    return _export_edge(run_dir, export_catalog(run_dir, catalog), cfg.export, k=k)


def gate_check(cfg: Config, run_dir: str, items, tolerance: float, model=None):
    """The run vs the exported retrieval version on the run data's validation period."""
    from tfrec.config import Config as _Config
    from tfrec.data.io import load_data_tables
    from tfrec.data.split import time_split
    from tfrec.export.gate import check_gate
    from tfrec.models.embedding import tower_fn
    from tfrec.training.trainer import load_trained_model

    run_cfg = _Config.from_yaml(os.path.join(run_dir, "config.yaml"))
    events = load_data_tables(run_cfg.data).events
    split = time_split(events, run_cfg.data.val_fraction, run_cfg.data.test_fraction)
    if model is None:
        model, _, _ = load_trained_model(run_dir)
    result = check_gate((tower_fn(model.query_tower), tower_fn(model.candidate_tower)),
                        events, items, {"start": split.t_val, "end": split.t_test},
                        run_cfg.data.history_length,
                        os.path.join(cfg.export.base_dir, cfg.export.model_name), tolerance,
                        max_users=cfg.train.eval_max_users)
    log.info("export gate: candidate %s %.4f, exported version %s %s", result.metric,
             result.candidate, result.current_version, result.current)
    return result


def export_catalog(run_dir: str, path: Optional[str] = None):
    """The catalog an export serves: the table at `path`, or the run's data catalog.

    Raises:
      SchemaError: the table is unreadable, empty, or has bad ids, titles or types
        (the message names the column and row).
    """
    from tfrec.config import Config as _Config
    from tfrec.data.feature_spec import FeatureSpec
    from tfrec.data.io import load_tables, read_table

    run_cfg = _Config.from_yaml(os.path.join(run_dir, "config.yaml"))
    if path is None:
        return load_tables(run_cfg.data.data_dir, max_bad_share=run_cfg.data.max_bad_share).catalog
    return FeatureSpec.from_config(run_cfg.features).check_catalog(read_table(path, "catalog"))


def has_ranker(cfg: Config, run: Optional[str] = None) -> bool:
    from tfrec.training.ranking_trainer import ranker_dir_of
    from tfrec.training.trainer import resolve_run_dir

    run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
    return os.path.isdir(os.path.join(ranker_dir_of(run_dir), "weights"))


def export_ranking(cfg: Config, run: Optional[str] = None, retrieval=None, ranker=None,
                   catalog: Optional[str] = None) -> Dict[str, str]:
    """Exports the run's ranker ("ranker") and the combined search/recommend pipeline
    ("pipeline": retrieval -> ranker -> business rules in one SavedModel).

    Args:
      catalog: Parquet/CSV product table to serve (default: the run's data catalog);
        items the models never saw are embedded and ranked from their content, their
        popularity counted from the run's events (0 when they have none).
    """
    from tfrec.config import Config as _Config
    from tfrec.data.examples import positive_interactions
    from tfrec.data.io import load_data_tables
    from tfrec.export.exporter import export_pipeline, export_ranker
    from tfrec.features.catalog import catalog_statistics
    from tfrec.training.ranking_trainer import load_ranker
    from tfrec.training.trainer import load_trained_model, resolve_run_dir

    run_dir = resolve_run_dir(cfg.train.checkpoint_dir, run)
    run_cfg = _Config.from_yaml(os.path.join(run_dir, "config.yaml"))
    events = load_data_tables(run_cfg.data).events
    items = export_catalog(run_dir, catalog)
    # Serve with popularity features as of the newest data, not the training cut.
    stats = catalog_statistics(items, positive_interactions(events), int(events["ts"].max()) + 1)
    if retrieval is None:
        retrieval, _, _ = load_trained_model(run_dir)
    if ranker is None:
        ranker, _ = load_ranker(run_dir, catalog=items, statistics=stats)
    else:
        ranker.use_catalog(items, stats)
    return {
        "ranker": export_ranker(run_dir, items, cfg.export, retrieval=retrieval, ranker=ranker),
        "pipeline": export_pipeline(run_dir, items, cfg.export, retrieval=retrieval,
                                    ranker=ranker, max_per_brand=cfg.export.max_per_brand,
                                    search_history=cfg.export.search_history),
    }


def forget(cfg: Config, users: List[str]) -> dict:
    """Removes users from the data tables, prepared records and request logs, and lists
    the runs and exported models that learned from them (to retrain / re-export).

    With data.pseudonymize_users the ids are raw ids (hashed with the key) or pseudonyms.
    Everything is counted before anything is rewritten.

    Returns:
      {"users", "removed": {"tables", "records", "vocabulary", "request_logs"},
       "retrain": run dirs, "reexport": model version dirs}.

    Raises:
      ValueError: no data, run or model holds any of the users (nothing is changed).
    """
    from tfrec.data import forget as fg
    from tfrec.data.pseudonym import users_key
    from tfrec.serving.request_log import remove_users, user_rows

    key = users_key(cfg.data)
    found = fg.targets(users, key)
    ids = found.any
    tables = fg.table_rows(cfg.data.data_dir, found, key)
    records = fg.record_counts(cfg.data.tfrecord_dir, ids)
    vocabulary = fg.vocab_count(cfg.data.tfrecord_dir, ids)
    logs = user_rows(cfg.serve.request_log, ids) if cfg.serve.request_log else {}
    runs = fg.affected_runs(cfg.train.checkpoint_dir, ids)
    models = fg.affected_models(cfg.export.base_dir, runs, ids)
    if not (tables or records or vocabulary or logs or runs or models):
        raise ValueError(
            f"no data of user(s) {', '.join(sorted(map(str, users)))} in {cfg.data.data_dir!r}, "
            f"{cfg.data.tfrecord_dir!r}, the request logs, runs or models; nothing was changed "
            f"(check the id{'' if key else '; pseudonymised data needs --pseudonymize-users'})")
    fg.remove_table_rows(tables, found, key)
    if records or vocabulary:
        fg.remove_records(cfg.data.tfrecord_dir, records, ids)
    remove_users(list(logs), ids)
    return {"users": list(users),
            "removed": {"tables": {t: sum(files.values()) for t, files in tables.items()},
                        "table_files": {p: n for files in tables.values()
                                        for p, n in files.items()},
                        "records": sum(records.values()), "record_files": records,
                        "vocabulary": vocabulary, "request_logs": sum(logs.values()),
                        "request_log_files": logs},
            "retrain": runs, "reexport": models}


def demo(cfg: Config, world: Optional[str] = None, regenerate: bool = False,
         print_fn=print) -> dict:
    """Everything in order on the synthetic world, ending with a gRPC query."""
    from tfrec.data.io import load_data_tables
    from tfrec.evaluation.report import format_table
    from tfrec.serving.client import PredictClient, format_results
    from tfrec.serving.server import ModelServer

    started = time.perf_counter()
    world = world or cfg.data.world
    step = _stepper(print_fn)
    if regenerate or not os.path.exists(os.path.join(cfg.data.data_dir, "events.parquet")):
        step(f"generate synthetic world '{world}'")
        info = generate(cfg, world)
        print_fn(f"  {info['items']} items, {info['users']} users, {info['events']} events "
                 f"in {info['seconds']}s -> {info['data_dir']}")
    else:
        step(f"reuse synthetic world in {cfg.data.data_dir}")

    step(f"train two-tower retrieval ({cfg.train.strategy} strategy, {cfg.train.epochs} epochs)")
    result = train(cfg)
    print_fn(f"  run {result.run_name}: {result.examples_per_second:,.0f} examples/s, "
             f"validation recall@100 {result.val_metrics.get('recall_at_100', float('nan')):.4f}")

    step(f"train the ranker on the retrieval top-{cfg.ranking.candidates} "
         f"({cfg.ranking.text_mode} text, click + purchase heads, DCN-v2)")
    ranked = train_ranker(cfg, run=result.run_name, retrieval=result.model)
    print_fn(f"  {ranked.lists} validation-period lists in {ranked.seconds:.0f}s; validation "
             f"ndcg@10 {ranked.val_metrics.get('score_ndcg_at_10', float('nan')):.4f}")

    step("evaluate on the held-out test period")
    rows = evaluate(cfg, run=result.run_name)
    print_fn(format_table(rows, title="test period: users frozen at its start (seen items "
                                      "excluded); search: rows = the period's search sessions"))

    step("export SavedModels: retrieval, ranker, and the search/recommend pipeline")
    version_dir = export(cfg, run=result.run_name, model=result.model)
    exported = export_ranking(cfg, run=result.run_name, retrieval=result.model,
                              ranker=ranked.model)
    for path in [version_dir, *exported.values()]:
        print_fn(f"  {path}")

    step("serve over gRPC (embedded TF Serving API) and query")
    names = [cfg.export.model_name, "ranker", "pipeline"]
    server = ModelServer({name: os.path.join(cfg.export.base_dir, name) for name in names},
                         host=cfg.serve.host, port=0, poll_seconds=cfg.serve.poll_seconds)
    server.start()
    try:
        address = f"{cfg.serve.host}:{server.port}"
        client = PredictClient(address)
        for name in names:
            client.wait_until_available(name, timeout=60)
        tables = load_data_tables(cfg.data)
        user, history = _example_user(tables.events)
        print_fn(f"  server on {address}; user {user}, recent items: "
                 + ", ".join(_titles(tables.catalog, history[:3])))
        print_fn("  recommendations (retrieval top-100 -> ranker -> at most "
                 f"{cfg.export.max_per_brand} per brand), one Predict call:")
        recs = client.recommend_pipeline("pipeline", user, history=history, k=10)
        print_fn(format_results(recs))
        query = _example_query(tables.events)
        print_fn(f"  search for {user}: {query!r}")
        print_fn(format_results(client.search("pipeline", user, query, history=history, k=5)))
        item = recs[0]["item_id"]
        print_fn(f"  items similar to {item} ({recs[0]['title']}):")
        print_fn(format_results(client.similar_items(cfg.export.model_name, item, k=5)))
    finally:
        server.stop(0)
    seconds = time.perf_counter() - started
    print_fn(f"\ndemo finished in {seconds:.0f}s; TensorBoard: tfrec board "
             f"(logs in {result.tensorboard_dir})")
    return {"metrics": rows, "export": version_dir, "exported": exported,
            "run": result.run_name, "seconds": seconds, "recommendations": recs}


def _stepper(print_fn):
    counter = {"n": 0}

    def step(text: str) -> None:
        counter["n"] += 1
        print_fn(f"\n[{counter['n']}] {text}")

    return step


def _example_user(events) -> "tuple[str, List[str]]":
    from tfrec.data.schema import POSITIVE_EVENT_WEIGHTS

    pos = events[events["event_type"].isin(list(POSITIVE_EVENT_WEIGHTS))]
    user = pos["user_id"].value_counts().index[len(pos["user_id"].unique()) // 3]
    items = pos[pos["user_id"] == user].sort_values("ts", ascending=False)["item_id"]
    return str(user), list(dict.fromkeys(items.astype(str)))[:20]


def _example_query(events) -> str:
    queries = events.loc[events["query"].astype(str) != "", "query"]
    return str(queries.iloc[len(queries) // 2]) if len(queries) else "wireless headphones"


def _titles(catalog, items: List[str]) -> List[str]:
    titles = dict(zip(catalog["item_id"].astype(str), catalog["title"].astype(str)))
    return [titles.get(i, i) for i in items]
