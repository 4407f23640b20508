"""`tfrec search distill`: a shallower student (or a word-piece bag) learns a trained
search run's query tower, is saved as a search run that reloads with the same answers,
and exports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfrec  # noqa: F401
import tensorflow as tf

from tests.test_search import _tiny_config


@pytest.fixture(scope="module")
def teacher(tiny_encoder, tmp_path_factory):
    from tfrec.search.train import train_search

    workdir = str(tmp_path_factory.mktemp("teacher"))
    # The teacher's ranker is not the subject; 5 feedback products, so the students are
    # also measured without them.
    cfg = dataclasses.replace(_tiny_config(tiny_encoder), epochs=2, ranker_epochs=1,
                              ranker_folds=0, feedback_extras=(5,))
    train_search(cfg, workdir, log_dir=str(tmp_path_factory.mktemp("teacher_logs")))
    return workdir


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    from tfrec.search.distill import DistillConfig, distill_search

    out = str(tmp_path_factory.mktemp("student"))
    settings = DistillConfig(layers=1, epochs=2, title_queries=200, lr=3e-4)
    return distill_search(teacher, out, settings, latency_queries=5), out


def test_student_is_shallower_and_starts_from_the_teacher(distilled):
    from tfrec.text.hub_export import read_export_info

    result, out = distilled
    info = read_export_info(result["student_encoder"])
    assert info["config"]["num_layers"] == 1
    assert result["distill_queries"] > 200  # training queries + 200 titles
    assert len(result["val_ndcg@10"]) == 3  # before training + 2 epochs
    for side in ("teacher", "student"):
        assert set(result[side]["metrics"]) >= {"bm25", "two_tower", "hybrid",
                                                "two_tower+ranker"}
        assert set(result[side]["latency_ms"]) == {"query_tower", "search",
                                                   "search_no_feedback_products"}
    kept = result["kept_gain_over_bm25"]
    assert set(kept) == {"two_tower", "hybrid", "two_tower+ranker"}
    with open(os.path.join(out, "search", "distill.json")) as f:
        saved = json.load(f)
    assert saved["kept_gain_over_bm25"] == pytest.approx(kept, nan_ok=True)


def test_student_run_reloads_with_the_same_answers(distilled):
    from tfrec.search.index import load_search_pipeline

    result, out = distilled
    pipeline = result["pipeline"]
    queries = tf.constant(["red shoes", "无线耳机", "café crème"])
    want = pipeline.search(queries, num_results=5)
    from tfrec.search.config import SearchConfig
    from tfrec.search.train import load_search_data

    saved = SearchConfig.from_yaml(os.path.join(out, "search", "model", "config.yaml"))
    reloaded, cfg = load_search_pipeline(out, load_search_data(saved).catalog)
    assert cfg.encoder == result["student_encoder"]
    got = reloaded.search(queries, num_results=5)
    np.testing.assert_allclose(got["dense_scores"].numpy(), want["dense_scores"].numpy(),
                               atol=1e-4)
    assert (got["product_ids"].numpy() == want["product_ids"].numpy()).all()


def test_cli_distill_refuses_bad_settings(teacher, tmp_path):
    base = [sys.executable, "-m", "tfrec.cli", "search", "distill", "--run", teacher]
    proc = subprocess.run(base + ["--workdir", str(tmp_path / "t"), "--layers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "tfrec: error:" in proc.stderr
    assert "layers must be in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base[:-1] + [str(tmp_path / "nothing"), "--workdir",
                                       str(tmp_path / "u")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no trained search run" in proc.stderr


@pytest.fixture(scope="module")
def bag_distilled(teacher, tmp_path_factory):
    """`tfrec search distill --layers 0` as a user runs it: (printed figures, workdir)."""
    out = str(tmp_path_factory.mktemp("bag_student"))
    proc = subprocess.run([sys.executable, "-m", "tfrec.cli", "search", "distill", "--run",
                           teacher, "--workdir", out, "--layers", "0", "--epochs", "2",
                           "--set", "title_queries=200", "--set", "lr=1e-3", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out


def test_word_bag_starts_from_the_teachers_one_word_queries(teacher, tmp_path):
    """Before any training, a one-word query's bag vector is the teacher's encoder output
    for that query (one piece, or a known word of several pieces); other words are the
    mean of their pieces, and a query the mean of its words."""
    from tfrec.search.config import SearchConfig
    from tfrec.search.index import load_search_pipeline
    from tfrec.search.model import query_encoder_of
    from tfrec.search.train import load_search_data
    from tfrec.search.word_bag import WordBagEncoder, multi_piece_words, teacher_word_vectors
    from tfrec.text.hub_export import vocab_path
    from tfrec.text.vocab import read_vocab, special_ids

    cfg = SearchConfig.from_yaml(os.path.join(teacher, "search", "model", "config.yaml"))
    pipeline, _ = load_search_pipeline(teacher, load_search_data(cfg).catalog)
    encoder = pipeline.two_tower.query_encoder
    vocab = read_vocab(vocab_path(cfg.encoder))
    special = special_ids(vocab)
    # The tiny vocabulary spells unknown words with character pieces: "zq" is z + ##q.
    words = multi_piece_words(encoder.tokenize, ["zq zq zqx", "qz qz"], 3, limit=2)
    z, q, x = (vocab.index(t) for t in ("z", "##q", "##x"))
    assert words == [(z, q), (vocab.index("q"), vocab.index("##z"))]
    bag = query_encoder_of(dataclasses.replace(cfg, query_encoder="word_bag",
                                               word_bag_words=len(words)))
    assert isinstance(bag, WordBagEncoder) and bag.pieces.shape == (len(vocab), 64)
    bag.pieces.assign(teacher_word_vectors(encoder.encoder, [(i,) for i in range(len(vocab))],
                                           special.cls, special.sep, batch_size=97))
    bag.set_words(words, teacher_word_vectors(encoder.encoder, words, special.cls,
                                              special.sep))
    one_piece = [w for w in vocab if w.isalpha() and w.lower() == w and len(w) > 2][:20]
    assert len(one_piece) == 20
    for queries in (one_piece, ["zq", "qz"]):
        np.testing.assert_allclose(bag(tf.constant(queries)).numpy(),
                                   encoder(tf.constant(queries), training=False).numpy(),
                                   rtol=1e-4, atol=1e-5)
    pieces = bag.pieces.numpy()
    np.testing.assert_allclose(bag(tf.constant(["zqx"])).numpy()[0],
                               pieces[[z, q, x]].mean(0), atol=1e-5)
    pair = bag(tf.constant([f"{one_piece[0]} zq"])).numpy()[0]
    np.testing.assert_allclose(
        pair, (pieces[vocab.index(one_piece[0])] + bag(tf.constant(["zq"])).numpy()[0]) / 2,
        atol=1e-5)
    # The word keys and rows are variables: a checkpoint carries them to a new bag.
    path = tf.train.Checkpoint(bag=bag).write(str(tmp_path / "bag"))
    again = query_encoder_of(dataclasses.replace(cfg, query_encoder="word_bag",
                                                 word_bag_words=len(words)))
    tf.train.Checkpoint(bag=again).read(path).assert_existing_objects_matched()
    queries = tf.constant(["zq qz zqx", one_piece[0]])
    np.testing.assert_array_equal(again(queries).numpy(), bag(queries).numpy())


def test_word_bag_student_reloads_exports_and_serves_unicode(bag_distilled, tmp_path):
    from tfrec.search.config import SearchConfig
    from tfrec.search.export import export_search
    from tfrec.search.index import load_search_pipeline
    from tfrec.search.train import load_search_data
    from tfrec.search.word_bag import WordBagEncoder

    result, out = bag_distilled
    assert result["student_encoder"] is None
    assert len(result["val_ndcg@10"]) == 3
    assert set(result["kept_gain_over_bm25"]) == {"two_tower", "hybrid", "two_tower+ranker"}
    # Without the feedback query's second pass: the ranked stage and its search time.
    for side in ("teacher", "student"):
        assert set(result[side]["metrics_no_feedback_products"]) == {"bm25", "two_tower+ranker"}
        assert result[side]["latency_ms"]["search_no_feedback_products"] > 0
    assert set(result["kept_gain_no_feedback_products"]) == {"two_tower+ranker"}
    saved = SearchConfig.from_yaml(os.path.join(out, "search", "model", "config.yaml"))
    assert saved.query_encoder == "word_bag"
    reloaded, _ = load_search_pipeline(out, load_search_data(saved).catalog)
    assert isinstance(reloaded.two_tower.query_encoder, WordBagEncoder)
    queries = ["red shoes", "无线耳机 蓝牙", "café crème brûlée"]
    want = reloaded.search(tf.constant(queries), num_results=5)
    # Non-ASCII queries read as words: their vectors differ from an empty query's.
    q = reloaded.two_tower.query_vectors(tf.constant(queries[1:] + [""])).numpy()
    assert np.abs(q[0] - q[2]).max() > 1e-3 and np.abs(q[1] - q[2]).max() > 1e-3
    # The export (written by the distilling process) in a fresh process: same answers
    # as the reloaded run.
    assert os.path.isfile(os.path.join(result["export"], "saved_model.pb"))
    code = ("import json, sys, tensorflow_text, tensorflow as tf\n"
            "m = tf.saved_model.load(sys.argv[1])\n"
            "r = m.signatures['serving_default'](query=tf.constant(json.loads(sys.argv[2])))\n"
            "print(json.dumps([[x.decode() for x in row] for row in "
            "r['product_ids'].numpy()[:, :5]]))\n")
    proc = subprocess.run([sys.executable, "-c", code, result["export"], json.dumps(queries)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served == [[x.decode() for x in row] for row in want["product_ids"].numpy()]

    # int8 storage: the bag's piece and word tables and the product vectors leave the
    # SavedModel as float32; a fresh process answers within the rounding.
    path = export_search(reloaded, str(tmp_path / "int8"), num_results=5, precision="int8")
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    bag = reloaded.two_tower.query_encoder
    for table in (bag.pieces, bag.word_vectors, reloaded.product_vectors):
        assert sorted(dtypes[k].name for k, shape in shapes.items()
                      if shape == table.shape.as_list()) == ["int8"], table.name
    proc = subprocess.run([sys.executable, "-c", code, path, json.dumps(queries)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    kept = sum(len(set(a) & {x.decode() for x in b})
               for a, b in zip(served, want["product_ids"].numpy()))
    assert kept >= 0.8 * 5 * len(queries), (served, want["product_ids"])


def test_search_train_refuses_a_word_bag_config(tiny_encoder, tmp_path):
    from tfrec.search.train import train_search

    cfg = dataclasses.replace(_tiny_config(tiny_encoder), query_encoder="word_bag")
    with pytest.raises(ValueError, match="distilled student"):
        train_search(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="search.query_encoder must be one of"):
        dataclasses.replace(cfg, query_encoder="lstm").check()
