"""`tfrec search ...`: train catalog search from graded judgments and export it.

Hooked into the main parser by tfrec.cli; TensorFlow is imported by the handlers only
(after the cheap checks), so `tfrec --help` stays fast and a bad argument fails at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from tfrec.config import EXPORT_PRECISIONS, parse_assignment, set_field
from tfrec.search.config import SearchConfig

DEFAULT_WORKDIR = os.path.join("work", "search")
# Rows of the metrics table, in pipeline order; absent stages are skipped.
STAGE_ORDER = ("minilm_zero_shot", "bm25", "two_tower", "hybrid", "two_tower+ranker")
METRIC_COLUMNS = ("ndcg@10", "recall@100", "mrr")


def add_search_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `tfrec search train`."""
    search = subparsers.add_parser(
        "search", help="catalog search: two-tower + BM25 retrieval and a re-ranker",
        description="Catalog search trained from graded query-product judgments (Home "
                    "Depot CSV or the synthetic world's search log).")
    sub = search.add_subparsers(dest="search_command", metavar="SEARCH_COMMAND")
    sub.required = True

    p = sub.add_parser(
        "train", help="train, evaluate every stage on the test queries, export",
        description="Train the search two-tower and ranker (tfrec.search.train), "
                    "print test NDCG@10 / Recall@100 / MRR per stage, and export the "
                    "SavedModel `<export base>/search/<version>/` (raw query in, top "
                    "products out) for `tfrec serve`.")
    p.add_argument("--config", help="search YAML config (e.g. configs/search.yaml)")
    p.add_argument("--judgments", metavar="PATH|synthetic:SPEC",
                   help="Home Depot style CSV (search_term, product_uid, product_title, "
                        "relevance) or synthetic:SPEC[:LANG] (the search log of a synthetic "
                        "world, e.g. synthetic:tiny or synthetic:small:zh)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help=f"title-vector cache and search/metrics.json (default {DEFAULT_WORKDIR})")
    p.add_argument("--seed", type=int, help="query split and initialisation seed")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one SearchConfig field, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--log-dir", dest="log_dir",
                   help="TensorBoard directory (default tensorboard_logs/search/seed<seed>)")
    p.add_argument("--zero-shot", action="store_true", dest="zero_shot",
                   help="also measure the untrained encoder (row minilm_zero_shot)")
    p.add_argument("--export-base", dest="export_base",
                   help="export root (default <workdir>/export); the model is written to "
                        "<export base>/<model name>/<version>/")
    p.add_argument("--model-name", dest="model_name", default="search")
    p.add_argument("--version", type=int, help="export version (default: the next one)")
    p.add_argument("--results", type=int,
                   help="products the exported model returns per query (default: the "
                        "config's results, 10)")
    p.add_argument("--warm-start", dest="warm_start", metavar="DIR",
                   help="start from a saved search run (a --workdir of `tfrec search train`, "
                        "e.g. this one): its word and id vocabularies grow with the new "
                        "judgments, the optimizers start fresh")
    p.add_argument("--no-export", action="store_true", dest="no_export",
                   help="train and evaluate only")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


    add_distill_command(sub)

    p = sub.add_parser(
        "index", help="export a trained search over any product table (no retraining)",
        description="Rebuild the search of a `tfrec search train` run over a product table "
                    "(product_id, title; optional brand, category, description), products "
                    "never judged included, and export it as the next version of "
                    "`<export base>/<model name>/` (a running `tfrec serve` picks it up). "
                    "Only new or changed titles are embedded (per-title cache).")
    p.add_argument("--run", required=True, metavar="DIR",
                   help="the --workdir of `tfrec search train` (or its search/ directory)")
    p.add_argument("--catalog", required=True, metavar="PATH",
                   help="product table, .parquet or .csv")
    p.add_argument("--export-base", dest="export_base",
                   help="export root (default <run workdir>/export)")
    p.add_argument("--model-name", dest="model_name", default="search")
    p.add_argument("--version", type=int, help="export version (default: the next one)")
    p.add_argument("--results", type=int,
                   help="products returned per query (default: the run's results)")
    p.add_argument("--cache-dir", dest="cache_dir",
                   help="title-vector cache (default <run workdir>/cache): titles found "
                        "there are not embedded again")
    p.add_argument("--index", choices=("exact", "ivf", "auto"),
                   help="dense retrieval top-k (default: the run's index, auto: IVF from "
                        "index_min_items products)")
    p.add_argument("--nlist", type=int, help="IVF lists (default: the run's; 0: ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int,
                   help="IVF lists probed per query (default: the run's; 0: tuned on the "
                        "run's validation queries to index_target_recall)")
    p.add_argument("--coarse-dims", dest="coarse_dims", type=int,
                   help="exact top-k's first pass on this many principal components, its "
                        "shortlist re-scored (default: the run's coarse_dims; 0: one exact "
                        "pass)")
    p.add_argument("--precision", choices=EXPORT_PRECISIONS,
                   help="storage of the exported product vectors (default: the run's "
                        "search.precision)")
    p.add_argument("-v", "--verbose", action="store_true")


