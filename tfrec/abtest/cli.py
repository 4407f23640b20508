"""`tfrec abtest run|report`: an online experiment on simulated shoppers, and its report.

Hooked into the main parser by tfrec.cli; heavy imports happen in the handlers, so a
bad argument fails at once.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_OUT = os.path.join("work", "abtest")
DEFAULT_EXPERIMENTS = os.path.join("serving", "experiments.yaml")


def add_abtest_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `tfrec abtest run` and `tfrec abtest report`."""
    abtest = subparsers.add_parser(
        "abtest", help="online A/B test on simulated shoppers, and its report",
        description="Serve an experiment (serving/experiments.yaml) on loopback, replay "
                    "synthetic-world users against it, and report per-arm CTR/CVR/GMV.")
    sub = abtest.add_subparsers(dest="abtest_command", metavar="ABTEST_COMMAND")
    sub.required = True
    p = sub.add_parser(
        "run", help="simulated shoppers request lists from the experiment and react",
        description="Starts the embedded server with the experiment and request logging, "
                    "lets N world users request k-item lists for D days after the world's "
                    "end, and writes logs/, outcomes.parquet and data/ (the world's tables, "
                    "its events extended by the served traffic: `tfrec train --data-dir "
                    "OUT/data`).")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENTS,
                   help=f"experiments YAML (default {DEFAULT_EXPERIMENTS})")
    p.add_argument("--name", help="experiment for recommendation requests when the file has "
                                  "several")
    p.add_argument("--search", help="experiment of the file that search requests go to (query "
                                    "and target item from the world's search log); default: "
                                    "recommendations only")
    p.add_argument("--search-share", type=float, default=0.4, dest="search_share",
                   help="share of requests that are searches, with --search (default 0.4)")
    p.add_argument("--data-dir", dest="data_dir", default=os.path.join("work", "data"),
                   help="the synthetic world (with ground_truth.npz; default work/data)")
    p.add_argument("--users", type=int, default=1000, help="simulated shoppers")
    p.add_argument("--days", type=int, default=7, help="simulated days")
    p.add_argument("--k", type=int, default=10, help="items per list")
    p.add_argument("--requests-per-day", type=float, default=1.0, dest="requests_per_day",
                   help="mean requests per shopper and day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="shoppers requesting at once")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("report", help="per-arm metrics, decision and off-policy check",
                       description="Reads an `abtest run` directory and writes "
                                   "abtest_report.json and abtest_report.html into it.")
    p.add_argument("--run", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--control", help="control arm (default: the first arm)")
    p.add_argument("--treatment", help="treatment arm (default: the second arm)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence (default 0.05)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_abtest_command(args: argparse.Namespace) -> int:
    if args.abtest_command == "run":
        return _run(args)
    return _report(args)


def _run(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.data_dir, "ground_truth.npz")):
        raise FileNotFoundError(
            f"{args.data_dir!r} holds no synthetic world (ground_truth.npz): simulated "
            f"shoppers need its true preferences; run `tfrec generate` or pass --data-dir")
    from tfrec.abtest.simulate import clear_run, run_abtest
    from tfrec.data.synthetic import World

    if args.overwrite:
        clear_run(args.out)
    record = run_abtest(World.load(args.data_dir), args.data_dir, args.experiment, args.out,
                        users=args.users, days=args.days, k=args.k,
                        requests_per_day=args.requests_per_day, seed=args.seed,
                        name=args.name, workers=args.workers, search=args.search,
                        search_share=args.search_share)
    print(f"{record['requests']} requests from {record['users']} shoppers over "
          f"{record['days']} days ({record['outcome_events']} outcome events) in "
          f"{record['seconds']} s -> {args.out}")
    for line in record["status"]:
        print(line)
    print(f"next: tfrec abtest report --run {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tfrec.abtest.report import REPORT_HTML, abtest_report

    report = abtest_report(args.run, alpha=args.alpha, control=args.control,
                           treatment=args.treatment)
    print(report["title"])
    _print_section(report)
    if "search" in report:
        print(f"\nsearch: {report['search']['treatment']} vs {report['search']['control']}")
        _print_section(report["search"])
    print(f"report: {os.path.join(args.run, REPORT_HTML)}")
    return 0


def _print_section(section) -> None:
    print(f"{'arm':<26}{'requests':>9}{'users':>7}{'CTR':>8}{'CVR':>8}{'GMV/user':>10}"
          f"{'GMV/req':>9}")
    for arm, row in section["arms"].items():
        per_user = "n/a" if row["gmv_per_user"] is None else f"{row['gmv_per_user']:.2f}"
        print(f"{arm:<26}{row['requests']:>9}{row['users']:>7}{row['ctr']:>8.4f}"
              f"{row['cvr']:>8.4f}{per_user:>10}{row['gmv_per_request']:>9.2f}")
    for metric, test in section["tests"].items():
        uplift = f"{test['relative_uplift']:+.1%}" if test["control_mean"] else "n/a"
        print(f"uplift {metric:<10}{uplift:>8}  CI [{test['ci_low']:.4g}, "
              f"{test['ci_high']:.4g}]  p={test['p_value']:.3g}")
    off_policy = section["off_policy"]
    if "skipped" in off_policy:
        print(f"off-policy: skipped ({off_policy['skipped']})")
    else:
        checks = [(off_policy["treatment"], off_policy["clicks_per_request"])]
        if "self_check" in off_policy:
            checks.append((f"{off_policy['control']} (exploit, self-check)",
                           off_policy["self_check"]["clicks_per_request"]))
        for who, entry in checks:
            pbm = (f", PBM-IPS {entry['pbm_ips']:.3f} [{entry['pbm_ips_ci_low']:.3f}, "
                   f"{entry['pbm_ips_ci_high']:.3f}]" if "pbm_ips" in entry else "")
            print(f"off-policy clicks/request of {who}: IPS {entry['ips']:.3f} "
                  f"[{entry['ips_ci_low']:.3f}, {entry['ips_ci_high']:.3f}]{pbm}, SNIPS "
                  f"{entry['snips']:.3f} vs online {entry['online']:.3f} "
                  f"[{entry['online_ci_low']:.3f}, {entry['online_ci_high']:.3f}]")
    print(f"decision: {section['decision']}")
