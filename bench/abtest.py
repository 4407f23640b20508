"""Online A/B test on simulated shoppers: retrieval order vs retrieval + ranker pipeline.

Generates a synthetic world, trains the two-tower and the ranker, evaluates them offline
(test period: retrieval order vs ranker re-order), exports both, then runs
`tfrec abtest run`: --users shoppers of the world request --k item lists for --days
days from the real embedded server (experiment routing by hashed user id, request
logging on loopback) and react with the world's true utilities and position bias.
Arm "retrieval" explores (epsilon, pool = the pipeline's candidates) so that the
report can estimate the ranker arm from its logs (position-based IPS) and compare with
the ranker arm's online result, and against the truth: the ranker's expected clicks
under the world's own behaviour model on the very requests the estimates come from.
Ratios are against the retrieval arm of the same run.

Usage: python bench/abtest.py [--world small] [--users 2000] [--days 7]
       [--epsilon 0.3] [--subsample 0.6 --keep 0.4] [--control-share 0.8]

--subsample adds order-keeping subsamples of the pool to the retrieval arm's exploration
and --control-share puts more users on it (more logged lists for the off-policy estimate,
fewer on the ranker); --work-dir keeps the world and models for the next run.

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the tiny world, 1 retrieval and
1 ranker epoch, 60 shoppers for 2 days. Same steps and tables; the figures mean
nothing. TensorFlow's graph optimizer is off (bench/_common.py). Options given
explicitly still override these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (format_table, machine_line, parse_smoke_args, ratio,  # noqa: E402
                     world_config)
from tfrec import workflow  # noqa: E402

SMOKE = dict(world="tiny", epochs=1, ranker_epochs=1, users=60, days=2, eval_users=100)


def prepare(root: str, args) -> dict:
    """World, retrieval, ranker, offline test metrics and the two exports under `root`.

    A `root` that already holds them (an earlier run with the same --work-dir) is reused.
    """
    cfg = world_config(root, args.world, args.seed, args.epochs, args.ranker_epochs)
    done = os.path.join(root, "prepared.json")
    if os.path.isfile(done):
        with open(done) as f:
            return {"cfg": cfg, "offline": json.load(f), "seconds": 0.0}
    start = time.perf_counter()
    workflow.generate(cfg)
    run = workflow.train(cfg)
    ranked = workflow.train_ranker(cfg, run=run.run_name, retrieval=run.model)
    offline = workflow.evaluate(cfg, run=run.run_name, max_users=args.eval_users)
    workflow.export(cfg, run=run.run_name, model=run.model)
    workflow.export_ranking(cfg, run=run.run_name, retrieval=run.model, ranker=ranked.model)
    with open(done, "w") as f:
        json.dump(offline, f, default=float)
    return {"cfg": cfg, "offline": offline, "seconds": time.perf_counter() - start}


def true_values(world, out: str, experiment: str) -> dict:
    """The ranker's expected clicks per request under the world's own behaviour model,
    on the retrieval arm's logged requests (what the off-policy estimates estimate) and
    on the ranker arm's own requests (what its online mean measures), over all requests
    and over each user's first (before either arm's lists changed what users hold)."""
    import json

    import numpy as np

    from tfrec.abtest.report import replay_lists
    from tfrec.data.io import read_table
    from tfrec.serving.experiments import load_experiments
    from tfrec.serving.request_log import read_request_logs

    with open(os.path.join(out, "abtest.json")) as f:
        record = json.load(f)
    arms = {a.name: a for a in load_experiments(record["experiments_file"])[0][
        experiment].arms}
    logs = read_request_logs(os.path.join(out, "logs"))
    logs = logs[logs["experiment"] == experiment]
    # Simulated request times: every served list's impressions are in the run's events
    # (outcomes alone miss the requests nobody clicked).
    events = read_table(os.path.join(out, "data", "events.parquet"), "events")
    when = events[events["event_type"] == "impression"].groupby("session_id")["ts"].min()
    control = logs[logs["arm"] == "retrieval"].reset_index(drop=True)
    treated = logs[logs["arm"] == "ranker"].reset_index(drop=True)
    replayed = replay_lists(arms["ranker"], record["models"][arms["ranker"].model],
                            int(treated["version"].max()), control)

    def values(frame, lists):
        return np.array([world.expected_clicks(u, list(items), int(when[r]))
                         for u, items, r in zip(frame["user_id"], lists, frame["request_id"])])

    def first(frame):  # each user's first request: the state the world left, no carryover
        ts = frame["request_id"].map(when)
        return (ts == ts.groupby(frame["user_id"]).transform("min")).to_numpy()

    widths = control["item_ids"].map(len)
    logged = values(control, [items[:w] for items, w in zip(replayed, widths)])
    own = values(treated, treated["item_ids"])
    return {"logged": float(logged.mean()), "own": float(own.mean()),
            "logged_first": float(logged[first(control)].mean()),
            "own_first": float(own[first(treated)].mean())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="retrieval epochs (default: the trainer's, early stopping)")
    parser.add_argument("--ranker-epochs", type=int, default=None,
                        help="ranker epochs (default: the ranking config's)")
    parser.add_argument("--eval-users", type=int, default=None,
                        help="test users of the offline evaluation (default: all)")
    parser.add_argument("--users", type=int, default=2000, help="simulated shoppers")
    parser.add_argument("--days", type=int, default=7, help="simulated days")
    parser.add_argument("--k", type=int, default=10, help="items per list")
    parser.add_argument("--epsilon", type=float, default=0.3,
                        help="share of the retrieval arm's requests shown a random order")
    parser.add_argument("--subsample", type=float, default=0.0,
                        help="share of its requests shown an order-keeping subsample")
    parser.add_argument("--keep", type=float, default=0.5,
                        help="probability of keeping each pooled item in a subsample")
    parser.add_argument("--control-share", type=float, default=0.5, dest="control_share",
                        help="users on the retrieval (logging) arm")
    parser.add_argument("--work-dir", default=None, dest="work_dir",
                        help="keep the world, models and exports here and reuse them")
    parser.add_argument("--out", default=None,
                        help="write the A/B run (logs, outcomes, report) here and keep it")
    parser.add_argument("--workers", type=int, default=4, help="shoppers requesting at once")
    parser.add_argument("--search-share", type=float, default=0.4, dest="search_share",
                        help="share of requests that are searches (experiment 'search')")
    args = parse_smoke_args(parser, argv, SMOKE)
    import yaml

    from tfrec.abtest.report import abtest_report
    from tfrec.abtest.simulate import ranker_experiments, run_abtest
    from tfrec.data.synthetic import World

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="tfrec-bench-abtest-") as tmp:
        root = args.work_dir or tmp
        prepared = prepare(root, args)
        cfg = prepared["cfg"]
        print(f"world, retrieval, ranker, offline evaluation, exports: "
              f"{prepared['seconds']:.0f}s", flush=True)
        out = args.out or os.path.join(tmp, "abtest")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "experiments.yaml")  # beside its run: runs may share root
        models = {name: os.path.join(os.path.abspath(root), "models", name)
                  for name in ("retrieval", "pipeline")}
        with open(path, "w") as f:
            yaml.safe_dump(ranker_experiments(
                args.epsilon, cfg.ranking.candidates, salt=f"bench-{args.seed}-",
                models=models, subsample=args.subsample, keep=args.keep,
                control_share=args.control_share), f)
        t0 = time.perf_counter()
        record = run_abtest(World.load(cfg.data.data_dir), cfg.data.data_dir, path, out,
                            users=args.users, days=args.days, k=args.k, seed=args.seed,
                            workers=args.workers, name="home_feed", search="search",
                            search_share=args.search_share)
        simulated = time.perf_counter() - t0
        report = abtest_report(out)
        truth = true_values(World.load(cfg.data.data_dir), out, "home_feed")
    print(f"{record['requests']} requests from {record['users']} shoppers over {args.days} "
          f"days in {simulated:.0f}s ({record['requests'] / simulated:.0f} requests/s incl. "
          f"reactions)")

    arms = report["arms"]
    base = arms["retrieval"]
    rows = [[name, a["requests"], a["users"], f"{a['ctr']:.4f}", f"{a['cvr']:.4f}",
             "n/a" if a["gmv_per_user"] is None else f"{a['gmv_per_user']:.2f}",
             f"{a['gmv_per_request']:.2f}", f"{a['clicks_per_request']:.3f}",
             ratio(a["ctr"], base["ctr"]), ratio(a["gmv_per_request"], base["gmv_per_request"])]
            for name, a in sorted(arms.items())]
    print()
    print(format_table(["arm", "requests", "users", "CTR", "CVR", "GMV/user", "GMV/req",
                        "clicks/req", "CTR vs retrieval", "GMV/req vs retrieval"], rows,
                       title=f"online, {args.world} world, top-{args.k} lists, "
                             f"{args.control_share:.0%} of users on retrieval (it explores: "
                             f"random order {args.epsilon:g}, subsample {args.subsample:g} "
                             f"keeping {args.keep:g}; 'exploit only': its requests that got "
                             f"the model's order)"))
    tests = [[metric, f"{t['control_mean']:.4g}", f"{t['treatment_mean']:.4g}",
              f"{t['relative_uplift']:+.1%}" if t["control_mean"] else "n/a",
              f"[{t['ci_low']:.4g}, {t['ci_high']:.4g}]",
              f"{t['p_value']:.3g}", "yes" if t["significant"] else "no"]
             for metric, t in report["tests"].items()]
    print()
    print(format_table(["per-user metric", "retrieval", "ranker", "uplift", "95% CI of uplift",
                        "p", "significant"], tests, title="A/B test, users as units"))
    offline = prepared["offline"]
    online = report["tests"]
    compare = [
        ["offline ndcg@10 (test period)", f"{offline['two_tower']['ndcg@10']:.4f}",
         f"{offline['two_tower+ranker']['ndcg@10']:.4f}",
         ratio(offline["two_tower+ranker"]["ndcg@10"], offline["two_tower"]["ndcg@10"])],
        ["offline purchase_rate@10", f"{offline['two_tower']['purchase_rate@10']:.4f}",
         f"{offline['two_tower+ranker']['purchase_rate@10']:.4f}",
         ratio(offline["two_tower+ranker"]["purchase_rate@10"],
               offline["two_tower"]["purchase_rate@10"])],
        ["online clicks per user", f"{online['clicks']['control_mean']:.4f}",
         f"{online['clicks']['treatment_mean']:.4f}",
         ratio(online["clicks"]["treatment_mean"], online["clicks"]["control_mean"])],
        ["online purchases per user", f"{online['purchases']['control_mean']:.4f}",
         f"{online['purchases']['treatment_mean']:.4f}",
         ratio(online["purchases"]["treatment_mean"], online["purchases"]["control_mean"])],
    ]
    exploit = arms.get("retrieval (exploit only)")
    if exploit:
        compare.append(["online clicks per request, exploit only",
                        f"{exploit['clicks_per_request']:.4f}",
                        f"{arms['ranker']['clicks_per_request']:.4f}",
                        ratio(arms["ranker"]["clicks_per_request"],
                              exploit["clicks_per_request"])])
    print()
    print(format_table(["measure", "retrieval", "ranker", "ranker vs retrieval"], compare,
                       title="offline re-rank gain beside the online uplift"))
    section = report["off_policy"]
    print()
    if "skipped" in section:
        print(f"off-policy: skipped ({section['skipped']})")
    else:
        def estimator_rows(entries, who):
            rows = []
            for metric, e in entries:
                for name, key in (("IPS", "ips"), ("SNIPS", "snips"), ("PBM-IPS", "pbm_ips")):
                    if key not in e:
                        continue
                    rows.append([f"{who} {metric}", name, f"{e['online']:.4f}",
                                 f"[{e['online_ci_low']:.4f}, {e['online_ci_high']:.4f}]",
                                 f"{e[key]:.4f}",
                                 f"[{e[key + '_ci_low']:.4f}, {e[key + '_ci_high']:.4f}]",
                                 ratio(e[key], e["online"]),
                                 "yes" if e[f"online_within_{key}_ci"] else "no",
                                 "yes" if e[f"{key}_within_online_ci"] else "no",
                                 f"{e[key + '_ci_high'] - e[key + '_ci_low']:.3f}"])
            return rows

        entries = [("ranker", m, e) for m, e in section.items()
                   if isinstance(e, dict) and m != "self_check"]
        entries += [("retrieval exploit", m, e)
                    for m, e in section.get("self_check", {}).items()]
        rows = [row for who, metric, e in entries for row in estimator_rows([(metric, e)], who)]
        skipped = [f"{who} {metric}: {e['pbm_ips_skipped']}" for who, metric, e in entries
                   if "pbm_ips_skipped" in e]
        print(format_table(["policy / metric", "estimator", "online", "online 95% CI (users)",
                            "estimate", "95% CI", "vs online", "online in CI",
                            "estimate in online CI", "CI width"], rows,
                           title=f"off-policy, from {section['logged_requests']} retrieval-arm "
                                 f"requests ({section['matched_slots']} slots where the logged "
                                 f"item is the ranker's at its position); 'retrieval exploit': "
                                 f"the logging arm's own ranking vs its exploit-only requests"))
        for line in skipped:
            print(f"PBM-IPS skipped for {line}")
        clicks = section["clicks_per_request"]
        rows = [["true value on the retrieval arm's requests (world's model)",
                 f"{truth['logged']:.4f}", "1.00x"]]
        rows += [[name, f"{clicks[key]:.4f}", ratio(clicks[key], truth["logged"])]
                 for name, key in (("PBM-IPS", "pbm_ips"), ("IPS", "ips"), ("SNIPS", "snips"))
                 if key in clicks]
        rows += [["true value on its own arm's requests (world's model)",
                  f"{truth['own']:.4f}", ratio(truth["own"], truth["logged"])],
                 ["online, its own arm", f"{clicks['online']:.4f}",
                  ratio(clicks["online"], truth["logged"])],
                 ["true value, retrieval arm's users' first requests",
                  f"{truth['logged_first']:.4f}", ratio(truth["logged_first"], truth["logged"])],
                 ["true value, its own arm's users' first requests",
                  f"{truth['own_first']:.4f}", ratio(truth["own_first"], truth["logged"])]]
        print()
        print(format_table(["ranker clicks per request", "value", "vs true on logged"], rows,
                           title="the estimators against the truth they estimate: the "
                                 "simulator's expected clicks of the ranker's lists"))
    print(f"decision: {report['decision']}")
    search = report["search"]
    rows = []
    for name, a in sorted(search["arms"].items()):
        rows.append([name, a["requests"], f"{a['ctr']:.4f}", f"{a['cvr']:.4f}",
                     f"{a['gmv_per_request']:.2f}", ratio(a["ctr"], search["arms"]["retrieval"]
                                                          ["ctr"])])
    print()
    print(format_table(["search arm", "requests", "CTR", "CVR", "GMV/req", "CTR vs retrieval"],
                       rows, title=f"search requests ({args.search_share:.0%} of requests: query "
                                   f"and target item from the world's search log)"))
    tests = [[metric, f"{t['relative_uplift']:+.1%}" if t["control_mean"] else "n/a",
              f"[{t['ci_low']:.4g}, {t['ci_high']:.4g}]", f"{t['p_value']:.3g}"]
             for metric, t in search["tests"].items()]
    print()
    print(format_table(["search per-user metric", "uplift", "95% CI of uplift", "p"], tests,
                       title="search A/B test, users as units"))
    entry = search["off_policy"].get("clicks_per_request")
    if entry:
        print(f"search off-policy clicks/request of the ranker: IPS {entry['ips']:.3f} "
              f"[{entry['ips_ci_low']:.3f}, {entry['ips_ci_high']:.3f}] ("
              f"{ratio(entry['ips'], entry['online'])} of online {entry['online']:.3f} "
              f"[{entry['online_ci_low']:.3f}, {entry['online_ci_high']:.3f}]), SNIPS "
              f"{entry['snips']:.3f}" + (
                  f", PBM-IPS {entry['pbm_ips']:.3f} [{entry['pbm_ips_ci_low']:.3f}, "
                  f"{entry['pbm_ips_ci_high']:.3f}] ({ratio(entry['pbm_ips'], entry['online'])})"
                  if "pbm_ips" in entry else ""))
    print(f"search decision: {search['decision']}")


if __name__ == "__main__":
    main()
