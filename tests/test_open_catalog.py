"""Open catalog: `tfrec export --catalog` serves items the models never saw, no retraining.

The session's trained run (retrieval + ranker) is exported over a grown catalog: the
tiny world's items plus new products (new ids, Chinese and accented titles) that are
copies in content of existing ones, one existing price changed and stock given. The
three models answer for the new items over gRPC on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from copy import deepcopy

import numpy as np
import pandas as pd
import pytest

import tfrec  # noqa: F401
from tests.helpers import serve_models

NEW_SUFFIXES = (" 新款", " édition spéciale", " 2026款 Ω", " neu", " 限量版 ü")


@pytest.fixture(scope="module")
def grown(tiny_world, tmp_path_factory):
    """(path of the grown catalog, new id -> the existing item it copies)."""
    catalog = tiny_world.catalog.assign(in_stock=True)
    twins = catalog.sample(len(NEW_SUFFIXES), random_state=3)
    new = twins.assign(item_id=[f"NEU-{i}" for i in range(len(twins))],
                       title=[t + s for t, s in zip(twins["title"], NEW_SUFFIXES)])
    out = pd.concat([catalog, new], ignore_index=True)
    out.loc[out["item_id"] == new["item_id"].iloc[-1], "in_stock"] = False
    path = str(tmp_path_factory.mktemp("grown") / "catalog.parquet")
    out.to_parquet(path)
    return path, dict(zip(new["item_id"], twins["item_id"]))


@pytest.fixture(scope="module")
def exported(trained_run, trained_ranker, tiny_config, grown, tmp_path_factory):
    """retrieval, ranker and pipeline exported over the grown catalog (models from disk)."""
    from tfrec import workflow

    cfg = deepcopy(tiny_config)
    cfg.export.base_dir = str(tmp_path_factory.mktemp("open_models"))
    paths = {"retrieval": workflow.export(cfg, run=trained_run.run_name, catalog=grown[0]),
             **workflow.export_ranking(cfg, run=trained_run.run_name, catalog=grown[0])}
    return cfg.export.base_dir, paths


@pytest.fixture(scope="module")
def client(exported):
    base = exported[0]
    yield from serve_models({name: os.path.join(base, name)
                             for name in ("retrieval", "ranker", "pipeline")})


def test_new_items_are_served_by_every_model_without_retraining(client, exported, grown,
                                                                 tiny_world):
    twins = grown[1]
    new_ids = set(twins)
    for name, path in exported[1].items():
        card = json.load(open(os.path.join(path, "assets.extra", "tfrec_model.json")))
        assert card["num_items"] == len(tiny_world.catalog) + len(new_ids), name

    # Retrieval: a new product is found among the items most similar to its twin.
    found = 0
    for new, twin in twins.items():
        similar = [r["item_id"] for r in client.similar_items("retrieval", twin, k=10)]
        found += new in similar
    assert found >= 3, f"only {found} of {len(twins)} new items are near their twins"

    # Ranker: new ids are scored (finite, from content), not refused.
    user = tiny_world.events["user_id"].iloc[0]
    for new, twin in twins.items():
        ranked = client.rank("ranker", user, [twin, new, "I000001"])
        scores = {r["item_id"]: r["score"] for r in ranked}
        assert set(scores) == {twin, new, "I000001"} and np.isfinite(scores[new])

    # Pipeline: new items come out of recommendations, never the out-of-stock one. New ids
    # start with no popularity and the OOV id row, and share a brand (cap 3) with their
    # twins, so they reach some users' top-100 only: every user is asked.
    out_of_stock = list(twins)[-1]
    served = set()
    for user in tiny_world.users["user_id"]:
        rows = client.recommend_pipeline("pipeline", user, k=100)
        served |= {r["item_id"] for r in rows}
        titles = {r["item_id"]: r["title"] for r in rows}
        for new in new_ids & set(titles):
            assert titles[new].startswith(tiny_world.catalog.set_index("item_id")
                                          .loc[twins[new], "title"])
    assert served & new_ids, f"no new item in {len(tiny_world.users)} users' top-100"
    assert out_of_stock not in served


@pytest.mark.parametrize("problem, message", [
    ("duplicate", "duplicate item_id"),
    ("empty_title", "'title' is empty"),
    ("bad_price", "price"),
    ("no_rows", "empty"),
    ("no_title_column", "missing column"),
])
def test_export_rejects_a_bad_catalog_naming_the_problem(trained_run, tiny_config, tiny_world,
                                                         tmp_path, problem, message):
    from tfrec import workflow
    from tfrec.data.schema import SchemaError

    catalog = tiny_world.catalog.copy()
    if problem == "duplicate":
        catalog.loc[5, "item_id"] = catalog.loc[4, "item_id"]
    elif problem == "empty_title":
        catalog.loc[7, "title"] = ""
    elif problem == "bad_price":
        catalog["price"] = catalog["price"].astype(object)
        catalog.loc[3, "price"] = "cheap"
    elif problem == "no_rows":
        catalog = catalog.iloc[:0]
    else:
        catalog = catalog.drop(columns="title")
    path = str(tmp_path / "catalog.csv")
    catalog.to_csv(path, index=False)
    cfg = deepcopy(tiny_config)
    cfg.export.base_dir = str(tmp_path / "models")
    with pytest.raises(SchemaError, match=message) as info:
        workflow.export(cfg, run=trained_run.run_name, catalog=path)
    if problem in ("empty_title", "bad_price"):
        assert "row" in str(info.value)
    assert not os.path.exists(cfg.export.base_dir) or not os.listdir(cfg.export.base_dir)


def test_cli_export_catalog_error_is_one_line_and_exit_2(trained_run, tiny_config, tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title,price\nA1,Lampe à poser,12\nA1,台灯,9\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "tfrec", "export", "--run", trained_run.run_name,
         "--set", f"train.checkpoint_dir={tiny_config.train.checkpoint_dir}",
         "--base-dir", str(tmp_path / "models"), "--catalog", str(path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("tfrec: error:")]
    assert len(error) == 1 and "duplicate item_id" in error[0] and "'A1'" in error[0]
    assert str(path) in error[0]
    assert not (tmp_path / "models").exists()
