"""The A/B report of a simulated (or real) run: per-arm business metrics, the decision,
and the off-policy estimate of the treatment from the control arm's exploration logs.

The off-policy check is what makes exploration worth its cost: if IPS over the control
arm's logs predicts the treatment's online result, the next ranking can be judged from
logs before it gets any traffic.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import pandas as pd

from tfrec.abtest.simulate import LOGS_DIR, OUTCOMES_FILE, RUN_FILE
from tfrec.data.io import read_table
from tfrec.evaluation.html_report import (figure, html_page, html_table, json_safe, png_bytes,
                                          png_img)
from tfrec.evaluation.off_policy import (
    mean_interval,
    pbm_ips_estimate,
    slate_ips_estimate,
    slate_snips_estimate,
)
from tfrec.evaluation.online import arm_summary, arm_tests, request_outcomes
from tfrec.serving.experiments import Arm, Experiment, load_experiments
from tfrec.serving.request_log import read_request_logs

REPORT_JSON, REPORT_HTML = "abtest_report.json", "abtest_report.html"
_REPLAY_BATCH = 256


def _load_signature(base: str, version: int, signature: str):
    import tensorflow as tf

    try:
        import tensorflow_text  # noqa: F401  (models with TF Text ops)
    except ImportError:
        pass
    loaded = tf.saved_model.load(os.path.join(base, str(version)))
    if signature not in loaded.signatures:
        raise ValueError(f"{base}/{version} has no signature {signature!r} (it has "
                         f"{sorted(loaded.signatures)})")
    return loaded, loaded.signatures[signature]


def replay_lists(arm: Arm, base: str, version: int, logs: pd.DataFrame) -> List[List[str]]:
    """The lists `arm`'s deterministic policy would have shown for logged requests.

    Rebuilds each request from its logged user id and context (history, device, hour,
    k, ...) plus the arm's input defaults, and runs the arm's SavedModel in-process.
    """
    import tensorflow as tf

    loaded, signature = _load_signature(base, version, arm.signature)
    specs = signature.structured_input_signature[1]
    lists: List[List[str]] = []
    for start in range(0, len(logs), _REPLAY_BATCH):
        part = logs.iloc[start:start + _REPLAY_BATCH]
        contexts = [json.loads(c) if c else {} for c in part["context"]]
        contexts = [{**arm.inputs, **c, "user_id": u}
                    for c, u in zip(contexts, part["user_id"])]
        inputs = {}
        for name, spec in specs.items():
            missing = [i for i, c in enumerate(contexts) if name not in c]
            if missing:
                raise ValueError(f"logged request {part['request_id'].iloc[missing[0]]!r} has "
                                 f"no {name!r} and arm {arm.name!r} gives no default: cannot "
                                 f"replay it")
            values = [c[name] for c in contexts]
            if spec.shape.rank == 2:
                width = max(1, max(len(v) if isinstance(v, list) else 1 for v in values))
                values = [(v if isinstance(v, list) else [v]) for v in values]
                values = [v + [""] * (width - len(v)) for v in values]
            inputs[name] = tf.constant(values, dtype=spec.dtype)
        outputs = signature(**inputs)
        for row in outputs["item_ids"].numpy():
            lists.append([i.decode("utf-8") for i in row if i])
    del loaded
    return lists


def _logged_slots(control_logs: pd.DataFrame, outcomes: pd.DataFrame,
                  prices: Mapping[str, float]) -> Dict[str, Any]:
    """The logged lists as [lists, positions] arrays for the slate estimators.

    Rewards of each logged slot (clicks, GMV) and its logging propensities (at the
    position, anywhere in the list): built once per log, whatever ranking is valued.
    """
    acted = outcomes[outcomes["event_type"].isin(["click", "purchase"])]
    clicked = set(zip(acted.loc[acted["event_type"] == "click", "session_id"],
                      acted.loc[acted["event_type"] == "click", "item_id"]))
    bought = set(zip(acted.loc[acted["event_type"] == "purchase", "session_id"],
                     acted.loc[acted["event_type"] == "purchase", "item_id"]))
    width = max(len(x) for x in control_logs["item_ids"])
    shape = (len(control_logs), width)
    clicks, gmv = np.zeros(shape), np.zeros(shape)
    logging_p, inclusion = np.ones(shape), np.zeros(shape)
    # Logs of an older server carry no inclusion propensities: PBM-IPS is then skipped.
    has_inclusion = "inclusion_propensities" in control_logs and bool(
        control_logs["inclusion_propensities"].map(lambda x: x is not None and
                                                   not np.isscalar(x)).all())
    for row, log in enumerate(control_logs.itertuples()):
        for j, (item, p) in enumerate(zip(log.item_ids, log.propensities)):
            clicks[row, j] = (log.request_id, item) in clicked
            gmv[row, j] = prices.get(item, 0.0) if (log.request_id, item) in bought else 0.0
            logging_p[row, j] = p
        if has_inclusion:
            included = np.asarray(log.inclusion_propensities, np.float64)
            inclusion[row, :len(included)] = included
    return {"clicks": clicks, "gmv": gmv, "logging_p": logging_p, "inclusion": inclusion,
            "has_inclusion": has_inclusion, "randomized": randomized_rows(control_logs),
            "users": control_logs["user_id"].to_numpy()}


def randomized_rows(logs: pd.DataFrame) -> np.ndarray:
    """Which logged rows got a uniformly random order (the position-bias lists).

    Files of an older server have no `randomized` column (missing once read beside
    newer files): every list it explored was a random order, so `explored` stands in.
    """
    explored = logs["explored"].astype(bool)
    if "randomized" not in logs:
        return explored.to_numpy(bool)
    return logs["randomized"].where(logs["randomized"].notna(), explored).to_numpy(bool)


def _target_slots(logged: Dict[str, Any], control_logs: pd.DataFrame,
                  target: List[List[str]]) -> Dict[str, Any]:
    """`logged` plus where the target ranking puts each logged item (-1: not in its top)
    and whether it puts it at the logged position (the target propensity)."""
    shape = logged["clicks"].shape
    target_at = np.full(shape, -1, dtype=np.int64)
    for row, items in enumerate(control_logs["item_ids"]):
        where = {item: t for t, item in enumerate(target[row][:shape[1]])}
        target_at[row, :len(items)] = [where.get(item, -1) for item in items]
    target_p = (target_at == np.arange(shape[1])[None, :]).astype(np.float64)
    return {**logged, "target_at": target_at, "target_p": target_p}


def _estimates(slates: Dict[str, Any], column: str, online: np.ndarray,
               online_users: np.ndarray, alpha: float) -> Dict[str, Any]:
    """IPS, SNIPS and PBM-IPS of one reward beside its online mean, with intervals.

    Users are the randomisation unit: the online interval clusters by user and the
    PBM-IPS bootstrap resamples users.
    """
    rewards = slates[column]
    estimate = slate_ips_estimate(rewards, slates["target_p"], slates["logging_p"],
                                  alpha=alpha)
    snips = slate_snips_estimate(rewards, slates["target_p"], slates["logging_p"],
                                 alpha=alpha)
    mean, low, high = mean_interval(online, alpha, groups=online_users)
    entry = {
        "ips": estimate.value, "ips_ci_low": estimate.ci_low,
        "ips_ci_high": estimate.ci_high,
        "effective_sample_size": estimate.effective_sample_size,
        "snips": snips.value, "snips_ci_low": snips.ci_low, "snips_ci_high": snips.ci_high,
        "online": mean, "online_ci_low": low, "online_ci_high": high,
    }
    _agreement(entry, "ips")
    _agreement(entry, "snips")
    if not slates["has_inclusion"]:
        entry["pbm_ips_skipped"] = ("the logs carry no inclusion propensities (written by "
                                    "an older server)")
        return entry
    try:
        pbm = pbm_ips_estimate(rewards, slates["target_at"], slates["inclusion"],
                               slates["randomized"], groups=slates["users"], alpha=alpha)
    except ValueError as error:  # e.g. too few explored lists to measure position bias
        entry["pbm_ips_skipped"] = str(error)
        return entry
    entry.update({
        "pbm_ips": pbm.value, "pbm_ips_ci_low": pbm.ci_low, "pbm_ips_ci_high": pbm.ci_high,
        "pbm_effective_sample_size": pbm.effective_sample_size,
    })
    _agreement(entry, "pbm_ips")
    return entry


def _agreement(entry: Dict[str, Any], key: str) -> None:
    """Adds whether the online mean lies in the `key` estimate's interval and the
    estimate in the online interval (the two readings of "they agree")."""
    entry[f"online_within_{key}_ci"] = bool(
        entry[f"{key}_ci_low"] <= entry["online"] <= entry[f"{key}_ci_high"])
    entry[f"{key}_within_online_ci"] = bool(
        entry["online_ci_low"] <= entry[key] <= entry["online_ci_high"])


def off_policy_check(logs: pd.DataFrame, requests: pd.DataFrame, outcomes: pd.DataFrame,
                     prices: Mapping[str, float], control: Arm, treatment: Arm,
                     treatment_base: str, alpha: float = 0.05,
                     control_base: Optional[str] = None) -> Dict[str, Any]:
    """Off-policy estimates of the treatment's clicks and GMV per request from the
    control arm's logs, beside the treatment's online values with their intervals.

    The treatment's online users are not the control's: with few users the two differ
    by who they are as much as by the ranking. With `control_base`, the same estimators
    also value the control's own exploit ranking on its logs, beside its exploit-only
    requests (`self_check`): one population, so a disagreement there is the estimator's.
    """
    control_logs = logs[logs["arm"] == control.name].reset_index(drop=True)
    explored = any(np.min(p) < 1.0 for p in control_logs["propensities"] if len(p))
    if not explored:
        return {"skipped": f"arm {control.name!r} logged no exploration (set exploration "
                           f"epsilon/pool on it): deterministic logs cannot evaluate "
                           f"another ranking"}
    treated = logs[logs["arm"] == treatment.name]
    if treated.empty:
        return {"skipped": f"arm {treatment.name!r} served no requests"}
    version = int(treated["version"].max())
    logged = _logged_slots(control_logs, outcomes, prices)
    slates = _target_slots(logged, control_logs, replay_lists(treatment, treatment_base,
                                                              version, control_logs))
    result = {"control": control.name, "treatment": treatment.name,
              "treatment_version": version, "logged_requests": len(control_logs),
              "matched_slots": int(slates["target_p"].sum()),
              "inclusion_logged": slates["has_inclusion"]}
    online = requests[requests["arm"] == treatment.name]
    for name, column in (("clicks_per_request", "clicks"), ("gmv_per_request", "gmv")):
        result[name] = _estimates(slates, column, online[column].to_numpy(np.float64),
                                  online["user_id"].to_numpy(), alpha)
    if control_base is not None:
        exploit = requests[(requests["arm"] == control.name) & ~requests["explored"]]
        own = _target_slots(logged, control_logs, replay_lists(
            control, control_base, int(control_logs["version"].max()), control_logs))
        result["self_check"] = {
            name: _estimates(own, column, exploit[column].to_numpy(np.float64),
                             exploit["user_id"].to_numpy(), alpha)
            for name, column in (("clicks_per_request", "clicks"),
                                 ("gmv_per_request", "gmv"))}
    return result


def experiment_section(experiment: Experiment, logs: pd.DataFrame, outcomes: pd.DataFrame,
                       prices: Mapping[str, float], models: Mapping[str, str],
                       alpha: float = 0.05, control: Optional[str] = None,
                       treatment: Optional[str] = None) -> Dict[str, Any]:
    """Arms, uplift tests, off-policy check and decision of one experiment of a run.

    Raises:
      ValueError: unknown arms, or an arm without requests.
    """
    arms = {arm.name: arm for arm in experiment.arms}
    control = control or experiment.arms[0].name
    treatment = treatment or (experiment.arms[1].name if len(experiment.arms) > 1 else "")
    for arm in (control, treatment):
        if arm not in arms:
            raise ValueError(f"arm {arm!r} is not in experiment {experiment.name!r} "
                             f"(arms: {sorted(arms)})")
    logs = logs[logs["experiment"] == experiment.name].reset_index(drop=True)
    outcomes = outcomes[outcomes["session_id"].isin(set(logs["request_id"]))]
    requests = request_outcomes(logs, outcomes, prices)
    section = {
        "experiment": experiment.name, "control": control, "treatment": treatment,
        "arms": arm_summary(requests),
        "tests": arm_tests(requests, control, treatment, alpha),
        "off_policy": off_policy_check(logs, requests, outcomes, prices, arms[control],
                                       arms[treatment], models[arms[treatment].model], alpha,
                                       control_base=models.get(arms[control].model)),
    }
    exploit = requests[(requests["arm"] == control) & ~requests["explored"]]
    if len(exploit) < (requests["arm"] == control).sum():  # the control explored: its cost
        summary = arm_summary(exploit.assign(arm=f"{control} (exploit only)"))
        for row in summary.values():  # a subset of each user's requests: per request only
            row["gmv_per_user"] = None
        section["arms"].update(summary)
    section["decision"] = _decision(section)
    return section


def abtest_report(run_dir: str, alpha: float = 0.05, control: Optional[str] = None,
                  treatment: Optional[str] = None) -> Dict[str, Any]:
    """Computes the report of an `abtest run` directory and writes JSON + HTML there.

    The run's recommendation experiment fills the top level; its search experiment, if
    it had one, the `search` section (same fields).

    Args:
      run_dir: Output of `tfrec abtest run` (abtest.json, logs/, outcomes.parquet).
      alpha: 1 - confidence of every interval.
      control / treatment: Arm names of the recommendation experiment (default: its
        first and second arm).

    Returns:
      The report dict (also in abtest_report.json).

    Raises:
      FileNotFoundError: not a run directory.
      ValueError: unknown arms.
    """
    record_path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(record_path):
        raise FileNotFoundError(f"{run_dir!r} holds no A/B run ({RUN_FILE} missing); run "
                                f"`tfrec abtest run` first")
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    experiments, _ = load_experiments(record["experiments_file"])
    logs = read_request_logs(os.path.join(run_dir, LOGS_DIR))
    outcomes = read_table(os.path.join(run_dir, OUTCOMES_FILE), "events")
    catalog = read_table(os.path.join(run_dir, "data", "catalog.parquet"), "catalog")
    prices = dict(zip(catalog["item_id"].astype(str), catalog["price"].astype(float)))
    section = experiment_section(experiments[record["experiment"]], logs, outcomes, prices,
                                 record["models"], alpha, control, treatment)
    report = {
        "title": f"A/B test {section['experiment']}: {section['treatment']} vs "
                 f"{section['control']}",
        "run": {k: record.get(k) for k in ("experiment", "search_experiment", "users", "days",
                                           "k", "seed", "requests", "requests_per_day",
                                           "search_share")},
        "alpha": alpha, **section,
    }
    if record.get("search_experiment"):
        report["search"] = experiment_section(experiments[record["search_experiment"]], logs,
                                              outcomes, prices, record["models"], alpha)
    _write(run_dir, report)
    return report


def _relative(test: Dict[str, Any]) -> str:
    value = test["relative_uplift"]
    return f"{value:+.1%}" if math.isfinite(value) else f"{test['uplift']:+.4g} (control 0)"


def _decision(report: Dict[str, Any]) -> str:
    gmv, clicks = report["tests"]["gmv"], report["tests"]["clicks"]
    if gmv["significant"] and gmv["uplift"] > 0:
        return f"ship {report['treatment']}: GMV per user up {_relative(gmv)}"
    if gmv["significant"] and gmv["uplift"] < 0:
        return f"keep {report['control']}: GMV per user down {_relative(gmv)}"
    if clicks["significant"]:
        return (f"no significant GMV change; clicks per user {_relative(clicks)} "
                f"(significant): run longer for GMV")
    return "no significant difference: run longer or keep the control"


def _plot_arms(report: Dict[str, Any]) -> bytes:
    fig, axes = figure(9.0, 3.2)
    fig.clear()
    metrics = ("ctr", "cvr", "gmv")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, 3, i + 1)
        test = report["tests"][metric]
        means = [test["control_mean"], test["treatment_mean"]]
        ax.bar([report["control"], report["treatment"]], means, color=["#999", "#3a7"])
        half = (test["ci_high"] - test["ci_low"]) / 2
        ax.errorbar([1], [test["treatment_mean"]], yerr=[[half], [half]], color="black",
                    capsize=4)
        ax.set_title(f"{metric} per user (uplift {_relative(test)})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def _plot_off_policy(section: Dict[str, Any]) -> bytes:
    fig, ax = figure(5.0, 3.2)
    entry = section["clicks_per_request"]
    points = [("online", "online"), ("IPS from control logs", "ips")]
    if "pbm_ips" in entry:
        points.append(("PBM-IPS from control logs", "pbm_ips"))
    for x, (_, key) in enumerate(points):
        value, low, high = entry[key], entry[f"{key}_ci_low"], entry[f"{key}_ci_high"]
        ax.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="o", capsize=6)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels([label for label, _ in points], fontsize=7)
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_ylabel("clicks per request")
    ax.set_title(f"{section['treatment']}: online vs off-policy", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def _off_policy_rows(off_policy: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Table rows: the treatment's metrics, then the control's self-check."""
    rows = {k: v for k, v in off_policy.items() if k != "self_check" and isinstance(v, dict)}
    for metric, entry in off_policy.get("self_check", {}).items():
        rows[f"self-check of {off_policy['control']} (exploit): {metric}"] = entry
    return rows


