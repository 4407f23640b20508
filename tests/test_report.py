"""Beyond-accuracy metrics, slices and the HTML/JSON/TensorBoard report (no training)."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from tfrec.evaluation.html_report import REPORT_SECTIONS, ReportData, compute_report, write_report
from tfrec.metrics.ranking import (embedding_diversity, intra_list_diversity, map_at_k,
                                      metric_curve, ndcg_at_k, novelty, popularity_bias)
from tfrec.evaluation.period import evaluate_period_lists, period_report_data
from tfrec.evaluation.report import evaluate_period
from tfrec.evaluation.slices import Slice, activity_slices, cold_start_slices, evaluate_slices


# ------------------------------------------------------------------ metrics, by hand

def test_intra_list_diversity_by_hand():
    labels = {"a": "x", "b": "x", "c": "y"}
    # Pairs (a,b) same, (a,c) and (b,c) different -> 2/3; the second list: 1 pair, same.
    assert intra_list_diversity([["a", "b", "c"]], labels) == pytest.approx(2 / 3)
    assert intra_list_diversity([["a", "b", "c"], ["a", "b", ""]], labels) == pytest.approx(1 / 3)
    assert intra_list_diversity([["a", "b", "c"]], labels, k=2) == pytest.approx(0.0)
    # Label sets: Jaccard({x,y},{y,z}) = 1/3 -> distance 2/3; unknown items are skipped.
    genres = {"a": ("x", "y"), "b": ("y", "z")}
    assert intra_list_diversity([["a", "zz", "b"]], genres) == pytest.approx(2 / 3)
    assert math.isnan(intra_list_diversity([["a"]], labels))  # no pair


def test_embedding_diversity_by_hand():
    ids = ["a", "b", "c"]
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # cos(a,b)=0, cos(a,c)=cos(b,c)=1/sqrt2 -> mean distance (1 + 2(1 - 1/sqrt2)) / 3
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert embedding_diversity([["a", "b", "c"]], ids, emb) == pytest.approx(expected)
    assert embedding_diversity([["a", "a"]], ids, emb) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="embeddings must be"):
        embedding_diversity([["a"]], ids, emb[:2])


def test_novelty_by_hand():
    counts = {"a": 4, "b": 1, "c": 2}
    # p = 4/4, 1/4, 2/4 -> self-information 0, 2, 1 bits.
    assert novelty([["a", "b"]], counts, num_users=4) == pytest.approx(1.0)
    assert novelty([["a", "b"], ["c", ""]], counts, num_users=4) == pytest.approx(1.0)
    assert novelty([["new"]], counts, num_users=4) == pytest.approx(2.0)  # unseen: 1 user


def test_popularity_bias_by_hand():
    counts = {"a": 3, "b": 2, "c": 1, "d": 0}
    # Percentiles (average rank / n): a 1.0, b .75, c .5, d .25.
    out = popularity_bias([["a", "d"], ["b", ""]], counts)
    assert out["arp"] == pytest.approx(((3 + 0) / 2 + 2) / 2)
    assert out["popularity_percentile"] == pytest.approx(((1.0 + 0.25) / 2 + 0.75) / 2)
    tied = popularity_bias([["a"]], {"a": 1, "b": 1})
    assert tied["popularity_percentile"] == pytest.approx(0.75)  # ranks 1,2 -> 1.5 / 2


def test_metric_curves_by_hand():
    recs, rel = [["a", "b", "c"]], [{"a", "c"}]
    assert metric_curve(recs, rel, "recall").tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert metric_curve(recs, rel, "precision").tolist() == pytest.approx([1, 0.5, 2 / 3])
    assert metric_curve(recs, rel, "hit_rate", max_k=4).tolist() == pytest.approx([1, 1, 1, 1])
    ndcg = metric_curve(recs, rel, "ndcg")
    assert ndcg.tolist() == pytest.approx([ndcg_at_k(recs, rel, k) for k in (1, 2, 3)])
    with pytest.raises(ValueError, match="metric must be"):
        metric_curve(recs, rel, "auc")


def test_map_normalisations_by_hand():
    # Hits at ranks 1 and 3 of 3, 4 relevant items: precisions 1 and 2/3.
    recs, rel = [["a", "x", "b"]], [{"a", "b", "c", "d"}]
    assert map_at_k(recs, rel, 3) == pytest.approx((1 + 2 / 3) / 3)  # min(|rel|, k) = 3
    assert map_at_k(recs, rel, 3, normalization="relevant") == pytest.approx((1 + 2 / 3) / 4)
    with pytest.raises(ValueError, match="normalization"):
        map_at_k(recs, rel, 3, normalization="k")


# ------------------------------------------------------------------ slices

def test_activity_and_cold_start_slices():
    rel = [["a"], ["b"], ["c"], ["d"]]
    slices = activity_slices([0, 3, 10, 100], rel, edges=(1, 5, 20))
    assert [(s.name, s.rows.tolist()) for s in slices] == [
        ("0", [0]), ("1-4", [1]), ("5-19", [2]), ("20+", [3])]
    out = evaluate_slices([["a"], ["x"], ["c"], ["x"]], slices, ks=(1,))
    assert [out[s.name]["recall@1"] for s in slices] == [1.0, 0.0, 1.0, 0.0]

    cold = {s.name: s for s in cold_start_slices(["u1", "u2"], [["a", "new"], ["b"]],
                                                  known_users={"u1"}, known_items={"a", "b"})}
    assert cold["new users"].rows.tolist() == [1]
    assert cold["new items"].relevant == [["new"], []]
    metrics = evaluate_slices([["new", "a"], ["b", "z"]], list(cold.values()), ks=(1,))
    assert metrics["new items"]["recall@1"] == 1.0 and metrics["new items"]["users"] == 1
    assert metrics["known items"]["recall@1"] == pytest.approx(0.5)
    assert metrics["returning users"]["recall@1"] == pytest.approx(0.5)
    empty = evaluate_slices([["a"]], [Slice("nobody", np.array([], dtype=int), [])])
    assert empty["nobody"] == {"users": 0}


# ------------------------------------------------------------------ report files

def small_report_data(with_clicks: bool = True) -> ReportData:
    rng = np.random.default_rng(0)
    items = [f"i{i}" for i in range(150)]
    users = [f"u{i}" for i in range(40)]
    relevant = [list(rng.choice(items, 3, replace=False)) for _ in users]
    model = [list(r[:1]) + list(rng.choice(items, 119, replace=False)) for r in relevant]
    popular = [items[:120] for _ in users]
    probs = rng.uniform(0, 0.5, 500)
    return ReportData(
        title="unit report", rows={"model": {"recall@10": 0.3}, "popularity": {"recall@10": 0.1}},
        recommendations={"model": model, "popularity": popular}, relevant=relevant,
        user_ids=users, user_activity=rng.integers(0, 60, len(users)),
        known_users=set(users[:30]), known_items=set(items[:140]), catalog_size=len(items),
        item_labels={i: f"cat{int(i[1:]) % 7}" for i in items},
        item_counts={i: float(150 - n) for n, i in enumerate(items)}, num_users=40,
        item_embeddings=(items, rng.normal(size=(150, 8))),
        click_probabilities=probs if with_clicks else None,
        click_labels=(rng.random(500) < probs).astype(float) if with_clicks else None,
        business={"model": {"expected_ctr@10": 0.1}}, notes=["a note"],
        metadata={"run": "unit"})


def test_report_files_and_sections(tmp_path):
    files = write_report(str(tmp_path / "report"), small_report_data(),
                         tensorboard_dir=str(tmp_path / "tb"))
    page = open(files.html, encoding="utf-8").read()
    for section in REPORT_SECTIONS:
        assert f"id='{section}'" in page, section
    assert page.count("data:image/png;base64,") == 5  # self-contained: plots embedded
    assert "Skipped" not in page
    assert set(files.images) == {"recall_curve", "ndcg_by_activity", "coverage_accuracy",
                                 "cold_start", "calibration"}
    for path in files.images.values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = json.load(open(files.json))
    assert set(REPORT_SECTIONS) <= set(report)
    assert len(report["recall_curve"]["model"]) == 100
    assert report["recall_curve"]["model"][9] is not None
    assert set(report["beyond_accuracy"]["model"]) == {
        "intra_list_diversity@10", "embedding_diversity@10", "novelty@10", "arp@10",
        "popularity_percentile@10"}
    assert report["cold_start"]["slices"][0] == "all"
    assert 0 <= report["calibration"]["ece"] <= 1
    assert glob.glob(os.path.join(files.tensorboard_dir, "events.out.tfevents.*"))


def test_report_numbers_match_the_metrics(tmp_path):
    data = small_report_data()
    report = compute_report(data)
    recs = data.recommendations["popularity"]
    assert report["recall_curve"]["popularity"][9] == pytest.approx(
        metric_curve(recs, data.relevant, "recall", 10)[-1])
    assert report["beyond_accuracy"]["popularity"]["intra_list_diversity@10"] == pytest.approx(
        intra_list_diversity(recs, data.item_labels, 10))
    assert report["coverage_accuracy"]["popularity"]["coverage@10"] == pytest.approx(10 / 150)


def test_report_skips_sections_without_inputs(tmp_path):
    data = ReportData(title="minimal", rows={"m": {"recall@10": 0.5}},
                      recommendations={"m": [["a", "b"]]}, relevant=[["a"]])
    files = write_report(str(tmp_path), data, tensorboard_dir="")
    page = open(files.html, encoding="utf-8").read()
    assert "no click model" in page and "Skipped" in page
    report = json.load(open(files.json))
    assert "skipped" in report["calibration"] and "skipped" in report["cold_start"]
    assert files.tensorboard_dir is None and set(files.images) == {"recall_curve"}
    with pytest.raises(ValueError, match="rows but relevant"):
        write_report(str(tmp_path), ReportData(title="bad", rows={}, recommendations={
            "m": [["a"], ["b"]]}, relevant=[["a"]]))


def random_tower(dim: int = 8):
    """A deterministic stand-in for a trained tower: hashed ids -> random vectors."""
    def embed(features):
        key = features.get("item_id", features.get("user_id"))
        seeds = [abs(hash(str(k))) % (2 ** 32) for k in key]
        return np.stack([np.random.default_rng(s).normal(size=dim) for s in seeds]).astype(
            np.float32)
    return embed


def test_period_report_on_the_synthetic_world(tiny_world, tiny_world_dir, tmp_path):
    events, catalog = tiny_world.events, tiny_world.catalog
    ts = events["ts"].to_numpy()
    start, end = int(np.quantile(ts, 0.8)), int(ts.max()) + 1
    fn = random_tower()
    period = evaluate_period_lists(events, catalog, start, end, 5, fn, fn, ks=(10, 100),
                                   data_dir=tiny_world_dir)
    assert {"two_tower", "popularity", "cooccurrence", "oracle"} <= set(period.rows)
    # Rows are exactly those of evaluate_period (plus the co-occurrence baseline).
    reference = evaluate_period(events, catalog, start, end, 5, fn, fn, ks=(10, 100),
                                data_dir=tiny_world_dir, search=False)
    for name, metrics in reference.items():
        for key, value in metrics.items():
            assert period.rows[name][key] == pytest.approx(value, nan_ok=True), (name, key)
    data = period_report_data(period, events, catalog, title="tiny world")
    assert data.click_probabilities is not None and data.business["two_tower"]
    files = write_report(str(tmp_path), data, tensorboard_dir="")
    report = json.load(open(files.json))
    assert "skipped" not in report["business"] and "skipped" not in report["calibration"]
    assert report["business"]["oracle"]["expected_ctr@10"] > 0


def test_cli_accepts_report_flag():
    from tfrec.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--report", "out/report"])
    assert args.report == "out/report"
