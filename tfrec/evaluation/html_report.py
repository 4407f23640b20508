"""A self-contained evaluation report: HTML with plots, the same numbers as JSON, TensorBoard.

The report is computed from ranked lists and targets only (no model, no TensorFlow
graph), so it can be produced for any model or baseline and tested without
training; plots use matplotlib's Agg canvas directly, never the global pyplot state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

import numpy as np

from tfrec.evaluation.click_model import calibration_table
from tfrec.metrics.ranking import (_as_id_matrix, catalog_coverage, embedding_diversity,
                                      evaluate_topk, intra_list_diversity, metric_curve,
                                      novelty, popularity_bias)
from tfrec.evaluation.slices import activity_slices, cold_start_slices, evaluate_slices

__all__ = ["REPORT_SECTIONS", "ReportData", "ReportFiles", "compute_report", "figure",
           "html_page", "html_table", "json_safe", "png_bytes", "png_img", "write_report"]

# Section ids in the HTML (and keys in the JSON), in display order.
REPORT_SECTIONS = ("summary", "recall_curve", "ndcg_by_activity", "coverage_accuracy",
                   "beyond_accuracy", "cold_start", "calibration", "business")
HTML_FILE, JSON_FILE = "report.html", "report.json"
CURVE_MAX_K = 100


@dataclass
class ReportData:
    """Everything a report is computed from: metric rows, ranked lists and context.

    Args:
      title: report heading.
      rows: model -> metric -> value (the table already computed by the caller).
      recommendations: model -> ranked ids per evaluated user (same user order for all).
      relevant: per user, targets (ids or id -> grade).
      user_ids: evaluated users (for cold-start slices).
      user_activity: per user, interactions before the evaluation period.
      known_users / known_items: seen in training (cold-start slices).
      catalog_size: items that could be recommended (coverage).
      item_labels: item id -> category/labels (intra-list diversity).
      item_counts: item id -> training interaction count (novelty, popularity bias).
      num_users: users behind item_counts (novelty); default len(user_ids).
      item_embeddings: (item ids, [N, D] embeddings) for embedding diversity.
      click_probabilities / click_labels: predictions of a click model and outcomes
        on held-out impressions (calibration); omitted -> the section is skipped.
      business: model -> expected CTR / CVR / GMV etc.
      k: cut-off of the per-model tables and plots.
      notes: free text shown at the end (protocol, caveats).
      metadata: extra JSON fields (run name, split times, ...).
    """

    title: str
    rows: Dict[str, Dict[str, float]]
    recommendations: Dict[str, Sequence[Sequence[Any]]]
    relevant: Sequence[Any]
    user_ids: Optional[Sequence[Any]] = None
    user_activity: Optional[Sequence[float]] = None
    known_users: Optional[Collection[Any]] = None
    known_items: Optional[Collection[Any]] = None
    catalog_size: Optional[int] = None
    item_labels: Optional[Mapping[Any, Any]] = None
    item_counts: Optional[Mapping[Any, float]] = None
    num_users: Optional[int] = None
    item_embeddings: Optional[tuple] = None
    click_probabilities: Optional[Sequence[float]] = None
    click_labels: Optional[Sequence[float]] = None
    business: Optional[Dict[str, Dict[str, float]]] = None
    k: int = 10
    notes: Sequence[str] = ()
    metadata: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.recommendations:
            raise ValueError("a report needs at least one model's recommendations")
        n = len(self.relevant)
        for name, lists in self.recommendations.items():
            if len(lists) != n:
                raise ValueError(f"recommendations of {name!r} have {len(lists)} rows but "
                                 f"relevant has {n}")
        for label, values in (("user_ids", self.user_ids), ("user_activity", self.user_activity)):
            if values is not None and len(values) != n:
                raise ValueError(f"{label} has {len(values)} entries but relevant has {n}")
        if (self.click_probabilities is None) != (self.click_labels is None):
            raise ValueError("give both click_probabilities and click_labels, or neither")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by `write_report`."""

    html: str
    json: str
    images: Dict[str, str]
    tensorboard_dir: Optional[str]


