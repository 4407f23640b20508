"""Outcomes of an online experiment: per-arm CTR, CVR and GMV with A/B decisions.

Served-request logs say what each user saw under which arm; outcome events say what
they did with it. Joined per request (and per user, the randomisation unit) they give
the business metrics and the uplift intervals that decide whether an arm ships.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np
import pandas as pd

from tfrec.evaluation.ab_testing import ab_test

__all__ = ["ARM_METRICS", "arm_summary", "arm_tests", "request_outcomes"]

# Per-user outcomes compared between arms (user = unit of randomisation).
ARM_METRICS = ("clicks", "purchases", "gmv", "ctr", "cvr")


def request_outcomes(logs: pd.DataFrame, outcomes: pd.DataFrame,
                     prices: Mapping[str, float]) -> pd.DataFrame:
    """One row per served request row: arm, user, impressions, clicks, purchases, GMV.

    Args:
      logs: request log rows (request_id, row, arm, user_id, item_ids, ...).
      outcomes: events (event_type click/add_to_cart/purchase) whose session_id is the
        request id and item_id the item acted on.
      prices: item id -> price (GMV of a purchase).

    Returns:
      Columns request_id, arm, user_id, explored, impressions, clicks, carts, purchases,
      gmv.

    Raises:
      ValueError: an outcome refers to a request or item that was never served.
    """
    served = logs[["request_id", "arm", "user_id"]].copy()
    served["explored"] = (logs["explored"].to_numpy(bool) if "explored" in logs
                          else np.zeros(len(logs), bool))
    served["impressions"] = logs["item_ids"].map(len).to_numpy()
    shown = {(r, i) for r, items in zip(logs["request_id"], logs["item_ids"]) for i in items}
    acted = outcomes[outcomes["event_type"].isin(["click", "add_to_cart", "purchase"])]
    unknown = [(r, i) for r, i in zip(acted["session_id"], acted["item_id"])
               if (r, i) not in shown]
    if unknown:
        raise ValueError(f"{len(unknown)} outcome events refer to items no logged request "
                         f"showed, e.g. request {unknown[0][0]!r} item {unknown[0][1]!r}; "
                         f"were the logs of that run flushed?")
    counts = {}
    for name, event in (("clicks", "click"), ("carts", "add_to_cart"),
                        ("purchases", "purchase")):
        counts[name] = acted[acted["event_type"] == event].groupby("session_id").size()
    bought = acted[acted["event_type"] == "purchase"]
    gmv = bought.assign(value=bought["item_id"].map(prices).fillna(0.0).astype(float)) \
        .groupby("session_id")["value"].sum()
    for name, series in {**counts, "gmv": gmv}.items():
        served[name] = served["request_id"].map(series).fillna(0).to_numpy(
            dtype=np.float64 if name == "gmv" else np.int64)
    return served.reset_index(drop=True)


def _per_user(requests: pd.DataFrame) -> pd.DataFrame:
    users = requests.groupby(["arm", "user_id"], sort=False)[
        ["impressions", "clicks", "carts", "purchases", "gmv"]].sum().reset_index()
    users["ctr"] = users["clicks"] / users["impressions"].clip(lower=1)
    users["cvr"] = users["purchases"] / users["clicks"].clip(lower=1)
    return users


def arm_summary(requests: pd.DataFrame) -> Dict[str, Dict[str, float]]:
    """Arm -> requests, users, CTR (clicks/impressions), CVR (purchases/clicks), GMV per
    user and per request, clicks per request."""
    summary = {}
    for arm, part in requests.groupby("arm", sort=True):
        impressions, clicks = part["impressions"].sum(), part["clicks"].sum()
        summary[str(arm)] = {
            "requests": int(len(part)), "users": int(part["user_id"].nunique()),
            "impressions": int(impressions), "clicks": int(clicks),
            "purchases": int(part["purchases"].sum()),
            "ctr": float(clicks / impressions) if impressions else 0.0,
            "cvr": float(part["purchases"].sum() / clicks) if clicks else 0.0,
            "gmv_per_user": float(part["gmv"].sum() / max(part["user_id"].nunique(), 1)),
            "gmv_per_request": float(part["gmv"].mean()),
            "clicks_per_request": float(part["clicks"].mean()),
        }
    return summary


def arm_tests(requests: pd.DataFrame, control: str, treatment: str, alpha: float = 0.05,
              metrics: Sequence[str] = ARM_METRICS) -> Dict[str, Dict[str, Any]]:
    """Uplift of `treatment` over `control` per metric, users as units (Welch's t; GMV,
    skewed, by bootstrap).

    Raises:
      ValueError: an arm has fewer than 2 users or is missing.
    """
    users = _per_user(requests)
    found = set(users["arm"])
    for arm in (control, treatment):
        if arm not in found:
            raise ValueError(f"arm {arm!r} has no logged requests (arms logged: "
                             f"{sorted(found)})")
    tests = {}
    for metric in metrics:
        a = users.loc[users["arm"] == control, metric].to_numpy(dtype=np.float64)
        b = users.loc[users["arm"] == treatment, metric].to_numpy(dtype=np.float64)
        method = "bootstrap" if metric == "gmv" else "welch"
        tests[metric] = ab_test(a, b, method=method, alpha=alpha).to_dict()
    return tests
