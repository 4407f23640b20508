"""Query -> category classifier of catalog search: categories, labels, the head.

The trained classifier in the search pipeline (accuracy, ranker features, filter, export)
is tested in tests/test_search.py, on its session search run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.search.category import (QueryCategoryHead, catalog_categories, category_accuracy,
                                   category_targets)


def _catalog(categories):
    return pd.DataFrame({"product_id": [f"P{i}" for i in range(len(categories))],
                         "title": [f"item {i}" for i in range(len(categories))],
                         "category": categories})


def test_catalog_categories_from_the_column_and_new_tables_by_name():
    cats = catalog_categories(_catalog(["tools", "garden", "", "tools"]), np.zeros([4, 3]))
    assert cats.source == "catalog" and cats.names == ["garden", "tools"]
    assert cats.rows.tolist() == [1, 0, -1, 1]
    new = pd.DataFrame({"category": ["garden", "kitchen", "tools"]})
    assert cats.for_products(new, np.zeros([3, 3])).tolist() == [0, -1, 1]
    assert catalog_categories(_catalog(["a", "b"]), np.zeros([2, 3]), source="off") is None


def test_title_departments_cluster_titles_and_assign_new_products_alike():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16, dtype=np.float32)
    group = np.repeat(np.arange(4), 25)
    vectors = centers[group] + 0.05 * rng.standard_normal([100, 16]).astype(np.float32)
    titles = [["cordless drill", "garden hose", "kitchen faucet", "ceiling fan"][g] + f" {i}"
              for i, g in enumerate(group)]
    catalog = pd.DataFrame({"product_id": [str(i) for i in range(100)], "title": titles})
    assert catalog_categories(catalog, vectors, source="auto") is None  # no column: none
    cats = catalog_categories(catalog, vectors, source="clusters", clusters=4, seed=0)
    assert cats.source == "clusters" and cats.centroids.shape == (4, 16)
    # Each true group is one department, and departments are named by their title words.
    assert all(len(set(cats.rows[group == g])) == 1 for g in range(4))
    assert len(set(cats.rows)) == 4
    name = cats.names[cats.rows[0]]
    assert "cordless" in name or "drill" in name, cats.names
    new = centers[[2, 0]] + 0.01
    assert cats.for_products(pd.DataFrame({"title": ["x", "y"]}), new).tolist() == [
        cats.rows[group == 2][0], cats.rows[0]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(source="catalog"), "needs a catalog with a non-empty 'category' column"),
    (dict(source="brand"), "query_category must be one of auto, catalog, clusters, off"),
    (dict(source="clusters", clusters=1), "category_clusters must be >= 2"),
])
def test_catalog_categories_errors(kwargs, message):
    catalog = pd.DataFrame({"product_id": ["a", "b"], "title": ["x", "y"]})
    with pytest.raises(ValueError, match=message):
        catalog_categories(catalog, np.eye(2, dtype=np.float32), **kwargs)


def test_category_targets_weight_products_by_gain():
    judgments = pd.DataFrame({"query": ["q1", "q1", "q1", "q2", "q3"],
                              "product_id": ["a", "b", "c", "a", "c"],
                              "relevance": [3.0, 2.0, 3.0, 1.0, 2.0]})
    row_of = {"a": 0, "b": 1, "c": 2}
    targets = category_targets(judgments, row_of, np.array([0, 1, -1]), 2, ["q1", "q2", "q3"])
    np.testing.assert_allclose(targets, [[2 / 3, 1 / 3], [0, 0], [0, 0]])
    # q2: only an irrelevant product; q3: a product of unknown category -> no label.
    assert category_accuracy(np.array([[1.0, 0.0], [0, 1], [0, 1]]), targets) == 1.0
    assert category_accuracy(np.array([[0.0, 1.0], [0, 1], [0, 1]]), targets) == 0.0


def test_head_config_round_trip_and_errors():
    head = QueryCategoryHead(7, hidden=16, dropout=0.1)
    clone = QueryCategoryHead.from_config(head.get_config())
    assert (clone.num_categories, clone.hidden, clone.rate) == (7, 16, 0.1)
    assert clone(tf.zeros([2, 5])).shape == (2, 7)
    with pytest.raises(ValueError, match=">= 2 categories"):
        QueryCategoryHead(1)
