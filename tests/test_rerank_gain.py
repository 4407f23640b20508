"""Issue 3 acceptance on the synthetic world: the ranked top-10 beats the retrieval order.

The whole default chain on the "small" world (the demo's): generate, train the
two-tower, train the ranker on its validation-period candidates, then the test-period
table `tfrec evaluate` prints. The tiny world of the other tests has too few lists for
the ranker to learn more than the retrieval score. About 2.5 minutes on 2 cores.
"""

import pytest

from tfrec import workflow
from tfrec.config import Config


@pytest.fixture(scope="module")
def small_world_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_rerank")
    cfg = Config()
    cfg.data.data_dir = str(root / "data")
    cfg.data.tfrecord_dir = str(root / "tfrecords")
    cfg.train.checkpoint_dir = str(root / "checkpoints")
    cfg.train.log_dir = str(root / "tensorboard_logs")
    workflow.generate(cfg, "small")
    result = workflow.train(cfg)
    workflow.train_ranker(cfg, run=result.run_name, retrieval=result.model)
    # A fresh Config as `tfrec evaluate` builds it: the ranker is reloaded from disk.
    fresh = Config()
    fresh.data.data_dir, fresh.data.tfrecord_dir = cfg.data.data_dir, cfg.data.tfrecord_dir
    fresh.train.checkpoint_dir = cfg.train.checkpoint_dir
    return workflow.evaluate(fresh, run=result.run_name)


def test_ranker_beats_retrieval_order_on_the_test_period(small_world_rows):
    rows = small_world_rows
    retrieval, ranked = rows["two_tower"], rows["two_tower+ranker"]
    oracle = rows["two_tower+oracle_ranker"]
    # Same candidates: recall@100 cannot move; the order within them does.
    assert ranked["recall@100"] == pytest.approx(retrieval["recall@100"])
    # This chain, 2026-12-06: +0.0078..+0.0142 NDCG@10 over 6 runs (train seeds 0-2, and 42
    # three times: the two-tower differs from run to run, the ranker lands near 0.110).
    # Patience 2 could stop a ranker whose first epochs were flat at its first epoch's
    # weights (seen with a sharper start, and the likely cause of one CI run's +0.0003):
    # `ranking.patience` is off by default since.
    assert ranked["ndcg@10"] > retrieval["ndcg@10"] + 0.005, (ranked, retrieval)
    # Purchases are rare (~70 in the period's top-10s), so their count is noise-bound:
    # +10..+16 on 3 bench seeds, but 0 and -3 (71 vs 74) in two CI runs. The ranker must
    # not lose purchases beyond 2 Poisson sd of the difference of the two counts.
    bought = {name: row["purchase_rate@10"] * 10 * row["users"]
              for name, row in (("ranked", ranked), ("retrieval", retrieval))}
    spread = 2.0 * (bought["ranked"] + bought["retrieval"]) ** 0.5
    assert bought["ranked"] >= bought["retrieval"] - spread, (bought, ranked, retrieval)
    # The true-utility re-rank of the same candidates stays the ceiling.
    assert oracle["ndcg@10"] > ranked["ndcg@10"]
    # Search sessions: the ranker's text features must not hurt the retrieval order.
    assert rows["search:two_tower+ranker"]["ndcg@10"] >= rows["search:two_tower"]["ndcg@10"]
