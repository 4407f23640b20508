"""`tfrec` command line: thin wrappers over tfrec.pipeline.

Errors a user can fix (bad input, missing files, bad config) print one line
`tfrec: error: ...` and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import List, Optional, Tuple

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS and quiet log defaults, before TensorFlow)

from tfrec.config import EXPORT_PRECISIONS, Config
from tfrec.logs import configure_logging


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (sections data/model/train/export/serve)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--workdir", help="put data, TFRecords, checkpoints and models under DIR")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _config(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if args.config else Config()
    if args.workdir:
        cfg.use_workdir(args.workdir)
    cfg.override(args.set)
    flag_map = {
        "world": ("data", "world"), "seed": ("data", "seed"), "data_dir": ("data", "data_dir"),
        "lang": ("data", "lang"),
        "strategy": ("train", "strategy"), "tpu": ("train", "tpu"),
        "cpu_devices": ("train", "cpu_devices"), "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"), "run_name": ("train", "run_name"),
        "steps_per_epoch": ("train", "steps_per_epoch"),
        "base_dir": ("export", "base_dir"), "model_name": ("export", "model_name"),
        "version": ("export", "version"), "precision": ("export", "precision"), "host": ("serve", "host"), "port": ("serve", "port"),
        "poll_seconds": ("serve", "poll_seconds"), "experiments": ("serve", "experiments"),
        "request_log": ("serve", "request_log"),
        "text_mode": ("ranking", "text_mode"), "ranker_epochs": ("ranking", "epochs"),
        "warm_start": ("train", "warm_start"), "train_days": ("data", "train_days"),
        "profile_steps": ("train", "profile_steps"),
        "tfrecord_dir": ("data", "tfrecord_dir"), "engine": ("data", "engine"),
        "max_bad_share": ("data", "max_bad_share"),
        "vocab_min_count": ("data", "vocab_min_count"),
        "pseudonymize_users": ("data", "pseudonymize_users"),
        "pseudonym_key_file": ("data", "pseudonym_key_file"),
    }
    for flag, (section, name) in flag_map.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(cfg, section), name, value)
    return cfg


def _privacy_flags(p: argparse.ArgumentParser, client: bool = False) -> None:
    """--pseudonymize-users and its key file: for data commands, or (`client`) for
    commands that send a user id to a served model (it knows pseudonyms only)."""
    p.add_argument("--pseudonymize-users", action="store_true",
                   default=False if client else None, dest="pseudonymize_users",
                   help="send the user id's pseudonym (the model was trained with "
                        "--pseudonymize-users; same key)" if client else
                        "replace user ids by a keyed hash (HMAC) as the tables are read, so "
                        "no raw id is written; the key comes from $TFREC_PSEUDONYM_KEY or "
                        "--pseudonym-key-file")
    p.add_argument("--pseudonym-key-file", dest="pseudonym_key_file", metavar="FILE",
                   default="" if client else None,
                   help="file holding the pseudonymisation secret (never copied anywhere; "
                        "default $TFREC_PSEUDONYM_KEY)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=["default", "one_device", "mirrored", "multi_worker",
                                          "parameter_server", "tpu"],
                   help="tf.distribute strategy (multi_worker / parameter_server read TF_CONFIG)")
    if p.prog.endswith(" train"):  # shared with `demo`, which trains in one process
        p.add_argument("--cluster", metavar="SPEC",
                       help="train on a cluster of local processes: local:N (N "
                            "MultiWorkerMirrored workers, worker 0 is the chief) or "
                            "local:ps=M,workers=N (ParameterServerStrategy, this process "
                            "coordinating); a failed worker stops the run with exit code 1")
    p.add_argument("--tpu", help="TPU address or name (with --strategy tpu)")
    p.add_argument("--cpu-devices", type=int, dest="cpu_devices",
                   help="split the CPU into N logical devices (e.g. Mirrored on CPU)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size", help="global batch size")
    p.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch")
    p.add_argument("--run-name", dest="run_name",
                   help="run directory name; an existing run resumes from its backup")
    p.add_argument("--warm-start", dest="warm_start", metavar="RUN",
                   help="start from this run's weights (name or directory) on newer data: "
                        "vocabularies grow with new ids, the optimizer starts fresh")
    p.add_argument("--train-days", type=float, dest="train_days", metavar="N",
                   help="train on the last N days before the validation period only")
    if p.prog.endswith(" train"):
        p.add_argument("--profile-steps", type=_step_range, dest="profile_steps",
                       metavar="FIRST,LAST",
                       help="trace training steps FIRST..LAST into the TensorBoard profile "
                            "(<log dir>/<run>/plugins/profile; view with the "
                            "tensorboard-plugin-profile package's trace viewer)")


def _client_user(args: argparse.Namespace) -> str:
    """The user id a client sends: its pseudonym with --pseudonymize-users."""
    if args.pseudonymize_users and args.user:  # the model knows pseudonyms only
        from tfrec.data.pseudonym import pseudonym, read_key

        return pseudonym(args.user, read_key(args.pseudonym_key_file))
    return args.user


def _step_range(text: str) -> Tuple[int, int]:
    """'10,15' -> (10, 15), for --profile-steps."""
    try:
        first, last = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST,LAST (e.g. 10,15), got {text!r}")
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"need 1 <= FIRST <= LAST, got {text!r}")
    return first, last


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read `tfrec: error: [subcommand: ]message`, as every
    other error of the command line does (argparse would print "tfrec export: error:");
    subcommand parsers inherit the class."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.partition(" ")[2]
        self.exit(2, f"tfrec: error: {command + ': ' if command else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tfrec", description="e-commerce search and recommendation with TensorFlow")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="write a synthetic e-commerce world",
                       description="Generate a seeded synthetic catalog, users and events "
                                   "with ground truth.")
    _add_common(p)
    p.add_argument("--world", help="preset: tiny, small, medium, large, xlarge")
    p.add_argument("--lang", choices=["en", "zh"],
                   help="language of titles, descriptions and queries (default: en)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="write events in parts (events/part-*.parquet), one chunk of users "
                        "at a time, in bounded memory (default: only for xlarge)")
    p.add_argument("--users-per-chunk", type=int, dest="users_per_chunk", metavar="N",
                   help="users per events part when streaming (default: 10000)")

    p = sub.add_parser("train", help="train the two-tower retrieval model",
                       description="Prepare TFRecords (once) and train retrieval under a "
                                   "tf.distribute strategy, logging to tensorboard_logs/.")
    _add_common(p)
    _train_flags(p)
    _privacy_flags(p)
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--prepared", dest="tfrecord_dir", metavar="DIR",
                   help="train on the records `tfrec prepare` wrote to DIR (either engine)")

    p = sub.add_parser(
        "prepare", help="validate the tables and write the training records",
        description="Validate catalog/users/events (bad rows counted by reason), split by "
                    "time, build histories, logQ probabilities and id vocabularies, and "
                    "write the sharded TFRecords `tfrec train` reads. Engines: pandas (one "
                    "process) or beam (Apache Beam: DirectRunner here, Flink/Spark/Dataflow "
                    "by --runner; pipeline options after --).",
        epilog="example: tfrec prepare --engine beam --runner DirectRunner -- "
               "--direct_running_mode=multi_processing --direct_num_workers=2")
    _add_common(p)
    _privacy_flags(p)
    p.add_argument("--data-dir", dest="data_dir", help="catalog/users/events tables (local "
                   "or, with Beam, any Beam filesystem such as gs://)")
    p.add_argument("--out", dest="tfrecord_dir", metavar="DIR",
                   help="where the records go (default: data.tfrecord_dir)")
    p.add_argument("--engine", choices=["pandas", "beam"], help="default: data.engine")
    p.add_argument("--runner", help="Beam runner, e.g. DirectRunner, FlinkRunner, "
                                    "SparkRunner, DataflowRunner (default: DirectRunner)")
    p.add_argument("--max-bad-share", type=float, dest="max_bad_share", metavar="SHARE",
                   help="fail (exit 2) when a table has more bad rows than this share "
                        "(default: data.max_bad_share, 0)")
    p.add_argument("--dead-letter", metavar="FILE",
                   help="write the bad rows there as JSON lines {table, reason, row}")
    p.add_argument("--min-count", type=int, dest="vocab_min_count", metavar="N",
                   help="ids with fewer training examples stay out of the vocabularies")
    p.add_argument("--buckets", type=int, default=256,
                   help="Beam: users / items are processed in this many groups (default 256)")
    p.add_argument("--shuffle", choices=["auto", "runner", "disk"], default="auto",
                   help="Beam: group through files on disk, one bucket in memory at a time "
                        "(local runners), or in the runner's shuffle; auto: disk on the "
                        "DirectRunner, the runner's elsewhere")
    p.add_argument("beam_args", nargs="*", metavar="BEAM_OPTION",
                   help="Beam pipeline options, after --")

    p = sub.add_parser("train-ranker", help="train the ranker of a retrieval run",
                       description="Train the multi-task DCN ranker on the retrieval run's "
                                   "top-K candidates for the validation period (labels: what "
                                   "users did next), logging to tensorboard_logs/<run>/ranker.")
    _add_common(p)
    p.add_argument("--run", help="retrieval run name (default: latest)")
    p.add_argument("--teacher", metavar="RUN",
                   help="distil: also learn the scores of the ranker of this run (name or "
                        "path; a copy of --run's run with its larger ranker), weighted by "
                        "ranking.distill_weight")
    p.add_argument("--strategy", choices=["default", "one_device", "mirrored", "multi_worker",
                                          "tpu"], help="tf.distribute strategy")
    p.add_argument("--text-mode", dest="text_mode", choices=["bow", "fast", "cross"],
                   help="query/title text: bag of words, or BERT fast / cross-encoder mode")
    p.add_argument("--cpu-devices", type=int, dest="cpu_devices",
                   help="split the CPU into N logical devices (e.g. Mirrored on CPU)")
    p.add_argument("--epochs", type=int, dest="ranker_epochs")
    p.add_argument("--warm-start", dest="warm_start", metavar="RUN",
                   help="start from the ranker of this retrieval run (name or directory); "
                        "tables grow with the run's vocabularies, the optimizer starts fresh")

    p = sub.add_parser("evaluate", help="test-period metrics beside baselines",
                       description="Recall@k / NDCG of a trained run (or exported model) beside "
                                   "the popularity baseline and the oracle.")
    _add_common(p)
    p.add_argument("--run", help="run name (default: latest)")
    p.add_argument("--saved-model", help="evaluate an exported version directory instead")
    p.add_argument("--data-dir", dest="data_dir", help="tables to evaluate on (with --saved-model)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--search-history", dest="search_history", choices=["keep", "exclude"],
                   help="search rows: keep or exclude the searcher's history items "
                        "(default: as the ranker was trained, ranking.search_history)")
    p.add_argument("--max-users", type=int)
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="also write an HTML + JSON report (plots, slices, business metrics) "
                        "to DIR and log it to TensorBoard")

    p = sub.add_parser("export", help="write a versioned SavedModel",
                       description="Export <base>/<model>/<version>/ for TensorFlow Serving: "
                                   "retrieval, and when the run has a trained ranker also "
                                   "'ranker' and the search/recommend 'pipeline'.")
    _add_common(p)
    p.add_argument("--run", help="run name (default: latest)")
    p.add_argument("--base-dir", dest="base_dir")
    p.add_argument("--model-name", dest="model_name")
    p.add_argument("--version", type=int)
    p.add_argument("--retrieval-only", action="store_true", dest="retrieval_only",
                   help="skip the ranker and pipeline models even if the run has a ranker")
    p.add_argument("--gate", type=float, metavar="TOL", nargs="?", const=0.01,
                   help="export only if the run's validation recall@100 is not below the "
                        "currently exported version's by more than TOL (default 0.01); "
                        "both figures go into the model card, a refusal exits 2")
    p.add_argument("--catalog", metavar="PATH",
                   help="product table to serve (Parquet/CSV with the catalog columns; "
                        "default: the run's data catalog): new items are embedded and "
                        "ranked from their content, stock and prices come from it")
    p.add_argument("--format", choices=("savedmodel", "tflite"), default="savedmodel",
                   help="tflite: an on-device export instead (<base>/<model>_tflite/"
                        "<version>/ with float32.tflite and int8.tflite: query tower, item "
                        "embeddings and a top-k; builtin TFLite ops only)")
    p.add_argument("--precision", choices=EXPORT_PRECISIONS,
                   help="storage of the SavedModels' catalog-sized tables (id, word and "
                        "trigram tables of retrieval and ranker, catalog embeddings); int8 "
                        "keeps a scale per row. "
                        "Read back as float32: about 1/4 (int8) or 1/2 of their memory")
    p.add_argument("--k", type=int, default=20,
                   help="results per request of the tflite export (fixed in the file)")

    p = sub.add_parser("serve", help="embedded gRPC server (TF Serving API)",
                       description="Serve exported models over tensorflow-serving-api's "
                                   "PredictionService and ModelService.")
    _add_common(p)
    p.add_argument("--model-config-file", help="TF Serving models.config (text proto)")
    p.add_argument("--base-dir", dest="base_dir")
    p.add_argument("--model-name", dest="model_name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--poll-seconds", type=float, dest="poll_seconds")
    p.add_argument("--max-workers", type=int, dest="max_workers",
                   help="threads answering RPCs (default serve.max_workers; at least 32 "
                        "with batching, as each waiting request holds one)")
    p.add_argument("--max-message-mb", type=float, default=64.0, dest="max_message_mb",
                   help="largest gRPC request/response in MiB (default 64)")
    p.add_argument("--enable-batching", action="store_true", dest="enable_batching",
                   help="merge concurrent Predict requests into one model call")
    p.add_argument("--batching-parameters-file", dest="batching_parameters_file",
                   help="TF Serving batching parameters text proto, e.g. "
                        "serving/batching_parameters.txt (implies --enable-batching)")
    p.add_argument("--monitoring-port", type=int, dest="monitoring_port",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")
    p.add_argument("--experiments", help="experiments YAML (serving/experiments.yaml): "
                                         "route each experiment's requests to one arm per user")
    p.add_argument("--request-log", dest="request_log",
                   help="directory for rotating Parquet logs of every answered Predict")

    p = sub.add_parser(
        "forget", help="remove a shopper's data and list what must be retrained",
        description="Remove the users' rows from the users/events tables under data.data_dir, "
                    "their examples from the prepared TFRecords (and the user vocabulary), "
                    "and their rows from the request logs (serve.request_log); then list the "
                    "training runs and exported models that learned from them. An id found "
                    "nowhere is an error (exit 2) and changes nothing.")
    _add_common(p)
    _privacy_flags(p)
    p.add_argument("--user", action="append", required=True, dest="users", metavar="ID",
                   help="user id to forget (repeatable); with --pseudonymize-users the raw "
                        "id (hashed with the key) or its pseudonym")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--prepared", dest="tfrecord_dir", metavar="DIR")
    p.add_argument("--request-log", dest="request_log", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("query", help="query a server (embedded or TF Serving)",
                       description="Ask a running server for recommendations, search results "
                                   "or similar items, printed with titles.")
    p.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT of the gRPC server")
    p.add_argument("--model", default="retrieval")
    p.add_argument("--user", default="", help="user id (new users are fine)")
    _privacy_flags(p, client=True)
    p.add_argument("--history", default="", help="comma-separated recent item ids")
    p.add_argument("--query", default="",
                   help="search text: personalized search (with a pipeline model: retrieval "
                        "-> ranker -> business rules), or catalog search with a `tfrec "
                        "search train` model (e.g. --model search)")
    p.add_argument("--exclude", default="", help="pipeline: comma-separated ids not to return "
                                                  "(e.g. out of stock now)")
    p.add_argument("--purchased", default="", help="pipeline: comma-separated ids already bought")
    p.add_argument("--similar", help="item id: show similar items instead")
    p.add_argument("--device", default="desktop")
    p.add_argument("--hour", type=int, default=12)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true", help="do not exclude history items")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--explain", action="store_true",
                   help="pipeline: show why each item is there; catalog search: also show "
                        "how the query was read (spelling corrections)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("explain", help="what drove a ranker's scores (attributions)",
                       description="Integrated-gradients attributions of a served ranker's "
                                   "score of each item to its feature groups (user, "
                                   "history, item, context, text, retrieval), via its "
                                   "`explain` signature. They add up to score - baseline "
                                   "(the score with every input at zero).")
    p.add_argument("--server", default="127.0.0.1:8500", help="HOST:PORT of the gRPC server")
    p.add_argument("--model", default="ranker", help="a ranker export (`tfrec export "
                                                     "--model ranker`)")
    p.add_argument("--item", action="append", required=True, metavar="ITEM_ID",
                   help="item to explain (repeatable)")
    p.add_argument("--user", default="", help="user id (new users are fine)")
    _privacy_flags(p, client=True)
    p.add_argument("--history", default="", help="comma-separated recent item ids")
    p.add_argument("--query", default="", help="search text, if any")
    p.add_argument("--device", default="desktop")
    p.add_argument("--hour", type=int, default=12)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("board", help="start TensorBoard on tensorboard_logs/",
                       description="Run TensorBoard over the training logs.")
    p.add_argument("--logdir", default="tensorboard_logs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("demo", help="generate, train, evaluate, export, serve, query",
                       description="The whole pipeline on the synthetic world, ending with a "
                                   "gRPC query against the embedded server.")
    _add_common(p)
    _train_flags(p)
    _privacy_flags(p)
    p.add_argument("--world", help="synthetic world preset (default: small)")
    p.add_argument("--lang", choices=["en", "zh"], help="language of the world (default: en)")
    p.add_argument("--regenerate", action="store_true", help="regenerate the world")
    from tfrec.text.cli import add_text_commands
    add_text_commands(sub)
    from tfrec.search.cli import add_search_commands
    add_search_commands(sub)
    from tfrec.abtest.cli import add_abtest_commands
    add_abtest_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return _run(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line
        if not _is_user_error(e) or args.verbose:
            raise
        print(f"tfrec: error: {e}", file=sys.stderr)
        return 2


def _prepare(cfg: Config, args: argparse.Namespace) -> None:
    from tfrec import workflow

    beam_args = list(args.beam_args or [])
    if args.runner:
        beam_args.insert(0, f"--runner={args.runner}")
    if beam_args:
        if cfg.data.engine != "beam":
            raise ValueError("--runner and Beam pipeline options need --engine beam")
        cfg.data.beam_args = tuple(beam_args)
    meta = workflow.prepare(cfg, dead_letter=args.dead_letter, buckets=args.buckets,
                            shuffle=args.shuffle)
    counts = meta["counts"]
    print(f"prepared {counts['train']} train / {counts['val']} val / {counts['test']} test "
          f"examples from {meta['num_events']} events, {meta['num_items']} items, "
          f"{meta['num_users']} users ({meta['engine']}, {meta['seconds']}s) in "
          f"{cfg.data.tfrecord_dir}")
    for table, info in sorted((meta.get("bad_rows") or {}).items()):
        if info["bad"]:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(info["reasons"].items(),
                                                               key=lambda kv: -kv[1]))
            print(f"set aside {info['bad']} of {info['rows']} {table} rows ({reasons})")
    if args.dead_letter:
        print(f"bad rows: {args.dead_letter}")


def _forget(cfg: Config, args: argparse.Namespace) -> None:
    from tfrec import workflow

    report = workflow.forget(cfg, args.users)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    removed = report["removed"]
    tables = ", ".join(f"{n} {t} rows" for t, n in sorted(removed["tables"].items()))
    print(f"removed {tables or 'no table rows'}, {removed['records']} prepared examples, "
          f"{removed['vocabulary']} vocabulary entries and {removed['request_logs']} request "
          f"log rows")
    for what, key in (("retrain (the user's data is in its weights)", "retrain"),
                      ("re-export (built from such a run)", "reexport")):
        for path in report[key]:
            print(f"{what}: {path}")
    if not report["retrain"] and not report["reexport"]:
        print("no training run or exported model learned from these users")


def _is_user_error(e: Exception) -> bool:
    from tfrec.serving.client import ServingError

    return isinstance(e, (ValueError, FileNotFoundError, FileExistsError, ServingError))


def _run(args: argparse.Namespace) -> int:
    from tfrec import workflow

    cmd = args.command
    if cmd == "text":
        from tfrec.text.cli import run_text
        return run_text(args)
    if cmd == "search":
        from tfrec.search.cli import run_search
        return run_search(args)
    if cmd == "abtest":
        from tfrec.abtest.cli import run_abtest_command
        return run_abtest_command(args)
    if cmd == "query":
        return _query(args)
    if cmd == "explain":
        return _explain(args)
    if cmd == "board":
        return _board(args)
    cfg = _config(args)
    if cmd == "generate":
        info = workflow.generate(cfg, args.world, args.seed, stream=args.stream,
                                 users_per_chunk=args.users_per_chunk)
        parts = (f" in {info['parts']} part{'s' * (info['parts'] != 1)}" if "parts" in info
                 else "")
        print(f"wrote {info['items']} items, {info['users']} users, {info['events']} events"
              f"{parts} ({info['world']}, {info['lang']}, seed {info['seed']}) to "
              f"{info['data_dir']} in {info['seconds']}s")
    elif cmd == "prepare":
        _prepare(cfg, args)
    elif cmd == "train":
        from tfrec.training import cluster

        if cluster.is_server_task(cfg):  # a parameter-server cluster's worker or PS task
            return cluster.run_server()
        try:
            result = (cluster.launch(args.cluster, cfg, verbose=args.verbose)
                      if args.cluster else workflow.train(cfg))
        except cluster.ClusterError as e:
            print(f"tfrec: error: {e}", file=sys.stderr)
            return 1
        if isinstance(result, str):  # multi-worker: the workers printed their results
            print(f"run {cfg.train.run_name} finished on cluster {args.cluster}; "
                  f"run dir {result}")
            return 0
        cluster_info = (f", {result.workers} workers" if result.workers > 1
                        or result.strategy == "parameter_server" else "")
        cluster_info += f", {result.ps} ps" if result.ps else ""
        print(f"run {result.run_name} ({result.strategy}, {result.replicas} replicas"
              f"{cluster_info}): {result.examples_per_second:,.0f} examples/s")
        print("validation: " + " ".join(f"{k}={v:.4f}" for k, v in result.val_metrics.items()))
        print(f"run dir {result.run_dir}; TensorBoard logs {result.tensorboard_dir}")
    elif cmd == "train-ranker":
        result = workflow.train_ranker(cfg, run=args.run, teacher=args.teacher)
        print(f"ranker trained on {result.lists} lists in {result.seconds:.0f}s")
        print("validation: " + " ".join(f"{k}={v:.4f}" for k, v in result.val_metrics.items()))
        print(f"ranker dir {result.ranker_dir}; TensorBoard logs {result.tensorboard_dir}")
    elif cmd == "evaluate":
        from tfrec.evaluation.report import format_table

        rows = workflow.evaluate(cfg, run=args.run, saved_model=args.saved_model,
                                 split=args.split, max_users=args.max_users,
                                 report_dir=args.report, search_history=args.search_history)
        print(json.dumps(rows, indent=2) if args.json else
              format_table(rows, title=f"{args.split} period"))
        if args.report:
            print(f"report: {os.path.join(args.report, 'report.html')} (numbers in "
                  f"report.json)", file=sys.stderr if args.json else sys.stdout)
    elif cmd == "export" and args.format == "tflite":
        if args.gate is not None:
            raise ValueError("--gate compares against the served SavedModel; it does not "
                             "apply to --format tflite")
        print(workflow.export_edge(cfg, run=args.run, catalog=args.catalog, k=args.k))
    elif cmd == "export":
        print(workflow.export(cfg, run=args.run, catalog=args.catalog, gate=args.gate))
        if not args.retrieval_only and workflow.has_ranker(cfg, run=args.run):
            for path in workflow.export_ranking(cfg, run=args.run,
                                                catalog=args.catalog).values():
                print(path)
    elif cmd == "serve":
        return _serve(args, cfg)
    elif cmd == "forget":
        _forget(cfg, args)
    elif cmd == "demo":
        workflow.demo(cfg, world=args.world, regenerate=args.regenerate)
    return 0


def _serve(args: argparse.Namespace, cfg: Config) -> int:
    from tfrec.serving.batching import BatchingOptions, parse_batching_parameters
    from tfrec.serving.model_config import load_model_config
    from tfrec.serving.server import ModelServer

    if args.model_config_file:
        models = load_model_config(args.model_config_file)
    else:  # the retrieval model, plus the ranker, pipeline and search when exported
        models = {name: os.path.join(cfg.export.base_dir, name)
                  for name in (cfg.export.model_name, "ranker", "pipeline", "search")
                  if name == cfg.export.model_name
                  or os.path.isdir(os.path.join(cfg.export.base_dir, name))}
    experiments = {}
    if cfg.serve.experiments:
        from tfrec.serving.experiments import load_experiments

        experiments, arm_models = load_experiments(cfg.serve.experiments)
        models = {**models, **arm_models}
    batching = None
    if args.batching_parameters_file:
        batching = parse_batching_parameters(args.batching_parameters_file)
    elif args.enable_batching:
        batching = BatchingOptions()
    max_workers = args.max_workers or cfg.serve.max_workers
    if batching is not None and not args.max_workers:
        max_workers = max(max_workers, 32)  # each request waiting for a batch holds a thread
    server = ModelServer(models, host=cfg.serve.host, port=cfg.serve.port,
                         poll_seconds=cfg.serve.poll_seconds,
                         max_workers=max_workers,
                         max_message_mb=args.max_message_mb, batching=batching,
                         monitoring_port=args.monitoring_port, experiments=experiments,
                         request_log=cfg.serve.request_log or None)
    server.start()
    print(f"serving {', '.join(models)} on {cfg.serve.host}:{server.port} (Ctrl-C to stop)",
          flush=True)
    if batching is not None:
        print(f"batching: max_batch_size={batching.max_batch_size} batch_timeout_micros="
              f"{batching.batch_timeout_micros} num_batch_threads={batching.num_batch_threads}",
              flush=True)
    if args.monitoring_port is not None:
        print(f"metrics at {server.metrics_url}", flush=True)
    for line in server.experiment_status():
        print(line, flush=True)
    if server.request_log is not None:
        print(f"logging requests to {server.request_log.directory}", flush=True)
    _wait_for_stop()
    server.stop(1.0)
    return 0


def _wait_for_stop() -> None:
    """Blocks until Ctrl-C or SIGTERM, so servers shut down cleanly either way."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def _query(args: argparse.Namespace) -> int:
    from tfrec.search.cli import format_search_results, is_catalog_search
    from tfrec.serving.client import PredictClient, format_results

    client = PredictClient(args.server, timeout=args.timeout)
    history = _ids(args.history)
    args.user = _client_user(args)
    signatures = {} if args.similar else client.metadata(args.model)
    if is_catalog_search(signatures):  # `tfrec search train` export: query -> products
        answer = client.explain_catalog_search(args.query, model=args.model, k=args.k)
        rows = answer["results"]
        if args.json:
            print(json.dumps(answer if args.explain else rows, indent=2, ensure_ascii=False))
            return 0
        if args.explain:
            fixed = answer["corrected_words"]
            print(f"query: {args.query!r}; spelling: "
                  + (f"also searched as {fixed!r}" if fixed else "no correction"))
            if answer["query_category"]:
                print(f"category: {answer['query_category']} "
                      f"(p={answer['query_category_prob']:.2f})")
        print(format_search_results(rows))
        return 0
    if args.similar:
        rows = client.similar_items(args.model, args.similar, k=args.k)
    elif "search" in signatures:  # the combined pipeline model
        context = dict(history=history, device=args.device, hour=args.hour, k=args.k,
                       exclude=_ids(args.exclude), purchased=_ids(args.purchased))
        query = args.query.strip()  # blank text is no search: recommend instead
        rows = (client.search(args.model, args.user, query, **context) if query
                else client.recommend_pipeline(args.model, args.user, **context))
    else:
        rows = client.recommend(args.model, args.user, history=history, query=args.query,
                                device=args.device, hour=args.hour, k=args.k,
                                exclude_seen=not args.include_seen)
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json
          else format_results(rows, reasons=args.explain))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from tfrec.serving.client import PredictClient, format_attributions

    client = PredictClient(args.server, timeout=args.timeout)
    if "explain" not in client.metadata(args.model):
        raise ValueError(f"model {args.model!r} has no `explain` signature; export a ranker "
                         "(`tfrec export --model ranker`) with this version of tfrec")
    rows = client.explain(args.model, _client_user(args), args.item, query=args.query,
                          history=_ids(args.history), device=args.device, hour=args.hour)
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json
          else format_attributions(rows))
    return 0


def _ids(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _board(args: argparse.Namespace) -> int:
    from tensorboard import program

    if not os.path.isdir(args.logdir):
        raise FileNotFoundError(f"log directory {args.logdir!r} does not exist; train first")
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", args.logdir, "--host", args.host,
                          "--port", str(args.port)])
    print(f"TensorBoard on {board.launch()} (Ctrl-C to stop)", flush=True)
    _wait_for_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