def _section_html(section: Dict[str, Any], alpha: float) -> List[str]:
    name = html.escape(section["experiment"])
    parts = [f"<h2>{name}: decision</h2><p><b>{html.escape(section['decision'])}</b></p>",
             f"<h2>{name}: arms</h2>", html_table(section["arms"], first="arm"),
             f"<h2>{name}: uplift of {html.escape(section['treatment'])} (per user, "
             f"{1 - alpha:.0%} intervals)</h2>", png_img(_plot_arms(section), "arms"),
             html_table(section["tests"], first="metric"),
             f"<h2>{name}: off-policy estimate from the control arm's exploration</h2>"]
    off_policy = section["off_policy"]
    if "skipped" in off_policy:
        parts.append(f"<p class='skip'>Skipped: {html.escape(off_policy['skipped'])}</p>")
    else:
        parts.append(png_img(_plot_off_policy(off_policy), "off_policy"))
        parts.append(html_table(_off_policy_rows(off_policy), first="metric"))
    return parts


def _write(run_dir: str, report: Dict[str, Any]) -> None:
    tmp = os.path.join(run_dir, REPORT_JSON + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(report), f, indent=2, ensure_ascii=False)
    os.replace(tmp, os.path.join(run_dir, REPORT_JSON))
    run = "; ".join(f"{k}: {html.escape(str(v))}" for k, v in report["run"].items())
    parts = [f"<p>{run}</p>", *_section_html(report, report["alpha"])]
    if "search" in report:
        parts += _section_html(report["search"], report["alpha"])
    tmp = os.path.join(run_dir, REPORT_HTML + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(html_page(report["title"], parts))
    os.replace(tmp, os.path.join(run_dir, REPORT_HTML))