def add_distill_command(sub) -> None:
    p = sub.add_parser(
        "distill", help="distil a trained search into a shallower query encoder",
        description="Train a student query encoder (the teacher's first --layers blocks, "
                    "or a word bag with --layers 0) "
                    "on the teacher's query vectors and score lists (cosine + listwise KL; "
                    "tfrec.search.distill), save it as a search run under --workdir, print "
                    "teacher vs student NDCG@10 and batch-1 latency, and export it.")
    p.add_argument("--run", required=True, metavar="DIR",
                   help="the teacher: a --workdir of `tfrec search train`")
    p.add_argument("--workdir", required=True,
                   help="output: student encoder, student run (search/), distill.json")
    p.add_argument("--layers", type=int,
                   help="blocks the student keeps (default 2; 0: a bag of word vectors)")
    p.add_argument("--epochs", type=int, help="distillation epochs (default 6)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override one DistillConfig field, e.g. --set lr=2e-4")
    p.add_argument("--export-base", dest="export_base",
                   help="export root (default <workdir>/export)")
    p.add_argument("--model-name", dest="model_name", default="search")
    p.add_argument("--precision", choices=EXPORT_PRECISIONS,
                   help="storage of the exported product vectors (default: the teacher "
                        "run's search.precision)")
    p.add_argument("--no-export", action="store_true", dest="no_export")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("-v", "--verbose", action="store_true")


def run_search(args: argparse.Namespace) -> int:
    """Dispatches a parsed `tfrec search ...` command."""
    handlers = {"train": _train, "index": _index, "distill": _distill}
    return handlers[args.search_command](args)


def apply_overrides(cfg: SearchConfig, items: Sequence[str]) -> SearchConfig:
    """Applies `field=value` strings (values parsed as YAML) with SearchConfig's type checks.

    A leading `search.` is accepted (`--set search.epochs=2`).

    Raises:
      ValueError: malformed item, unknown field or a value of the wrong type.
    """
    for item in items:
        key, value = parse_assignment(item, "field=value (e.g. --set epochs=2)")
        if key.startswith("search."):
            key = key[len("search."):]
        set_field(cfg, key, value, prefix="search")
    return cfg


def search_config(args: argparse.Namespace) -> SearchConfig:
    """Config file, then --set, then the explicit flags (--judgments, --seed)."""
    cfg = SearchConfig.from_yaml(args.config) if args.config else SearchConfig()
    apply_overrides(cfg, args.set)
    if args.judgments is not None:
        cfg.judgments = args.judgments
    if args.seed is not None:
        cfg.seed = args.seed
    if getattr(args, "results", None) is not None:
        if args.results < 1:
            raise ValueError(f"--results must be >= 1, got {args.results}")
        cfg.results = args.results
    return cfg


def check_inputs(cfg: SearchConfig) -> None:
    """Fails fast (before TensorFlow loads) on inputs that do not exist.

    Raises:
      FileNotFoundError: naming the missing judgments file or encoder directory.
      ValueError: a setting `SearchConfig.check` refuses (strategy, ranker folds,
        analyzers, BM25 k1 / b).
    """
    cfg.check()
    source = cfg.judgments
    if source and not source.startswith("synthetic:") and not os.path.isfile(source):
        raise FileNotFoundError(f"judgments file {source!r} does not exist (pass a Home Depot "
                                f"style CSV or synthetic:tiny with --judgments)")
    for what, handle in (("encoder", cfg.encoder), ("preprocessor", cfg.preprocessor)):
        if "://" not in handle and not os.path.isdir(handle):
            raise FileNotFoundError(
                f"{what} {handle!r} does not exist; run `tfrec text import-minilm` or point "
                f"--set {what}=DIR at a TF-Hub-format BERT {what}")


