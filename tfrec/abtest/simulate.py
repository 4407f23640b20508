"""Simulated shoppers for an online experiment: requests in, reactions out, all logged.

A live A/B test needs weeks of traffic; a synthetic world knows every user's true
tastes, so its users can request lists from the real server (experiment routing,
exploration, request logging on loopback) and react to what they are shown by the
world's own behaviour model. The run leaves what a shop would have: request logs,
outcome events, and both joined as events that `tfrec train` reads.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

from tfrec.data.examples import user_states
from tfrec.data.io import write_table
from tfrec.data.schema import DEVICES, validate_table
from tfrec.data.synthetic import DAY, HOUR_WEIGHTS, World
from tfrec.serving.client import PredictClient
from tfrec.serving.experiments import Experiment, load_experiments
from tfrec.serving.request_log import read_request_logs
from tfrec.serving.server import ModelServer

logger = logging.getLogger(__name__)

HISTORY = 10  # recent items a shopper's requests carry
RUN_FILE = "abtest.json"
LOGS_DIR, OUTCOMES_FILE, DATA_DIR = "logs", "outcomes.parquet", "data"


def ranker_experiments(epsilon: float, pool: int, salt: str = "",
                       models: Optional[Mapping[str, str]] = None,
                       names: Tuple[str, str] = ("home_feed", "search"),
                       subsample: float = 0.0, keep: float = 0.5,
                       control_share: float = 0.5) -> Dict[str, Any]:
    """The experiments file (as a mapping) that tests tfrec's ranker: retrieval order vs
    the retrieval -> ranker -> rules pipeline, for recommendations and for search.

    The retrieval arms explore (epsilon over their top `pool`; pool = the pipeline's
    candidates gives every item the ranker may show a logged chance). Write it with
    `yaml.safe_dump`; serving/experiments.yaml is this with epsilon 0.1, pool 100.

    Args:
      epsilon / pool / subsample / keep: Exploration of the retrieval arms.
      salt: Prefix of the experiments' salts.
      models: Optional `models:` section (name -> base path).
      names: Names of the recommendation and the search experiment.
      control_share: Users on the retrieval arms (the logging policy); a larger share
        logs more lists for the off-policy estimate of the ranker.
    """
    lists = {"exclude_item_ids": [""], "purchased_item_ids": [""]}
    explore = {"epsilon": float(epsilon), "pool": int(pool)}
    if subsample:
        explore.update(subsample=float(subsample), keep=float(keep))
    shares = (float(control_share), 1.0 - float(control_share))

    def experiment(name: str, retrieval_inputs: Dict[str, Any], signature: str):
        return {"name": name, "salt": f"{salt}{name}", "arms": [
            {"name": "retrieval", "model": "retrieval", "signature": "serving_default",
             "share": shares[0], "inputs": retrieval_inputs, "exploration": explore},
            {"name": "ranker", "model": "pipeline", "signature": signature, "share": shares[1],
             "inputs": lists}]}

    raw: Dict[str, Any] = {"experiments": [
        experiment(names[0], {"query": "", "exclude_seen": True}, "recommend"),
        experiment(names[1], {"exclude_seen": False}, "search")]}
    if models:
        raw = {"models": dict(models), **raw}
    return raw


def pick_experiment(experiments: Mapping[str, Experiment],
                    name: Optional[str] = None) -> Experiment:
    """The named experiment, or the only one in the file.

    Raises:
      ValueError: the name is unknown, or several experiments and no name.
    """
    if name:
        if name not in experiments:
            raise ValueError(f"experiment {name!r} is not in the file (it has "
                             f"{sorted(experiments)})")
        return experiments[name]
    if len(experiments) != 1:
        raise ValueError(f"the file defines experiments {sorted(experiments)}; pick one with "
                         f"--name")
    return next(iter(experiments.values()))


class _Shopper:
    """One simulated user: requests lists, reacts, remembers what they clicked."""

    def __init__(self, world: World, user: str, device: str, history: List[str],
                 experiment: str, k: int, seed: int, index: int,
                 search: Optional[str] = None, search_share: float = 0.0):
        self.world, self.user, self.device = world, user, device
        self.history = history
        self.experiment, self.k, self.seed, self.index = experiment, k, seed, index
        self.search, self.search_share = search, search_share
        self.requested: Dict[str, int] = {}  # request id -> simulated time of the request

    def day(self, client: PredictClient, day: int, rate: float) -> List[Dict[str, Any]]:
        rng = np.random.default_rng([self.seed, self.index, day])
        events = []
        hours = np.sort(rng.choice(24, size=rng.poisson(rate),
                                   p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum()))
        for i, hour in enumerate(hours):
            ts = int(self.world.t_end + day * DAY + hour * 3600 + rng.integers(3600))
            request_id = f"{self.seed}-{day}-{self.index}-{i}"
            self.requested[request_id] = ts
            history = self.history[:HISTORY]
            inputs = {
                "user_id": np.array([self.user], dtype=object),
                "history": np.array([history + [""] * (HISTORY - len(history))], dtype=object),
                "device": np.array([self.device], dtype=object),
                "hour": np.array([hour], dtype=np.int64),
                "k": np.array([self.k], dtype=np.int32)}
            query, target, experiment = "", None, self.experiment
            if self.search and rng.random() < self.search_share:
                query, target = self.world.search_intent(rng)
                inputs["query"] = np.array([query], dtype=object)
                experiment = self.search
            outputs = client.predict(experiment, inputs, request_id=request_id)
            shown = [i.decode("utf-8") for i in outputs["item_ids"][0] if i]
            seen = self.world.react(self.user, shown, ts, rng, target)
            for row in seen.itertuples():
                when = ts + 5 + 6 * row.position
                for kind, done, delay in (("click", row.clicked, 0),
                                          ("add_to_cart", row.carted, 40),
                                          ("purchase", row.purchased, 200)):
                    if done:
                        events.append({"ts": when + delay, "user_id": self.user,
                                       "session_id": request_id, "event_type": kind,
                                       "item_id": row.item_id, "query": query,
                                       "device": self.device,
                                       "position": int(row.position) if kind == "click"
                                       else -1})
                if row.clicked:  # most recent first, as the models read histories
                    self.history = [row.item_id] + self.history[:HISTORY - 1]
        return events


def served_events(logs: pd.DataFrame, outcomes: pd.DataFrame,
                  request_ts: Optional[Mapping[str, int]] = None) -> pd.DataFrame:
    """Impressions (and the search event of a searched list) of every logged list plus
    the outcome events, in the events schema.

    The request id is the session id, so clicks join to what was shown; the result is
    ordinary training data (`tfrec train --data-dir`).

    Args:
      logs: request log rows.
      outcomes: click / add_to_cart / purchase events, session_id = request id.
      request_ts: request id -> time of the request, where the log's wall-clock time is
        not the shopper's (simulated days); default the logged time.
    """
    rows = []
    for log in logs.itertuples():
        context = json.loads(log.context) if log.context else {}
        ts = int(request_ts[log.request_id]) if request_ts else int(log.ts)
        query, device = str(context.get("query", "")), str(context.get("device", ""))
        base = {"user_id": log.user_id, "session_id": log.request_id, "query": query,
                "device": device}
        if query:
            rows.append({**base, "ts": ts, "event_type": "search", "item_id": "",
                         "position": -1})
        for item, position in zip(log.item_ids, log.positions):
            rows.append({**base, "ts": ts + 2, "event_type": "impression", "item_id": item,
                         "position": int(position)})
    impressions = pd.DataFrame(rows, columns=list(outcomes.columns))
    events = pd.concat([impressions, outcomes], ignore_index=True)
    return validate_table(events.sort_values(["ts", "session_id"], kind="stable")
                          .reset_index(drop=True), "events")


def run_abtest(world: World, world_dir: str, experiments_path: str, out_dir: str,
               users: int, days: int, k: int = 10, requests_per_day: float = 1.0,
               seed: int = 0, name: Optional[str] = None,
               models: Optional[Mapping[str, str]] = None, workers: int = 4,
               search: Optional[str] = None, search_share: float = 0.4) -> Dict[str, Any]:
    """Runs simulated shoppers against a real server serving the experiment.

    `out_dir/data` then holds the world's tables with its events extended by the served
    impressions and the shoppers' outcomes: the next training period.

    Args:
      world: The synthetic world (its ground truth judges the lists).
      world_dir: Where the world lives (recorded for the report).
      experiments_path: experiments YAML (arms, shares, exploration, model paths).
      out_dir: New directory for logs/, outcomes.parquet, data/ and abtest.json.
      users: Shoppers drawn from the world's users.
      days: Simulated days after the world's end.
      k: List length each request asks for.
      requests_per_day: Mean requests per shopper and day (Poisson).
      seed: Seed of users, request times and reactions (same seed, same run).
      name: Experiment to run when the file has several.
      models: Model name -> base path, overriding the file's `models:`.
      workers: Shoppers requesting concurrently.
      search: Experiment of the file that search requests go to (None: shoppers only
        ask for recommendations).
      search_share: Share of requests that are searches (query and target item drawn
        from the world's search log), when `search` is set.

    Returns:
      The run record written to abtest.json.

    Raises:
      ValueError: bad sizes, an unknown experiment, or `out_dir` already holds a run.
    """
    if users < 2 or days < 1 or k < 1 or requests_per_day <= 0:
        raise ValueError(f"need users >= 2, days >= 1, k >= 1 and requests_per_day > 0, got "
                         f"{users}, {days}, {k}, {requests_per_day}")
    if search and not 0.0 < search_share <= 1.0:
        raise ValueError(f"search_share must be in (0, 1], got {search_share}")
    experiments, file_models = load_experiments(experiments_path)
    experiment = pick_experiment(experiments, name if name or not search else
                                 next((n for n in experiments if n != search), None))
    served = {experiment.name: experiment}
    if search:
        served[search] = pick_experiment(experiments, search)
        if search == experiment.name:
            raise ValueError(f"the search experiment {search!r} must differ from the "
                             f"recommendation experiment {experiment.name!r}")
    paths = {**file_models, **dict(models or {})}
    needed = {arm.model for e in served.values() for arm in e.arms}
    missing = sorted(needed - set(paths))
    if missing:
        raise ValueError(f"no base path for model(s) {missing}: add them under 'models:' in "
                         f"{experiments_path}")
    if os.path.exists(os.path.join(out_dir, RUN_FILE)) or os.path.isdir(
            os.path.join(out_dir, LOGS_DIR)):
        raise ValueError(f"{out_dir!r} already holds an A/B run; pass a new --out")
    os.makedirs(out_dir, exist_ok=True)

    rng = np.random.default_rng(seed)
    all_users = world.users["user_id"].astype(str).to_numpy()
    chosen = rng.choice(len(all_users), size=min(users, len(all_users)), replace=False)
    names = [str(all_users[i]) for i in chosen]
    histories = dict(zip(names, user_states(world.events, world.t_end, HISTORY,
                                            users=names)["history"]))
    user_index = {str(u): i for i, u in enumerate(world.ground_truth["user_ids"])}
    devices = world.ground_truth["user_device"]
    shoppers = [_Shopper(world, u, DEVICES[int(devices[user_index[u]])], histories[u],
                         experiment.name, k, seed, int(i), search, search_share)
                for u, i in zip(names, chosen)]

    start = time.time()
    server = ModelServer({m: paths[m] for m in sorted(needed)}, port=0, poll_seconds=0,
                         max_workers=max(8, workers), experiments=served,
                         request_log=os.path.join(out_dir, LOGS_DIR),
                         request_log_flush_seconds=5.0).start()
    events: List[Dict[str, Any]] = []
    try:
        with PredictClient(server.address, timeout=60) as client, \
                concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for day in range(days):
                for part in pool.map(lambda s: s.day(client, day, requests_per_day), shoppers):
                    events.extend(part)
        status = server.experiment_status()
    finally:
        server.stop(grace=1.0)  # flushes the request log
    if server.metrics.log_dropped.value() > 0:  # the report would miss served lists
        raise ValueError(f"{server.metrics.log_dropped.value():.0f} requests were not "
                         f"logged (log queue full); rerun with fewer --workers")

    columns = ["ts", "user_id", "session_id", "event_type", "item_id", "query", "device",
               "position"]
    outcomes = validate_table(pd.DataFrame(events, columns=columns), "events")
    write_table(outcomes, os.path.join(out_dir, OUTCOMES_FILE))
    logs = read_request_logs(os.path.join(out_dir, LOGS_DIR))
    data_dir = os.path.join(out_dir, DATA_DIR)
    os.makedirs(data_dir, exist_ok=True)
    write_table(world.catalog, os.path.join(data_dir, "catalog.parquet"))
    write_table(world.users, os.path.join(data_dir, "users.parquet"))
    requested = {rid: ts for shopper in shoppers for rid, ts in shopper.requested.items()}
    new_events = served_events(logs, outcomes, requested)  # the log grows by the traffic
    events = pd.concat([world.events, new_events], ignore_index=True)
    write_table(validate_table(events.sort_values("ts", kind="stable").reset_index(drop=True),
                               "events"), os.path.join(data_dir, "events.parquet"))
    record = {
        "experiment": experiment.name, "experiments_file": os.path.abspath(experiments_path),
        "arms": [arm.name for arm in experiment.arms], "search_experiment": search or "",
        "search_share": search_share if search else 0.0,
        "models": {m: os.path.abspath(paths[m]) for m in sorted(needed)},
        "world_dir": os.path.abspath(world_dir), "users": len(shoppers), "days": days,
        "k": k, "requests_per_day": requests_per_day, "seed": seed,
        "requests": int(logs["request_id"].nunique()), "outcome_events": len(outcomes),
        "seconds": round(time.time() - start, 1), "status": status,
    }
    with open(os.path.join(out_dir, RUN_FILE + ".tmp"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(os.path.join(out_dir, RUN_FILE + ".tmp"), os.path.join(out_dir, RUN_FILE))
    logger.info("A/B run: %d requests from %d shoppers over %d days in %.0f s -> %s",
                record["requests"], len(shoppers), days, record["seconds"], out_dir)
    return record


def clear_run(out_dir: str) -> None:
    """Removes a previous run's files from `out_dir` (the CLI's --overwrite)."""
    for name in (LOGS_DIR, DATA_DIR):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in (OUTCOMES_FILE, RUN_FILE):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