def json_safe(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def compute_report(data: ReportData) -> Dict[str, Any]:
    """All report numbers as one JSON-able dict (keys: REPORT_SECTIONS + notes/metadata).

    Sections that lack their inputs hold {"skipped": reason} instead of numbers.
    """
    data.validate()
    k = data.k
    lists = {name: _as_id_matrix(recs) for name, recs in data.recommendations.items()}
    out: Dict[str, Any] = {"title": data.title, "k": k, "summary": data.rows}

    max_k = min(CURVE_MAX_K, max(m.shape[1] for m in lists.values()) or 1)
    out["recall_curve"] = {"k": list(range(1, max_k + 1)),
                           **{name: metric_curve(m, data.relevant, "recall", max_k)
                              for name, m in lists.items()}}

    if data.user_activity is not None:
        slices = activity_slices(data.user_activity, data.relevant)
        out["ndcg_by_activity"] = {
            "buckets": [s.name for s in slices],
            "users": [int(sum(1 for r in s.relevant if len(r))) for s in slices],
            **{name: [evaluate_slices(m, [s], ks=(k,))[s.name].get(f"ndcg@{k}", float("nan"))
                      for s in slices] for name, m in lists.items()}}
    else:
        out["ndcg_by_activity"] = {"skipped": "no user activity given"}

    coverage = {}
    for name, m in lists.items():
        metrics = evaluate_topk(m, data.relevant, ks=(k,))
        entry = {f"recall@{k}": metrics[f"recall@{k}"], f"ndcg@{k}": metrics[f"ndcg@{k}"]}
        if data.catalog_size:
            entry[f"coverage@{k}"] = catalog_coverage(m, data.catalog_size, k)
        coverage[name] = entry
    out["coverage_accuracy"] = (coverage if data.catalog_size else
                                {"skipped": "catalog size unknown", **coverage})

    beyond: Dict[str, Dict[str, float]] = {}
    for name, m in lists.items():
        entry: Dict[str, float] = {}
        if data.item_labels is not None:
            entry[f"intra_list_diversity@{k}"] = intra_list_diversity(m, data.item_labels, k)
        if data.item_embeddings is not None:
            ids, emb = data.item_embeddings
            entry[f"embedding_diversity@{k}"] = embedding_diversity(m, ids, emb, k)
        if data.item_counts is not None:
            users = data.num_users or (len(data.user_ids) if data.user_ids is not None else None)
            if users:
                entry[f"novelty@{k}"] = novelty(m, data.item_counts, users, k)
            bias = popularity_bias(m, data.item_counts, k)
            entry[f"arp@{k}"] = bias["arp"]
            entry[f"popularity_percentile@{k}"] = bias["popularity_percentile"]
        beyond[name] = entry
    out["beyond_accuracy"] = (beyond if any(beyond.values()) else
                              {"skipped": "no item labels, embeddings or popularity given"})

    if data.user_ids is not None and data.known_users is not None \
            and data.known_items is not None:
        slices = cold_start_slices(data.user_ids, data.relevant, data.known_users,
                                   data.known_items)
        out["cold_start"] = {
            "slices": [s.name for s in slices],
            **{name: {piece: {key: value for key, value in metrics.items()
                              if key in (f"recall@{k}", f"ndcg@{k}", "users")}
                      for piece, metrics in evaluate_slices(m, slices, ks=(k,)).items()}
               for name, m in lists.items()}}
    else:
        out["cold_start"] = {"skipped": "user ids and known users/items not given"}

    if data.click_probabilities is not None:
        table = calibration_table(data.click_probabilities, data.click_labels)
        out["calibration"] = {"ece": table.attrs["ece"], "impressions": int(len(data.click_labels)),
                              "bins": table.to_dict(orient="list")}
    else:
        out["calibration"] = {"skipped": "no click model: calibration of click probabilities "
                                         "needs predicted P(click) and logged clicks"}
    out["business"] = data.business if data.business else {
        "skipped": "no logged impressions / prices to estimate CTR, CVR and GMV"}
    out["notes"] = list(data.notes)
    out["metadata"] = dict(data.metadata)
    return json_safe(out)


# ----------------------------------------------------------------------------
# Plots (matplotlib Agg canvas, no pyplot)
# ----------------------------------------------------------------------------


def figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib figure on an Agg canvas (no global pyplot state) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes, for embedding in an HTML page."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _models(section: Dict[str, Any], exclude: Sequence[str]) -> List[str]:
    return [name for name in section if name not in exclude]


def _plot_recall_curve(report: Dict[str, Any]) -> bytes:
    fig, ax = figure()
    section = report["recall_curve"]
    for name in _models(section, ("k",)):
        ax.plot(section["k"], [np.nan if v is None else v for v in section[name]], label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_title("Recall@k, k = 1..%d" % len(section["k"]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _plot_grouped_bars(groups: List[str], series: Dict[str, List[Optional[float]]],
                       ylabel: str, title: str) -> bytes:
    fig, ax = figure()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [np.nan if v is None else v for v in values],
               width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _plot_coverage(report: Dict[str, Any]) -> bytes:
    k = report["k"]
    fig, ax = figure()
    for name in _models(report["coverage_accuracy"], ("skipped",)):
        entry = report["coverage_accuracy"][name]
        x, y = entry.get(f"coverage@{k}"), entry.get(f"recall@{k}")
        if x is None or y is None:
            continue
        ax.scatter([x], [y], s=60)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"catalog coverage@{k}")
    ax.set_ylabel(f"recall@{k}")
    ax.set_title("Coverage vs accuracy")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def _plot_calibration(report: Dict[str, Any]) -> bytes:
    bins = report["calibration"]["bins"]
    fig, ax = figure(5.0, 5.0)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    ax.plot(bins["mean_predicted"], bins["observed_rate"], marker="o", label="click model")
    ax.set_xlabel("predicted P(click)")
    ax.set_ylabel("observed click rate")
    ax.set_title(f"Calibration (ECE {report['calibration']['ece']:.4f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _images(report: Dict[str, Any]) -> Dict[str, bytes]:
    k = report["k"]
    images = {"recall_curve": _plot_recall_curve(report)}
    activity = report["ndcg_by_activity"]
    if "skipped" not in activity:
        images["ndcg_by_activity"] = _plot_grouped_bars(
            activity["buckets"], {m: activity[m] for m in _models(activity, ("buckets", "users"))},
            f"ndcg@{k}", f"NDCG@{k} by user activity (past interactions)")
    if any(f"coverage@{k}" in v for v in report["coverage_accuracy"].values()
           if isinstance(v, dict)):
        images["coverage_accuracy"] = _plot_coverage(report)
    cold = report["cold_start"]
    if "skipped" not in cold:
        images["cold_start"] = _plot_grouped_bars(
            cold["slices"], {m: [cold[m][s].get(f"recall@{k}") for s in cold["slices"]]
                             for m in _models(cold, ("slices",))},
            f"recall@{k}", f"Recall@{k} by cold-start slice")
    if "skipped" not in report["calibration"]:
        images["calibration"] = _plot_calibration(report)
    return images


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.skip{color:#888;font-style:italic}"
        "img{max-width:100%}")

_HEADINGS = {"summary": "Summary", "recall_curve": "Recall@k curves",
             "ndcg_by_activity": "NDCG by user activity",
             "coverage_accuracy": "Coverage vs accuracy", "beyond_accuracy": "Beyond accuracy",
             "cold_start": "Cold-start slices", "calibration": "Calibration of click probabilities",
             "business": "Business metrics"}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def html_table(rows: Mapping[str, Mapping[str, Any]], first: str = "model") -> str:
    """An HTML table: one row per key, one column per scalar field of the values."""
    rows = {name: r for name, r in rows.items() if isinstance(r, Mapping)}
    if not rows:
        return ""
    columns: List[str] = []
    for r in rows.values():
        columns += [c for c in r if c not in columns and not isinstance(r[c], (dict, list))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [first] + columns)
    body = "".join(
        "<tr>" + f"<td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(r.get(c))}</td>"
                                                         for c in columns) + "</tr>"
        for name, r in rows.items())
    return f"<table><tr>{head}</tr>{body}</table>"


def _section_table(name: str, section: Dict[str, Any]) -> str:
    if name == "recall_curve":
        ks = section["k"]
        picks = [k for k in (1, 5, 10, 20, 50, 100) if k <= len(ks)]
        return html_table({m: {f"recall@{k}": section[m][k - 1] for k in picks}
                       for m in _models(section, ("k",))})
    if name == "ndcg_by_activity":
        rows = {m: dict(zip(section["buckets"], section[m]))
                for m in _models(section, ("buckets", "users"))}
        rows["(users)"] = dict(zip(section["buckets"], section["users"]))
        return html_table(rows)
    if name == "cold_start":
        tables = []
        for m in _models(section, ("slices",)):
            tables.append(f"<h3>{html.escape(m)}</h3>" + html_table(section[m], first="slice"))
        return "".join(tables)
    if name == "calibration":
        bins = section["bins"]
        rows = {f"[{lo:.1f}, {hi:.1f})": {"mean predicted": p, "observed": o, "impressions": c}
                for lo, hi, p, o, c in zip(bins["bin_low"], bins["bin_high"],
                                           bins["mean_predicted"], bins["observed_rate"],
                                           bins["count"])}
        return (f"<p>Expected calibration error: {_fmt(section['ece'])} over "
                f"{section['impressions']} impressions</p>"
                + html_table(rows, first="P(click) bin"))
    return html_table(section)


def html_page(title: str, parts: Sequence[str]) -> str:
    """A self-contained HTML page (the reports' style) around `parts` (HTML fragments)."""
    return "\n".join([f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
                      f"{html.escape(title)}</title><style>{_CSS}</style></head><body>",
                      f"<h1>{html.escape(title)}</h1>", *parts, "</body></html>"])


def png_img(png: bytes, alt: str) -> str:
    """An <img> tag embedding PNG bytes."""
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _html(report: Dict[str, Any], images: Dict[str, bytes]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
             f"<title>{html.escape(report['title'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(report['title'])}</h1>"]
    if report.get("metadata"):
        parts.append("<p>" + "; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}"
                                       for k, v in report["metadata"].items()) + "</p>")
    for name in REPORT_SECTIONS:
        section = report[name]
        parts.append(f"<section id='{name}'><h2>{_HEADINGS[name]}</h2>")
        if isinstance(section, dict) and "skipped" in section:
            parts.append(f"<p class='skip'>Skipped: {html.escape(section['skipped'])}</p>")
        if name in images:
            data = base64.b64encode(images[name]).decode("ascii")
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
        if not (isinstance(section, dict) and "skipped" in section):
            parts.append(_section_table(name, section))
        parts.append("</section>")
    if report.get("notes"):
        parts.append("<section id='notes'><h2>Notes</h2><ul>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
                     + "</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------


def _markdown(report: Dict[str, Any]) -> str:
    rows = report["summary"]
    columns: List[str] = []
    for r in rows.values():
        columns += [c for c in r if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def log_to_tensorboard(report: Dict[str, Any], log_dir: str, step: int = 0) -> str:
    """Writes every model's summary and beyond-accuracy numbers as scalars, plus a text table.

    Tags are "evaluation/<metric>/<model>" so TensorBoard groups one metric's models.
    """
    import tfrec  # noqa: F401  (legacy Keras before TensorFlow)
    import tensorflow as tf

    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        for section in ("summary", "beyond_accuracy", "business"):
            rows = report.get(section) or {}
            for model, metrics in rows.items():
                if not isinstance(metrics, Mapping):
                    continue
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        tf.summary.scalar(f"evaluation/{metric}/{model}", float(value), step=step)
        tf.summary.text("evaluation/report", _markdown(report), step=step)
    writer.flush()
    writer.close()
    return log_dir


def write_report(out_dir: str, data: ReportData, tensorboard_dir: Optional[str] = None,
                 step: int = 0) -> ReportFiles:
    """Writes report.html (plots embedded), report.json, the PNGs, and TensorBoard logs.

    Args:
      out_dir: destination directory (created).
      data: report inputs.
      tensorboard_dir: where to log scalars and the text summary; default
        `<out_dir>/tensorboard`; "" disables TensorBoard logging.
      step: TensorBoard step.
    """
    report = compute_report(data)
    os.makedirs(out_dir, exist_ok=True)
    images = _images(report)
    paths = {}
    for name, png in images.items():
        paths[name] = os.path.join(out_dir, f"{name}.png")
        with open(paths[name], "wb") as f:
            f.write(png)
    json_path = os.path.join(out_dir, JSON_FILE)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    html_path = os.path.join(out_dir, HTML_FILE)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(_html(report, images))
    if tensorboard_dir is None:
        tensorboard_dir = os.path.join(out_dir, "tensorboard")
    if tensorboard_dir:
        log_to_tensorboard(report, tensorboard_dir, step)
    return ReportFiles(html=html_path, json=json_path, images=paths,
                       tensorboard_dir=tensorboard_dir or None)
