"""Graded search judgments from any source: the product catalog, and grades from a search log.

The search stack trains and evaluates on DataFrame(query, product_id, title, relevance in
[1, 3]) (`tfrec.data.homedepot.JUDGMENT_COLUMNS`); deriving the same frame from the
synthetic world's search sessions lets it run end to end without the Home Depot file.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pandas as pd

from tfrec.data.homedepot import JUDGMENT_COLUMNS

__all__ = ["EVENT_GRADES", "judgments_from_events", "product_catalog"]

# Grade an item earns in a search session from the strongest thing the shopper did with it.
EVENT_GRADES: Dict[str, float] = {"impression": 1.0, "click": 2.0, "add_to_cart": 2.5,
                                  "purchase": 3.0}
_EVENT_COLUMNS = ("session_id", "ts", "event_type", "item_id", "query")
_CATALOG_COLUMNS = ("item_id", "title")


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} missing column(s) {missing}; expected {list(columns)}, "
                         f"got {list(frame.columns)}")


def product_catalog(judgments: pd.DataFrame) -> pd.DataFrame:
    """Every distinct judged product once, as DataFrame(product_id, title).

    Full-catalog search ranks every product the judgments know, so this is the index the
    model scores; rows are sorted by product id (compared as strings) for stable row ids.

    Args:
      judgments: DataFrame with at least product_id and title (e.g. load_homedepot output).
        The first title seen for a product wins; product ids keep their type.

    Raises:
      ValueError: missing columns, or no rows.
    """
    _require(judgments, ("product_id", "title"), "judgments")
    if len(judgments) == 0:
        raise ValueError("judgments are empty: no products for a catalog")
    first = judgments.drop_duplicates("product_id", keep="first")[["product_id", "title"]]
    order = np.argsort(first["product_id"].astype(str).to_numpy(), kind="stable")
    return first.iloc[order].reset_index(drop=True)


def _clean_text(values: pd.Series) -> pd.Series:
    return values.fillna("").astype(str).str.strip()


def judgments_from_events(events: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    """Graded (query, product) judgments from the search sessions of an event log.

    Stands in for human grades where only behaviour is logged: what a shopper did with a
    shown result (buy > add to cart > click > only see it) says how well it fit the query.

    Within a session (events ordered by ts, ties in log order) an event counts under the
    most recent non-empty query, so carts and purchases logged without the query still
    credit it; events before a session's first query are ignored. Per (session, query,
    item) the grade is the maximum of `EVENT_GRADES` over its events (other event types
    are ignored); grades are then averaged over sessions per (query, item).

    Args:
      events: DataFrame(session_id, ts, event_type, item_id, query, ...), e.g.
        `generate_world(...).events`; empty or NaN queries / item ids mean none.
      catalog: DataFrame(item_id, title, ...), e.g. `World.catalog`.

    Returns:
      DataFrame(query, product_id, title, relevance) in `JUDGMENT_COLUMNS` order, sorted
      by query then product id; queries stripped, product ids as strings, relevance float
      in [1, 3].

    Raises:
      ValueError: missing columns, graded items absent from the catalog, or no search
        event with an item under a query.
    """
    _require(events, _EVENT_COLUMNS, "events")
    _require(catalog, _CATALOG_COLUMNS, "catalog")
    log = pd.DataFrame({
        "session": events["session_id"].astype(str).to_numpy(),
        "ts": events["ts"].to_numpy(),
        "order": np.arange(len(events)),
        "event_type": events["event_type"].astype(str).to_numpy(),
        "item": _clean_text(events["item_id"]).to_numpy(),
        "query": _clean_text(events["query"]).replace("", np.nan).to_numpy(),
    })
    log = log.sort_values(["session", "ts", "order"], kind="stable")
    log["query"] = log.groupby("session", sort=False)["query"].ffill()
    graded = log[log["query"].notna() & (log["item"] != "")
                 & log["event_type"].isin(list(EVENT_GRADES))]
    if graded.empty:
        raise ValueError("no search events: no event with an item id falls under a "
                         "non-empty query in its session")
    titles = dict(zip(_clean_text(catalog["item_id"]), catalog["title"]))
    unknown: List[str] = sorted(set(graded["item"]) - set(titles))
    if unknown:
        raise ValueError(f"{len(unknown)} item id(s) in search events are not in the catalog, "
                         f"e.g. {unknown[:5]}")
    graded = graded.assign(grade=graded["event_type"].map(EVENT_GRADES).astype(np.float64))
    per_session = graded.groupby(["session", "query", "item"], sort=False)["grade"].max()
    per_query = (per_session.groupby(level=["query", "item"], sort=True).mean()
                 .reset_index())
    out = pd.DataFrame({
        "query": per_query["query"].astype(str),
        "product_id": per_query["item"].astype(str),
        "title": per_query["item"].map(titles),
        "relevance": per_query["grade"].astype(np.float64),
    })
    return out[list(JUDGMENT_COLUMNS)].reset_index(drop=True)
