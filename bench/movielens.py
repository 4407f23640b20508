"""tfrec on MovieLens 100K under two published protocols, beside the published numbers.

Protocol 1 - TensorFlow Recommenders basic retrieval tutorial
  Split: `tf.random.set_seed(42)`, `shuffle(100_000, seed=42, reshuffle_each_iteration=
  False)` of the 100k ratings, first 80,000 train, last 20,000 test (tfrec.data.movielens.
  tutorial_split; same calls, u.data row order). Metric: TFRS FactorizedTopK top-100
  accuracy over the test ratings: share of test (user, movie) pairs whose movie is in
  the user's top 100 of all 1,682 movies (no exclusion of training movies), computed
  by the TFRS metric itself (id-based) and cross-checked with numpy. Published: 0.23
  (basic: 32-dim user-id / movie-title embeddings, Adagrad 0.1, 3 epochs); about 0.29
  with deeper towers and more features.
  Rows: the tutorial's model re-run here (same code as the tutorial, on this split), a
  popularity ranking through the same metric, tfrec's TwoTowerModel with ids only (the
  tutorial's information), with movie content (title words and character trigrams,
  genres), and with the user's 20 most recent ratings *of the training split* strictly
  before the rated timestamp (a test rating never enters a feature or the training
  data; the timestamp is a feature of the published "deeper" models too).

Protocol 2 - Microsoft Recommenders MovieLens benchmark
  Split: python_stratified_split(ratio=0.75, filter_by="user", seed=42) re-implemented
  (tfrec.data.movielens.stratified_split): each user's ratings ordered by
  np.random.seed(42); np.random.rand(100000) drawn in u.data order, first 75% train.
  Every test rating is relevant whatever its value. Top-10 over movies the user did not
  rate in train. Metrics as Microsoft Recommenders' python_evaluation: nDCG@10 (binary
  gain, ideal = min(|rel|, 10) hits), Precision@10 (hits / 10), Recall@10 (hits /
  |rel|) and MAP (sum of precision at hits in the top 10 / |rel|, their `map_at_k` of
  the published table); MAP@10 normalised by min(|rel|, 10) is printed too.
  Baselines (same split, same evaluation code): popularity and item-item
  co-occurrence (SAR-like, Jaccard). tfrec rows: ids only (towers without the output
  Dense, `model.projection: false`: better on validation here), and ids + content + a
  history of 20 of the user's training ratings drawn at random (one list per user is
  asked for, its targets are spread over the user's whole timeline, so the query is
  the profile; 8 samples averaged at query time, fresh samples each training epoch).

Hyper-parameters were chosen on a validation split carved out of the training ratings
(`--tune` reproduces it), never on the test split. Run from the repository root:

    python bench/movielens.py [--data-dir ../shared/data] [--protocol 1|2|both]

--index ivf computes the tfrec lists (protocol 1's numpy check, protocol 2's top-10)
through the IVF index `tfrec export` builds with export.index=ivf instead of exact
search (nprobe tuned to recall@100 0.95 against exact: on training examples' queries in
protocol 1, on the queries themselves in protocol 2; no labels involved).

Smoke mode (--smoke; tests/test_bench_smoke.py runs it): the first 5,000 ratings of
u.data (same splits, scaled: protocol 1 trains on 80% of them), one seed, 1 epoch for
every model (the tutorial's included), and only the last (richest) tfrec setup of each
protocol; both tables, the published rows and the baselines as usual. The figures mean
nothing. Without MovieLens 100K under the data dir, a smoke run prints "skipped: ..."
and exits 0 (a full run exits 2). TensorFlow's graph optimizer is off
(bench/_common.py). Options given explicitly still override these.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tfrec  # noqa: F401  (before TensorFlow: selects tf_keras)
import numpy as np
import pandas as pd
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrec.config import Config, ExportConfig, parse_assignment, set_field
from tfrec.data.examples import histories_before
from tfrec.data.movielens import (MovieLens, load_movielens, movielens_path, ratings_to_events,
                                  stratified_split, targets_by_user, tutorial_split)
from tfrec.data.schema import PAD
from tfrec.evaluation.baselines import CooccurrenceBaseline, PopularityBaseline
from tfrec.metrics.ranking import evaluate_topk, map_at_k
from tfrec.metrics.retrieval import catalog_features, embed_in_batches, retrieve_topk
from tfrec.features.vocab import build_vocabularies
from tfrec.models.catalog_index import IndexSearch, TuningQueries
from tfrec.models.embedding import tower_fn
from tfrec.training.callbacks import refresh_index
from tfrec.training.negatives import negatives_dataset, with_negatives
from tfrec.training.trainer import build_model

tf.get_logger().setLevel("ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line, parse_smoke_args, skip  # noqa: E402

SMOKE = dict(seeds=1, ratings=5000, epochs=1, tutorial_epochs=1, setups="last")

NO_HISTORY_TS = np.iinfo(np.int64).min  # query time before everything: empty history
LATEST_TS = np.iinfo(np.int64).max  # query time after everything: whole history
PROFILE_SAMPLES = 8  # profile histories averaged per protocol-2 query
INDEX = {"kind": "exact"}  # --index: "ivf" retrieves through the export's IVF index


def index_search(tune_queries: np.ndarray, source: str) -> Optional[IndexSearch]:
    """The IVF index search of --index ivf (None: exact), nprobe tuned on `tune_queries`."""
    if INDEX["kind"] != "ivf":
        return None
    return IndexSearch(ExportConfig(index="ivf"), TuningQueries(tune_queries, source=source))

PUBLISHED_P1 = [("TFRS basic retrieval tutorial (published)", 0.23),
                ("TFRS deeper towers / more features (published, about)", 0.29)]
# Microsoft Recommenders README, MovieLens 100k, k=10: MAP, nDCG@10, Precision@10, Recall@10.
PUBLISHED_P2 = [("BiVAE", 0.146126, 0.475077, 0.411771, 0.219145),
                ("BPR", 0.132478, 0.441997, 0.388229, 0.212522),
                ("LightGCN", 0.088526, 0.419846, 0.379626, 0.144336),
                ("NCF", 0.107720, 0.396118, 0.347296, 0.180775),
                ("SAR", 0.110591, 0.382461, 0.330753, 0.176385)]


@dataclasses.dataclass
class TwoTowerSetup:
    """One tfrec configuration: which features, model and optimisation settings."""

    name: str
    content: bool = True  # title text + genres as item features
    history: int = 0  # history length (0: none)
    history_mode: str = "time"  # "time": rated just before; "profile": random own items
    encoder: str = "pooled"  # model.history_encoder: pooled | transformer | gru
    hour: bool = False
    embedding_dim: int = 64
    id_dim: int = 64
    hidden: Tuple[int, ...] = (128,)
    projection: bool = True  # model.projection; False: ids-only towers, no output Dense
    temperature: float = 0.1
    id_dropout: float = 0.0
    logq: bool = True
    catalog_negatives: int = 0  # model.catalog_negatives: uniform draws beside in-batch
    lr: float = 0.002
    epochs: int = 10
    batch_size: int = 1024
    seed: int = 42


# ------------------------------------------------------------------------- features

def item_table(ml: MovieLens, content: bool) -> pd.DataFrame:
    """The candidate features of every movie (blank content when ids only)."""
    movies = ml.movies
    genres = movies["genres"].tolist()
    n = len(movies)
    if content:
        # department = first genre, category = the genre combination.
        category = [f"{g[0]}>{'|'.join(g)}" if g else "unknown" for g in genres]
        title = movies["title"].astype(str).to_numpy(dtype=object)
    else:
        category = [""] * n
        title = np.full(n, "", dtype=object)
    return pd.DataFrame({"item_id": movies["item_id"].astype(str).to_numpy(dtype=object),
                         "title": title, "description": "",
                         "category": np.asarray(category, dtype=object), "brand": "",
                         "price": np.zeros(n, dtype=np.float32)})


def history_matrix(queries: pd.DataFrame, source: pd.DataFrame, length: int,
                   at_ts: Optional[np.ndarray] = None) -> np.ndarray:
    """[N, length] items each query's user rated in `source` strictly before its time.

    Args:
      queries: rows with user_id (and ts, unless at_ts is given).
      source: ratings the history may come from (the training split only).
      length: items kept, most recent first, padded with "".
      at_ts: per query, the time to read the history at (default queries.ts).
    """
    out = np.full((len(queries), max(length, 1)), PAD, dtype=object)
    if length <= 0:
        return out
    by_user = source.sort_values(["user_id", "ts"], kind="stable")
    ts = queries["ts"].to_numpy(np.int64) if at_ts is None else np.asarray(at_ts, np.int64)
    rows = histories_before(by_user["user_id"].to_numpy(), by_user["item_id"].to_numpy(),
                      by_user["ts"].to_numpy(np.int64), queries["user_id"].to_numpy(), ts, length)
    for i, items in enumerate(rows):
        out[i, :len(items)] = items
    return out


def profile_history(queries: pd.DataFrame, source: pd.DataFrame, length: int,
                    seed: int, exclude_target: bool = True) -> np.ndarray:
    """[N, length] random sample (with replacement) of each query user's `source` items.

    Protocol 2 asks for one list per user with targets drawn at random from the
    user's whole timeline, so its query is the user's profile, not "what came just
    before"; training examples see the same kind of history, minus their own target.

    Args:
      queries: rows with user_id (and item_id, the target, when exclude_target).
      source: ratings the history comes from (the training split only).
      length: sampled items per query ("" where the target was drawn).
      seed: sampling seed (a new one per epoch gives fresh samples).
      exclude_target: blank out draws equal to the query's own item.
    """
    out = np.full((len(queries), max(length, 1)), PAD, dtype=object)
    if length <= 0:
        return out
    by_user = source.sort_values("user_id", kind="stable")
    users = by_user["user_id"].to_numpy()
    items = by_user["item_id"].to_numpy(dtype=object)
    starts = pd.Series(np.arange(len(users))).groupby(users).min()
    sizes = pd.Series(users).value_counts()
    q_users = queries["user_id"].to_numpy()
    start = starts.reindex(q_users).to_numpy()
    size = sizes.reindex(q_users).to_numpy()
    known = ~np.isnan(size)
    rng = np.random.default_rng(seed)
    draws = np.floor(rng.random((len(queries), length)) * np.nan_to_num(size)[:, None])
    picked = items[(np.nan_to_num(start)[:, None] + draws).astype(np.int64)]
    if exclude_target and "item_id" in queries:
        picked[picked == queries["item_id"].to_numpy(dtype=object)[:, None]] = PAD
    out[known] = picked[known]
    return out


def example_arrays(queries: pd.DataFrame, items: pd.DataFrame, history: np.ndarray,
                   probs: pd.Series, hour: bool) -> Dict[str, np.ndarray]:
    """Feature dict of retrieval examples (query side + the rated movie's features)."""
    idx = pd.Index(items["item_id"]).get_indexer(queries["item_id"])
    if (idx < 0).any():
        raise ValueError("ratings reference movies missing from the item table")
    n = len(queries)
    ts = queries["ts"].to_numpy(np.int64)
    return {
        "user_id": queries["user_id"].astype(str).to_numpy(dtype=object),
        "history": history, "query": np.full(n, "", dtype=object),
        "device": np.full(n, "", dtype=object),
        "hour": ((ts // 3600) % 24) if hour else np.zeros(n, dtype=np.int64),
        "item_id": items["item_id"].to_numpy(dtype=object)[idx],
        "title": items["title"].to_numpy(dtype=object)[idx],
        "category": items["category"].to_numpy(dtype=object)[idx],
        "brand": np.full(n, "", dtype=object),
        "price": np.zeros(n, dtype=np.float32),
        "weight": np.ones(n, dtype=np.float32),
        "candidate_prob": probs.reindex(queries["item_id"]).to_numpy(np.float32),
    }


def setup_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    """"FIELD=VALUE" strings -> changes of `TwoTowerSetup` fields, values read as YAML
    and type-checked as `tfrec --set` checks config fields.

    Raises:
      ValueError: not FIELD=VALUE, an unknown field, or a value of the wrong type.
    """
    probe = TwoTowerSetup(name="")
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, value = parse_assignment(pair, "FIELD=VALUE", flag="--override")
        if key == "name":
            raise ValueError(f"--override {pair!r}: a setup's name cannot be changed")
        set_field(probe, key, value, prefix="setup")
        out[key] = getattr(probe, key)
    return out


def to_dataset(arrays: Dict[str, np.ndarray], batch_size: int, shuffle: bool,
               seed: int, preprocess=None) -> tf.data.Dataset:
    """Batches of the example arrays; with `preprocess` (the model's), mapped in tf.data
    as `tfrec train` does, so the step sees integers."""
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        ds = ds.shuffle(len(arrays["user_id"]), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if preprocess is not None:
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def sampling_probabilities(train: pd.DataFrame, items: pd.DataFrame) -> pd.Series:
    counts = train["item_id"].value_counts().reindex(items["item_id"], fill_value=0)
    counts = counts.astype(np.float64).clip(lower=0.5)
    return counts / counts.sum()


# ------------------------------------------------------------------------- models

def build_two_tower(setup: TwoTowerSetup, train: pd.DataFrame, items: pd.DataFrame,
                    factorized_ks: Sequence[int] = ()):
    cfg = Config()
    cfg.model.embedding_dim = setup.embedding_dim
    cfg.model.id_embedding_dim = setup.id_dim
    cfg.model.text_embedding_dim = 32
    cfg.model.hidden_units = tuple(setup.hidden)
    cfg.model.projection = setup.projection
    if not setup.projection:  # the towers' parts are their vectors: ids only
        cfg.model.query_features, cfg.model.candidate_features = ("user_id",), ("item_id",)
    cfg.model.temperature = setup.temperature
    cfg.model.id_dropout = setup.id_dropout
    cfg.model.logq_correction = setup.logq
    cfg.model.catalog_negatives = setup.catalog_negatives
    cfg.model.history_encoder = setup.encoder
    cfg.model.char_ngram_bins = 5000 if setup.content else 0
    cfg.model.factorized_topk_ks = tuple(factorized_ks)
    cfg.train.learning_rate = setup.lr
    vocab_rows = pd.DataFrame({"user_id": train["user_id"].astype(str),
                               "item_id": train["item_id"].astype(str), "query": ""})
    vocab = build_vocabularies(vocab_rows, items, cfg.model.text_max_tokens, 4)
    tf.keras.utils.set_random_seed(setup.seed)
    model = build_model(vocab, cfg)
    model.build_from_features()
    return model


def train_two_tower(setup: TwoTowerSetup, train: pd.DataFrame, items: pd.DataFrame,
                    factorized_ks: Sequence[int] = ()) -> tf.keras.Model:
    """Builds and fits tfrec's TwoTowerModel on training ratings (history from train)."""
    model = build_two_tower(setup, train, items, factorized_ks)
    probs = sampling_probabilities(train, items)

    def batches(arrays: Dict[str, np.ndarray], seed: int) -> tf.data.Dataset:
        ds = to_dataset(arrays, setup.batch_size, True, seed, model.preprocess)
        if setup.catalog_negatives:  # as `tfrec train` adds them
            ds = with_negatives(ds, negatives_dataset(items, model, setup.catalog_negatives,
                                                      seed, shares=probs))
        return ds

    if setup.history_mode == "profile":  # fresh profile samples every epoch
        for epoch in range(setup.epochs):
            history = profile_history(train, train, setup.history, seed=setup.seed + epoch)
            arrays = example_arrays(train, items, history, probs, setup.hour)
            model.fit(batches(arrays, setup.seed + epoch), epochs=1, verbose=0)
        return model
    history = history_matrix(train, train, setup.history)
    arrays = example_arrays(train, items, history, probs, setup.hour)
    model.fit(batches(arrays, setup.seed), epochs=setup.epochs, verbose=0)
    return model


def run_tfrs_tutorial(train: pd.DataFrame, test: pd.DataFrame, ml: MovieLens,
                      epochs: int = 3) -> float:
    """The TFRS basic retrieval tutorial's model and training, on this split.

    User id and movie title embeddings (32 dims), FactorizedTopK over the 1,682 movies'
    titles, Adagrad(0.1), batch 8192, 3 epochs; returns test top-100 accuracy.
    """
    titles = dict(zip(ml.movies["item_id"], ml.movies["title"].astype(str)))
    movie_titles = ml.movies["title"].astype(str).to_numpy()
    user_ids = np.unique(train["user_id"].astype(str).to_numpy())
    dim = 32
    tf.keras.utils.set_random_seed(42)
    user_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=user_ids, mask_token=None),
        tf.keras.layers.Embedding(len(user_ids) + 1, dim)])
    unique_titles = np.unique(movie_titles)
    movie_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=unique_titles, mask_token=None),
        tf.keras.layers.Embedding(len(unique_titles) + 1, dim)])
    candidates = tf.data.Dataset.from_tensor_slices(movie_titles).batch(128).map(movie_model)
    task = tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(candidates=candidates))

    class MovielensModel(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_model, self.movie_model, self.task = user_model, movie_model, task

        def compute_loss(self, features, training=False):
            return self.task(self.user_model(features["user_id"]),
                             self.movie_model(features["movie_title"]),
                             compute_metrics=not training)

    def frame(ratings: pd.DataFrame) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices({
            "user_id": ratings["user_id"].astype(str).to_numpy(),
            "movie_title": ratings["item_id"].map(titles).to_numpy().astype(str)})

    model = MovielensModel()
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    cached_train = frame(train).shuffle(100_000).batch(8192).cache()
    cached_test = frame(test).batch(4096).cache()
    model.fit(cached_train, epochs=epochs, verbose=0)
    result = model.evaluate(cached_test, return_dict=True, verbose=0)
    return float(result["factorized_top_k/top_100_categorical_accuracy"])


# ------------------------------------------------------------------------- protocol 1

def factorized_accuracy(model, setup: TwoTowerSetup, train: pd.DataFrame, test: pd.DataFrame,
                        items: pd.DataFrame) -> Dict[str, float]:
    """TFRS FactorizedTopK accuracies on test ratings, plus a numpy cross-check at 100."""
    history = history_matrix(test, train, setup.history)
    arrays = example_arrays(test, items, history, sampling_probabilities(train, items),
                            setup.hour)
    refresh_index(model, items)
    result = model.evaluate(to_dataset(arrays, 4096, False, 0), return_dict=True, verbose=0)
    out = {k.split("/")[-1].replace("_categorical_accuracy", ""): float(v)
           for k, v in result.items() if k.startswith("factorized_top_k/")}
    # Cross-check: exact top-100 with numpy over the same embeddings (--index ivf: through
    # the IVF index the export would serve, nprobe tuned on training examples' queries).
    item_emb = embed_in_batches(tower_fn(model.candidate_tower), catalog_features(items))
    fields = ("user_id", "history", "query", "device", "hour")
    query_emb = embed_in_batches(tower_fn(model.query_tower), {k: arrays[k] for k in fields},
                                 batch_size=4096)
    sample = train.sample(min(len(train), 1000), random_state=0)
    tune = example_arrays(sample, items, history_matrix(sample, train, setup.history),
                          sampling_probabilities(train, items), setup.hour)
    train_query = embed_in_batches(tower_fn(model.query_tower), {k: tune[k] for k in fields})
    top = retrieve_topk(query_emb, item_emb, items["item_id"].to_numpy(dtype=object), 100,
                        search=index_search(train_query, "training examples"))
    out["numpy_top_100"] = float(np.mean((top == arrays["item_id"][:, None]).any(axis=1)))
    return out


P1_SETUPS = [
    TwoTowerSetup("tfrec two-tower, ids only (the tutorial's information)", content=False,
                  history=0, embedding_dim=32, id_dim=32, hidden=(), temperature=0.1, lr=0.003,
                  epochs=4),
    TwoTowerSetup("tfrec two-tower, + title words/genres", content=True, history=0,
                  embedding_dim=64, id_dim=64, hidden=(128,), temperature=0.2, lr=0.003,
                  epochs=4, id_dropout=0.1),
    TwoTowerSetup("tfrec two-tower, + title/genres + 20 earlier train ratings", content=True,
                  history=20, embedding_dim=64, id_dim=64, hidden=(128,), temperature=0.2,
                  lr=0.003, epochs=8, id_dropout=0.1),
    TwoTowerSetup("tfrec two-tower, + title/genres + 20 earlier ratings read by a GRU",
                  content=True, history=20, embedding_dim=64, id_dim=64, hidden=(128,),
                  temperature=0.2, lr=0.003, epochs=8, id_dropout=0.1, encoder="gru"),
    TwoTowerSetup("tfrec two-tower, + title/genres + 20 earlier ratings, transformer",
                  content=True, history=20, embedding_dim=64, id_dim=64, hidden=(128,),
                  temperature=0.2, lr=0.003, epochs=8, id_dropout=0.1, encoder="transformer"),
]


def _spread(values: Sequence[float]) -> str:
    """"mean" for one value, "mean (min-max)" over seeds."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ({min(values):.3f}-{max(values):.3f})"


def protocol_1(ml: MovieLens, setups: Sequence[TwoTowerSetup], tune: bool, seeds: int = 1,
               print_fn=print, tutorial_epochs: int = 3) -> List[Tuple]:
    # 80,000 / 20,000 of the 100k ratings (80% of a --ratings slice); --tune holds out
    # 10,000 of the 80,000 (an eighth of the training ratings).
    train, test = tutorial_split(ml.ratings, seed=42, train_size=len(ml.ratings) * 4 // 5)
    if tune:  # validation split from the training ratings only
        train, test = tutorial_split(train, seed=7, train_size=len(train) - len(train) // 8)
        print_fn(f"[tune] validation split of train: {len(train)} / {len(test)}")
    rows: List[Tuple] = [(name, f"{v:.2f}", "", "", "") for name, v in PUBLISHED_P1]
    start = time.perf_counter()
    acc = run_tfrs_tutorial(train, test, ml, epochs=tutorial_epochs)
    rows.append(("TFRS tutorial model, re-run on this split", f"{acc:.4f}", "", "",
                 f"{time.perf_counter() - start:.0f}"))
    print_fn(f"  tutorial re-run: top-100 {acc:.4f}", flush=True)
    # Popularity through the same metric: the 100 most rated training movies for everyone.
    counts = PopularityBaseline().fit(ratings_to_events(train, purchase_min_rating=99))
    top = np.asarray(counts.recommend(["anyone"], 100)[0], dtype=object)
    rated = test["item_id"].to_numpy(dtype=object)
    rows.append(("tfrec popularity baseline (100 most rated in train)",
                 f"{np.isin(rated, top).mean():.4f}", "",
                 f"{np.isin(rated, top[:10]).mean():.4f}", "0"))
    for setup in setups:
        results, start = [], time.perf_counter()
        for seed in range(setup.seed, setup.seed + seeds):
            run = dataclasses.replace(setup, seed=seed)
            items = item_table(ml, run.content)
            model = train_two_tower(run, train, items, factorized_ks=(1, 10, 50, 100))
            results.append(factorized_accuracy(model, run, train, test, items))
            print_fn(f"  {setup.name} (seed {seed}): {results[-1]}", flush=True)
        seconds = (time.perf_counter() - start) / seeds
        rows.append((setup.name, _spread([r["top_100"] for r in results]),
                     _spread([r["numpy_top_100"] for r in results]),
                     _spread([r["top_10"] for r in results]), f"{seconds:.0f}"))
    return rows


# ------------------------------------------------------------------------- protocol 2

def ms_metrics(recommended: np.ndarray, relevant: List[List[str]]) -> Dict[str, float]:
    """Microsoft Recommenders' four ranking metrics at k=10 (+ MAP@10 ÷ min(|rel|, 10))."""
    m = evaluate_topk(recommended, relevant, ks=(10,))
    return {"map": map_at_k(recommended, relevant, 10, normalization="relevant"),
            "ndcg@10": m["ndcg@10"], "precision@10": m["precision@10"],
            "recall@10": m["recall@10"], "map@10": m["map@10"], "users": m["users"]}


def two_tower_top10(model, setup: TwoTowerSetup, train: pd.DataFrame, users: np.ndarray,
                    items: pd.DataFrame, k: int = 10) -> np.ndarray:
    queries = pd.DataFrame({"user_id": users, "ts": LATEST_TS})
    n = len(users)
    if setup.history_mode == "profile":  # average the query over a few profile samples
        samples = [profile_history(queries, train, setup.history, seed=1000 + i,
                                   exclude_target=False) for i in range(PROFILE_SAMPLES)]
    else:
        samples = [history_matrix(queries, train, setup.history)]
    query_emb = 0.0
    for history in samples:
        query = {"user_id": users.astype(object), "history": history,
                 "query": np.full(n, "", dtype=object), "device": np.full(n, "", dtype=object),
                 "hour": np.zeros(n, dtype=np.int64)}
        query_emb = query_emb + embed_in_batches(tower_fn(model.query_tower), query,
                                                 batch_size=4096)
    item_emb = embed_in_batches(tower_fn(model.candidate_tower), catalog_features(items))
    seen = train.groupby("user_id")["item_id"].agg(set)
    exclude = [seen.get(u, set()) for u in users]
    # nprobe is tuned on these queries' agreement with exact search: no labels involved.
    return retrieve_topk(query_emb, item_emb, items["item_id"].to_numpy(dtype=object), k,
                         exclude, search=index_search(query_emb, "the queries (unlabelled)"))


P2_SETUPS = [
    TwoTowerSetup("tfrec two-tower, ids only", content=False, history=0, embedding_dim=64,
                  id_dim=64, hidden=(), projection=False, temperature=0.2, lr=0.003,
                  epochs=12),
    TwoTowerSetup("tfrec two-tower, + title/genres + 20 sampled train ratings", content=True,
                  history=20, history_mode="profile", embedding_dim=64, id_dim=64,
                  hidden=(128,), temperature=0.2, lr=0.003, epochs=6, id_dropout=0.1),
]


def protocol_2(ml: MovieLens, setups: Sequence[TwoTowerSetup], tune: bool, seeds: int = 1,
               by: str = "user", print_fn=print) -> List[Tuple]:
    train, test = stratified_split(ml.ratings, 0.75, by=by, seed=42)
    if tune:
        train, test = stratified_split(train, 0.8, by=by, seed=7)
        print_fn(f"[tune] validation split of train: {len(train)} / {len(test)}")
    users = np.asarray(sorted(test["user_id"].unique(), key=int), dtype=object)
    relevant = targets_by_user(test, users)
    seen = {u: set(s) for u, s in train.groupby("user_id")["item_id"]}
    rows: List[Tuple] = [(name + " (published)", *(f"{v:.4f}" for v in vals), "", "")
                         for name, *vals in PUBLISHED_P2]
    keys = ("map", "ndcg@10", "precision@10", "recall@10", "map@10")

    def add(name: str, runs: List[np.ndarray], seconds: float) -> None:
        metrics = [ms_metrics(np.asarray(recs, dtype=object), relevant) for recs in runs]
        print_fn(f"  {name}: {metrics} ({seconds:.0f}s)", flush=True)
        rows.append((name, *(_spread([m[key] for m in metrics]) for key in keys),
                     f"{seconds:.0f}"))

    events = ratings_to_events(train, purchase_min_rating=99)  # every rating = one click
    start = time.perf_counter()
    popularity = PopularityBaseline().fit(events)
    add("tfrec popularity baseline", [popularity.recommend(list(users), 10, exclude=seen)],
        time.perf_counter() - start)
    start = time.perf_counter()
    cooc = CooccurrenceBaseline(similarity="jaccard", max_neighbors=None,
                                max_items_per_user=None).fit(events)
    add("tfrec co-occurrence baseline (SAR-like, jaccard)",
        [cooc.recommend(list(users), None, 10, exclude=seen)], time.perf_counter() - start)
    for setup in setups:
        runs, start = [], time.perf_counter()
        for seed in range(setup.seed, setup.seed + seeds):
            run = dataclasses.replace(setup, seed=seed)
            items = item_table(ml, run.content)
            model = train_two_tower(run, train, items)
            runs.append(two_tower_top10(model, run, train, users, items))
        add(setup.name, runs, (time.perf_counter() - start) / seeds)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", help="real-data dir (default $TFREC_DATA_DIR or "
                                           "../shared/data)")
    parser.add_argument("--protocol", choices=["1", "2", "both"], default="both")
    parser.add_argument("--tune", action="store_true",
                        help="evaluate on a validation split of the training ratings")
    parser.add_argument("--seeds", type=int, default=2,
                        help="train each tfrec configuration with this many seeds (42, 43, "
                             "...) and print mean (min-max)")
    parser.add_argument("--ratings", type=int, default=0,
                        help="use only the first N ratings of u.data (0: all 100,000)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs of every tfrec setup (0: each setup's tuned epochs)")
    parser.add_argument("--tutorial-epochs", type=int, default=3,
                        help="epochs of the TFRS tutorial model (the tutorial's 3)")
    parser.add_argument("--setups", choices=["all", "first", "last"], default="all",
                        help="tfrec setups per protocol: all, only the first (ids only) or "
                             "only the last (richest)")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of every tfrec setup (e.g. temperature=0.1, "
                             "catalog_negatives=512); repeatable; for tuning with --tune")
    parser.add_argument("--index", choices=["exact", "ivf"], default="exact",
                        help="tfrec retrieval lists (protocol 1's numpy check, protocol 2) "
                             "by exact search or through the IVF index an export builds "
                             "(export.index=ivf, nprobe tuned to recall@100 0.95 vs exact)")
    args = parse_smoke_args(parser, argv, SMOKE)
    INDEX["kind"] = args.index
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if not os.path.isdir(movielens_path(args.data_dir)):
        if args.smoke:
            skip(f"MovieLens 100K not found at {movielens_path(args.data_dir)!r} (pass "
                 "--data-dir or set TFREC_DATA_DIR)")
        print(f"MovieLens 100K not found at {movielens_path(args.data_dir)!r}; pass "
              f"--data-dir or set TFREC_DATA_DIR", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(machine_line(), flush=True)
    ml = load_movielens(args.data_dir)
    if args.ratings:
        ml = dataclasses.replace(ml, ratings=ml.ratings.iloc[:args.ratings].reset_index(
            drop=True))
        print(f"using the first {len(ml.ratings):,} ratings of u.data (--ratings)", flush=True)

    def chosen(setups: Sequence[TwoTowerSetup]) -> List[TwoTowerSetup]:
        setups = list({"all": setups, "first": setups[:1], "last": setups[-1:]}[args.setups])
        if args.epochs:
            setups = [dataclasses.replace(s, epochs=args.epochs) for s in setups]
        return [dataclasses.replace(s, **changes, name=s.name + suffix) for s in setups]

    try:
        changes = setup_overrides(args.override)
    except ValueError as err:
        parser.error(str(err))
    suffix = "".join(f", {k}={v}" for k, v in changes.items())

    if args.protocol in ("1", "both"):
        rows = protocol_1(ml, chosen(P1_SETUPS), args.tune, args.seeds,
                          tutorial_epochs=args.tutorial_epochs)
        print()
        print(format_table(
            ["model", "top-100 acc (TFRS metric)", "numpy check", "top-10 acc", "seconds"], rows,
            title="Protocol 1: TFRS basic retrieval tutorial (random 80/20 of ratings, seed "
                  "42; factorized top-100 accuracy over all 1,682 movies)"))
        print(flush=True)
    if args.protocol in ("2", "both"):
        rows = protocol_2(ml, chosen(P2_SETUPS), args.tune, args.seeds)
        print()
        print(format_table(
            ["model", "MAP", "nDCG@10", "Precision@10", "Recall@10", "MAP@10 (÷min)",
             "seconds"], rows,
            title="Protocol 2: Microsoft Recommenders benchmark (75/25 stratified by user, "
                  "seed 42; top-10 unseen movies; every test rating relevant)"))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