def format_metrics(metrics: Mapping[str, Mapping[str, float]], title: str = "test") -> str:
    """Fixed-width table: one row per stage (pipeline order), ndcg@10 / recall@100 / mrr."""
    stages = [s for s in STAGE_ORDER if s in metrics] + sorted(
        s for s in metrics if s not in STAGE_ORDER)
    width = max([len("stage")] + [len(s) for s in stages])
    queries = next((int(metrics[s]["queries"]) for s in stages if "queries" in metrics[s]),
                   None)
    head = f"{title} queries" + (f" ({queries})" if queries is not None else "")
    lines = [head, f"{'stage':<{width}}  " + "  ".join(f"{c:>10}" for c in METRIC_COLUMNS)]
    for stage in stages:
        cells = []
        for column in METRIC_COLUMNS:
            value = metrics[stage].get(column, math.nan)
            cells.append(f"{value:>10.4f}")
        lines.append(f"{stage:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    cfg = search_config(args)
    check_inputs(cfg)
    export_base = args.export_base or os.path.join(args.workdir, "export")

    from tfrec.search.export import export_search
    from tfrec.search.index import tuned_config
    from tfrec.search.train import train_search

    log_dir = args.log_dir or os.path.join("tensorboard_logs", "search", f"seed{cfg.seed}")
    if args.warm_start:
        from tfrec.search.index import resolve_search_run
        resolve_search_run(args.warm_start)  # a clear error before any training
    run = train_search(cfg, args.workdir, zero_shot=args.zero_shot, log_dir=log_dir,
                       warm_start=args.warm_start)
    path: Optional[str] = None
    if not args.no_export:
        path = export_search(run.pipeline, export_base, model_name=args.model_name,
                             version=args.version, num_results=cfg.results,
                             precision=cfg.precision,
                             card={"metrics": run.metrics, "judgments": cfg.judgments,
                                   "seed": cfg.seed, "config": dataclasses.asdict(
                                       tuned_config(cfg, run.pipeline))})
    if args.json:
        print(json.dumps({"metrics": run.metrics, "query_category": run.query_category,
                          "timings": run.timings, "export": path}, indent=2))
        return 0
    sizes = {k: int(v["query"].nunique()) for k, v in run.data.splits.items()}
    print(f"catalog {len(run.data.catalog)} products; queries train {sizes.get('train', 0)} / "
          f"val {sizes.get('val', 0)} / test {sizes.get('test', 0)}; trained in "
          f"{run.timings.get('total_s', 0.0):.0f}s ({cfg.strategy}, {run.replicas} replicas)")
    print(format_metrics(run.metrics))
    tuned = run.history.get("hybrid_weight_val_ndcg@10")
    print(f"hybrid score: BM25 weight {run.pipeline.hybrid_weight:g}"
          + (f" (best validation NDCG@10 {max(tuned):.4f} of {len(tuned)} weights tried)"
             if tuned else ""))
    tuned = run.history.get("feedback_val_recall@100")
    if run.pipeline.ranker is not None:
        print(f"results past {run.pipeline.feedback_keep}: feedback weight "
              f"{run.pipeline.feedback_weight:g}, {run.pipeline.feedback_extra} more products "
              f"from the feedback query"
              + (f" (best validation Recall@100 {max(v for *_, v in tuned):.4f} of "
                 f"{len(tuned)} settings tried)" if tuned else ""))
    qc = run.query_category
    if qc:
        print(f"query category ({qc['categories']} categories from the {qc['source']}): test "
              f"accuracy {qc['test_accuracy']:.3f} (most common category "
              f"{qc['test_prior_accuracy']:.3f})")
    print(f"metrics {os.path.join(args.workdir, 'search', 'metrics.json')}; "
          f"TensorBoard logs {log_dir}")
    if path:
        print(f"exported {path}")
        print(f"serve it: tfrec serve --base-dir {export_base} --model-name {args.model_name}; "
              f"then: tfrec query --model {args.model_name} --query \"...\"")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from tfrec.search.distill import DistillConfig, distill_search
    from tfrec.search.index import resolve_search_run

    settings = DistillConfig()
    for item in args.set:
        key, value = parse_assignment(item, "field=value (e.g. --set lr=2e-4)")
        set_field(settings, key, value, prefix="distill")
    for name in ("layers", "epochs"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    resolve_search_run(args.run)  # a clear error before TensorFlow work
    result = distill_search(args.run, args.workdir, settings)
    path = None
    if not args.no_export:
        from tfrec.search.export import export_search

        path = export_search(result["pipeline"], args.export_base or
                             os.path.join(args.workdir, "export"), model_name=args.model_name,
                             precision=args.precision or result["precision"],
                             card={"metrics": result["student"]["metrics"],
                                   "distilled_from": result["teacher_run"]})
    figures = {k: v for k, v in result.items() if k != "pipeline"}
    figures["export"] = path
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(format_metrics(result["teacher"]["metrics"], title="teacher, test"))
    print(format_metrics(result["student"]["metrics"], title="student, test"))
    kept = ", ".join(f"{k} {v:.2f}" for k, v in result["kept_gain_over_bm25"].items())
    print(f"student keeps of the teacher's NDCG@10 gain over BM25: {kept}")
    if "kept_gain_no_feedback_products" in result:
        kept = ", ".join(f"{k} {v:.2f}"
                         for k, v in result["kept_gain_no_feedback_products"].items())
        print(f"... the student without feedback products: {kept}")
    for name, (t, s_) in {k: (result["teacher"]["latency_ms"].get(k, math.nan), v) for k, v in
                          result["student"]["latency_ms"].items()}.items():
        print(f"batch-1 {name} ms: teacher {t:.2f}, student {s_:.2f} ({s_ / t:.2f}x)")
    if path:
        print(f"exported {path}")
    return 0


def _index(args: argparse.Namespace) -> int:
    if args.results is not None and args.results < 1:
        raise ValueError(f"--results must be >= 1, got {args.results}")
    from tfrec.search.export import export_search
    from tfrec.search.index import load_search_pipeline, read_products, resolve_search_run

    run_dir = resolve_search_run(args.run)
    products = read_products(args.catalog)  # bad tables fail before TensorFlow work
    overrides = {k: getattr(args, k) for k in ("index", "nlist", "nprobe", "coarse_dims",
                                               "precision") if getattr(args, k) is not None}
    pipeline, cfg = load_search_pipeline(run_dir, products, cache_dir=args.cache_dir,
                                         overrides=overrides)
    workdir = os.path.dirname(os.path.abspath(run_dir))
    export_base = args.export_base or os.path.join(workdir, "export")
    results = args.results or cfg.results
    path = export_search(pipeline, export_base, model_name=args.model_name,
                         version=args.version, num_results=results, precision=cfg.precision,
                         card={"run": os.path.abspath(run_dir),
                               "catalog": os.path.abspath(args.catalog),
                               "config": dataclasses.asdict(cfg)})
    card = pipeline.index_card
    how = (f"IVF {card['nlist']} lists, nprobe {card['nprobe']}, recall@100 vs exact "
           f"{card['recall_vs_exact']['recall@100']:.3f} on {card['recall_vs_exact']['source']}"
           if card.get("index") == "ivf" else "exact top-k")
    if "coarse" in card:
        coarse = card["coarse"]
        how += (f", first pass on {coarse['dims']} components, recall@100 vs exact "
                f"{coarse['recall_vs_exact'][str(coarse['dims'])]['recall@100']:.3f} on "
                f"{coarse['source']}")
    print(f"indexed {len(products)} products ({how}); exported {path}")
    return 0


def format_search_results(rows: Sequence[Mapping[str, Any]], max_title: int = 60) -> str:
    """Fixed-width table of catalog search rows (PredictClient.catalog_search)."""
    if not rows:
        return "(no results)"
    id_width = max(len("product_id"), *(len(str(r["product_id"])) for r in rows))
    lines = [f"{'rank':>4}  {'product_id':<{id_width}}  {'score':>9}  {'dense':>7}  "
             f"{'bm25':>7}  title"]
    for r in rows:
        title = str(r.get("title", ""))
        if len(title) > max_title:
            title = title[: max_title - 3] + "..."
        lines.append(f"{r['rank']:>4}  {str(r['product_id']):<{id_width}}  {r['score']:>9.4f}  "
                     f"{r['dense_score']:>7.4f}  {r['bm25_score']:>7.3f}  {title}")
    return "\n".join(lines)


def is_catalog_search(signatures: Mapping[str, Any]) -> bool:
    """Whether model metadata (PredictClient.metadata) is a search export's."""
    default = signatures.get("serving_default") or {}
    return (set(default.get("inputs", {})) == {"query"}
            and "product_ids" in default.get("outputs", {}))

