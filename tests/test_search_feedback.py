"""Pseudo-relevance feedback past the ranker's head (tfrec.search.feedback)."""

from __future__ import annotations

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tfrec.search.config import SearchConfig, check_feedback
from tfrec.search.feedback import feedback_centroid, feedback_query, feedback_scores


def _order(scores: np.ndarray) -> list:
    return list(np.argsort(-scores, kind="stable"))


def _list():
    """One query, six candidates (the last invalid). Ranker order: 0 1 2 3 4. The best
    hybrid candidates 0 and 1 point along x; candidate 4 (ranked last) does too, 2 and
    3 do not."""
    scores = tf.constant([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0]])
    hybrid = tf.constant([[3.0, 2.0, 0.0, 0.0, 0.0, 99.0]])
    vectors = tf.constant([[[1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [-0.2, 1.0], [1.0, 0.0],
                            [1.0, 0.0]]])
    valid = tf.constant([[True, True, True, True, True, False]])
    return scores, hybrid, vectors, valid


def test_the_head_keeps_its_order_and_the_tail_follows_the_centroid():
    scores, hybrid, vectors, valid = _list()
    out = feedback_scores(scores, hybrid, vectors, valid, weight=2.0, keep=2, top=2)[0]
    out = out.numpy()
    assert out[5] == -1e9  # invalid stays last, whatever its ranker score and hybrid
    assert _order(out)[:5] == [0, 1, 4, 2, 3]  # 4 shares the head's product line
    assert out[:2].min() > out[2:5].max()  # a total order: the head above the tail
    # Weight 0: the ranker's order all the way down.
    plain = feedback_scores(scores, hybrid, vectors, valid, weight=0.0, keep=2, top=2)[0]
    assert _order(plain.numpy())[:5] == [0, 1, 2, 3, 4]
    # keep covers the list: nothing moves.
    whole = feedback_scores(scores, hybrid, vectors, valid, weight=2.0, keep=5, top=2)[0]
    assert _order(whole.numpy())[:5] == [0, 1, 2, 3, 4]


def test_feedback_handles_short_lists_and_batches():
    scores, hybrid, vectors, valid = _list()
    # top larger than the list, and a second query with one valid candidate.
    batch = [tf.concat([x, x], 0) for x in (scores, hybrid, vectors)]
    mask = tf.constant([[True] * 5 + [False], [False, False, True, False, False, False]])
    out = feedback_scores(*batch, mask, weight=1.0, keep=3, top=50).numpy()
    assert np.isfinite(out).all()
    assert out[1, 2] > -1e9 and (np.delete(out[1], 2) == -1e9).all()
    assert _order(out[0])[:3] == [0, 1, 2]
    fn = tf.function(lambda s, h, v, m: feedback_scores(s, h, v, m, 1.0, 3, 50))
    np.testing.assert_allclose(fn(*batch, mask).numpy(), out, rtol=1e-6)


def test_the_centroid_is_the_best_hybrid_candidates_and_the_query_moves_halfway():
    _, hybrid, vectors, valid = _list()
    # The two best valid hybrid candidates (0, 1) point along x; the invalid one (hybrid
    # 99) is left out.
    centroid = feedback_centroid(hybrid, vectors, valid, top=2).numpy()[0]
    np.testing.assert_allclose(centroid, [1.0, 0.0], atol=1e-6)
    # With top 3 the third best (2, along y, hybrid 0 tied with 3 and 4) joins in.
    wider = feedback_centroid(hybrid, vectors, valid, top=3).numpy()[0]
    assert wider[1] > 0.1 and abs(np.linalg.norm(wider) - 1.0) < 1e-6
    # The feedback query is a unit vector as close to the query as to the centroid.
    query = tf.constant([[0.0, 3.0]])
    moved = feedback_query(query, centroid[np.newaxis]).numpy()[0]
    np.testing.assert_allclose(moved, [2 ** -0.5, 2 ** -0.5], atol=1e-6)


@pytest.mark.parametrize("weights, keep, top, message", [
    ((-0.5,), 20, 10, r"finite numbers >= 0 \(0 = off\), got -0.5"),
    ((float("nan"),), 20, 10, "finite numbers >= 0"),
    ((True,), 20, 10, "finite numbers >= 0"),
    ((0.5,), 0, 10, "feedback_keep must be an integer >= 1, got 0"),
    ((0.5,), 20, 2.5, "feedback_top must be an integer >= 1, got 2.5"),
])
def test_bad_feedback_settings_are_named(weights, keep, top, message):
    with pytest.raises(ValueError, match=message):
        check_feedback(weights, keep, top)
    cfg = SearchConfig(feedback_weights=weights, feedback_keep=keep, feedback_top=top)
    with pytest.raises(ValueError, match="search.feedback"):
        cfg.check()


@pytest.mark.parametrize("extras", [(-1,), (2.5,), (True,)])
def test_bad_feedback_extras_are_named(extras):
    with pytest.raises(ValueError, match=r"feedback_extra\(s\) must be integers >= 0"):
        check_feedback((0.5,), 20, 10, extras=extras)
    with pytest.raises(ValueError, match=r"search.feedback_extra\(s\)"):
        SearchConfig(feedback_extras=extras).check()
    with pytest.raises(ValueError, match=r"search.feedback_extra\(s\)"):
        SearchConfig(feedback_extra=extras[0]).check()


@pytest.mark.parametrize("pool", [-1, 2.5, True])
def test_bad_feedback_pool_is_named(pool):
    with pytest.raises(ValueError, match=r"feedback_pool must be an integer >= 0"):
        check_feedback((0.5,), 20, 10, pool=pool)
    with pytest.raises(ValueError, match=r"search.feedback_pool"):
        SearchConfig(feedback_pool=pool).check()


@pytest.mark.parametrize("pool", [1, 100])
def test_a_feedback_pool_within_the_dense_list_is_refused(pool):
    """The first pass's top `candidates` is the dense list: no new product there."""
    with pytest.raises(ValueError, match=r"feedback_pool must be 0 .* more than the 100 "
                                         r"candidates"):
        check_feedback((0.5,), 20, 10, pool=pool, candidates=100)
    with pytest.raises(ValueError, match=r"search.feedback_pool must be 0"):
        SearchConfig(feedback_pool=pool, candidates=100).check()
    SearchConfig(feedback_pool=101, candidates=100).check()
    SearchConfig(feedback_pool=0, candidates=100).check()
