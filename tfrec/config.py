"""One config object drives a run: data, model, training, export and serving.

Dataclasses keep defaults and types in one place; YAML files and CLI flags only
override fields, so every run can be reproduced from its saved `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml


@dataclass
class DataConfig:
    """Where the raw tables live and how they become training examples."""

    data_dir: str = "work/data"  # catalog/users/events tables
    tfrecord_dir: str = "work/tfrecords"
    world: str = "small"  # synthetic world preset used by `generate`/`demo`
    lang: str = "en"  # language of the synthetic world's text: en or zh
    seed: int = 42
    val_fraction: float = 0.1  # of the time range, the period before test
    test_fraction: float = 0.1  # of the time range, the last period
    history_length: int = 20
    num_shards: int = 4
    # Only the last N days of the training period become training examples (None: all);
    # with train.warm_start, the recent window a refreshed model trains on.
    train_days: Optional[float] = None
    # Preparation engine: "pandas" (one process, in memory) or "beam" (Apache Beam, the
    # same records; `beam_args` are its pipeline options, e.g. ["--runner=FlinkRunner"]).
    engine: str = "pandas"
    beam_args: Tuple[str, ...] = ()
    # Share of bad rows a table may have: they are set aside and counted by reason
    # (`tfrec prepare --dead-letter` keeps them); 0 stops at the first bad row.
    max_bad_share: float = 0.0
    vocab_min_count: int = 1  # user / item ids with fewer training examples share OOV
    # Replace user ids by a keyed hash (HMAC) as the tables are read, so nothing tfrec
    # writes holds a raw id; the secret comes from $TFREC_PSEUDONYM_KEY or this file
    # (tfrec.data.pseudonym) and is never written.
    pseudonymize_users: bool = False
    pseudonym_key_file: str = ""


@dataclass
class FeaturesConfig:
    """Extra catalog columns as model features, and embedding sizes of the built-in ones.

    Columns named here flow into the candidate tower, the ranker's catalog lookup, the
    export signatures and evaluation (see `tfrec.data.feature_spec`).
    """

    item_categorical: Tuple[str, ...] = ()  # e.g. (color, material): embedded
    item_numeric: Tuple[str, ...] = ()  # e.g. (rating,): standardised
    attribute_dim: int = 8  # embedding size of each extra categorical column
    category_dim: int = 16
    department_dim: int = 8  # first level of the category path
    brand_dim: int = 16
    device_dim: int = 8
    hour_dim: int = 8
    price_dim: int = 8


@dataclass
class ModelConfig:
    """Two-tower retrieval model hyper-parameters."""

    embedding_dim: int = 64
    id_embedding_dim: int = 64
    text_embedding_dim: int = 64
    hidden_units: Tuple[int, ...] = (128,)
    # False: each tower's vector is its id embedding itself, no output Dense (ids-only
    # towers: query_features [user_id], candidate_features [item_id], hidden_units [],
    # id_embedding_dim = embedding_dim). Choose on validation: on MovieLens protocol 2 the
    # Dense over free id embeddings cost nDCG@10 (bench/README); elsewhere it helped.
    projection: bool = True
    # Built-in inputs each tower reads; () = all of them: query user_id, history, query,
    # device, hour; candidate item_id, title, category, brand, price. Serving signatures
    # keep every input either way. E.g. [user_id] / [item_id]: an ids-only model.
    query_features: Tuple[str, ...] = ()
    candidate_features: Tuple[str, ...] = ()
    text_max_tokens: int = 20000
    text_max_length: int = 32
    char_ngram_bins: int = 20000  # hashed character trigrams: robust to typos
    user_hash_bins: int = 0  # >0: hash user ids instead of a vocabulary (open sets)
    temperature: float = 0.1
    logq_correction: bool = True
    num_hard_negatives: Optional[int] = None
    remove_accidental_hits: bool = True
    # > 0: each training step also scores this many items drawn uniformly from the
    # catalog beside the in-batch ones (mixed negatives): in-batch negatives are the
    # popular items, while serving ranks against the whole catalog, tail included.
    catalog_negatives: int = 256
    id_dropout: float = 0.2  # drop item/user ids so content features carry cold start
    # How the query tower reads the recent items: "pooled" (recency-weighted mean),
    # "transformer" (causal self-attention over item, category, brand and position) or
    # "gru". The sequence models read up to history_max_length items (data.history_length
    # sets how many the examples carry).
    history_encoder: str = "pooled"
    history_dim: int = 64
    history_layers: int = 1
    history_heads: int = 2
    history_dropout: float = 0.1
    history_readout: str = "last"  # transformer: "last" (most recent position) | "attention"
    history_max_length: int = 200
    # > 0: SASRec-style auxiliary loss (transformer/gru): every history position predicts
    # the item after it, weighted by this against the retrieval loss (training only).
    history_next_item_weight: float = 0.0
    # Frozen BERT title embeddings in the candidate tower: a TF-Hub encoder handle ("":
    # off) and its preprocessor. Each title is embedded once (cached per title under
    # title_vector_cache) and stored in the model; export embeds the catalog it is given.
    title_encoder: str = ""
    title_preprocessor: str = "work/text/minilm/preprocessor"
    title_vector_dim: int = 64  # trained projection of the stored vectors
    title_vector_length: int = 48  # BERT tokens per title
    # Encoder matmuls while embedding titles: auto (bfloat16 on CPUs that multiply it
    # natively, else float32) | float32 | bfloat16 (cosine to float32 > 0.999).
    title_vector_precision: str = "auto"
    title_vector_cache: str = "work/text/title_vectors"
    title_vector_width: int = 0  # set by training from the encoder (saved with the run)
    price_buckets: int = 20
    # TFRS FactorizedTopK metrics (per-example top-k accuracy over the catalog) computed in
    # evaluation/validation; () disables them (they cost a catalog pass per evaluation).
    factorized_topk_ks: Tuple[int, ...] = ()


@dataclass
class RankingConfig:
    """Ranker hyper-parameters (lists of shown items, multi-task heads)."""

    list_size: int = 10
    id_embedding_dim: int = 8  # small: ~2k lists per period, ids overfit easily
    text_embedding_dim: int = 32
    cross_layers: int = 2  # DCN-v2 cross layers
    deep_units: Tuple[int, ...] = (128, 64)
    loss: str = "softmax"  # pointwise|pairwise|softmax|list_mle
    click_weight: float = 1.0
    purchase_weight: float = 3.0  # purchases are rarer and worth more: weight them up
    position_debias: bool = True  # shallow position tower on the click logit, training only
    # DIN-style target attention: each candidate pools the history's items (id, category,
    # brand) with weights from its match to them, a piece of its own beside the pooled
    # history (tfrec.models.target_attention).
    target_attention: bool = False
    id_dropout: float = 0.5  # ranker: rely on features that generalise across users
    relevance_weight: float = 0.0  # graded relevance head (labels where they exist)
    # Text of query and candidate: "bow" (words + char trigrams, fast, no encoder), "fast"
    # (BERT item embeddings stored in the model, query encoded once per request) or
    # "cross" (BERT over each (query, title) pair).
    text_mode: str = "bow"
    text_encoder: str = "work/text/minilm/encoder"  # TF-Hub handle: local path or hub URL
    text_preprocessor: str = "work/text/minilm/preprocessor"
    text_trainable: bool = False  # fine-tune the encoder
    text_top_layers: int = 0  # PEFT: with text_trainable, train only the last N layers
    use_retrieval_score: bool = True  # the two-tower score of each candidate is a feature
    retrieval_score_scale: float = 10.0  # initial weight of that score (1 / temperature)
    candidates: int = 100  # retrieval top-K the ranker re-orders (training lists, pipeline)
    # The shopper's history items in search results: "keep" (people re-buy what they
    # search for) or "exclude". One choice for training lists, evaluation and the
    # pipeline's search signature (export.search_history overrides it at export only).
    search_history: str = "keep"
    list_cuts: int = 1  # cut times in the validation period that freeze users for lists
    max_candidates: int = 500  # larger candidate lists are rejected at serving
    eval_ks: Tuple[int, ...] = (10,)
    epochs: int = 5
    # Epochs without a better validation NDCG before the ranker stops (None: train them
    # all; the best epoch is kept either way). Its first epochs barely move it, so
    # patience 2 could stop it before it learned anything (bench/README.md, Ranking).
    patience: Optional[int] = None
    batch_size: int = 128
    learning_rate: float = 0.0005
    # adam | lazy_adam (embedding rows updated only when a batch touches them, so the step
    # does not grow with the catalog; same NDCG@10 as adam, paired, 3 seeds) | adagrad | sgd.
    optimizer: str = "adam"
    # A fine-tuned BERT encoder (text_trainable) gets its own Adam (None: learning_rate
    # for everything); 5e-5 beat one rate for the fast ranker on Home Depot and synthetic.
    encoder_learning_rate: Optional[float] = 5e-5
    encoder_schedule: str = "constant"  # constant|warmup_linear (BERT's warm-up + decay)
    encoder_warmup: float = 0.1  # share of the ranker's steps spent warming up
    # Distillation from a teacher ranker (`tfrec train-ranker --teacher RUN`): a listwise
    # KL from the teacher's scores on the same lists, added with this weight to the
    # label losses (it carries what the teacher learned beyond the few labels per list).
    distill_weight: float = 1.0
    # > 1 softens both score lists. 5 was best on the validation lists of the small world
    # (3 seeds, bench/compression.py): NDCG@10 0.3078 vs 0.3029 at T=1, 0.3047 undistilled.
    distill_temperature: float = 5.0


@dataclass
class DPConfig:
    """DP-SGD of retrieval training (`train.dp`): per-example clipping + Gaussian noise.

    Give noise_multiplier, or target_epsilon (the multiplier that reaches it over the
    planned steps is computed with dp-accounting).
    """

    noise_multiplier: Optional[float] = None  # noise std / l2_clip (0: no privacy)
    target_epsilon: Optional[float] = None
    l2_clip: float = 1.0  # bound on each example's gradient norm
    delta: float = 1e-5  # keep below 1 / training examples
    # Catalog items sampled uniformly per step as every example's negatives (step cost
    # grows linearly with it: the per-example gradients run through them).
    num_negatives: int = 64
    # Examples per vectorised per-example-gradient pass (memory ~ chunk * num_negatives).
    chunk: int = 16


@dataclass
class TrainConfig:
    """Optimisation, distribution, checkpointing and logging."""

    strategy: str = "default"  # default|one_device|mirrored|multi_worker|parameter_server|tpu
    tpu: Optional[str] = None
    # parameter_server: variables are split across PS tasks in shards of at least this
    # many bytes (MinSizePartitioner), so only large tables (ids, text) get sharded.
    ps_min_shard_bytes: int = 256 << 10
    cpu_devices: int = 0  # >1 splits the CPU into logical devices (tests of Mirrored)
    batch_size: int = 512
    epochs: int = 8
    steps_per_epoch: Optional[int] = None
    # Training steps per call into the graph (Keras steps_per_execution). One call per
    # step costs ~1 ms of dispatch, as much as a small model's step, but a multi-step
    # call takes 0.5-2 s longer to trace: 16 pays off from a few thousand steps per run
    # (1.2x-1.4x ids-only examples/s), and made a 4-epoch small-world run 1.2x slower.
    # One replica only (distributed strategies and profiled runs use 1).
    steps_per_execution: int = 1
    # Preprocessed training examples (integer ids, token ids, trigram buckets) stay in
    # memory after the first epoch when they fit in this many MB (estimated at 2 KB per
    # example), so later epochs skip all string work; 0 re-reads the TFRecords each epoch.
    input_cache_mb: int = 2048
    learning_rate: float = 0.002
    # lazy_adam: embedding rows updated only when a batch touches them (step cost follows
    # the batch, not the catalog); adam, adagrad, sgd also accepted.
    optimizer: str = "lazy_adam"
    early_stopping_patience: int = 2
    early_stopping_metric: str = "recall_at_100"
    eval_ks: Tuple[int, ...] = (10, 100)
    eval_max_users: int = 2000  # cap per-epoch validation cost
    # (first, last) training steps traced into TensorBoard's profile (trace viewer); () off.
    profile_steps: Tuple[int, ...] = ()
    run_name: Optional[str] = None
    log_dir: str = "tensorboard_logs"
    checkpoint_dir: str = "work/checkpoints"
    # Weight histograms every N epochs (`training.histograms`: a bounded sample of each); 0: off.
    histogram_freq: int = 1
    deterministic: bool = False
    seed: int = 42
    mixed_precision: str = "auto"  # auto: mixed_float16 only when a GPU is present
    # Run name or directory whose weights start this run (vocabularies grow; fresh
    # optimizer): `tfrec train --warm-start RUN`.
    warm_start: Optional[str] = None
    # DP-SGD (a mapping of DPConfig fields, e.g. {noise_multiplier: 1.1}); null: off.
    dp: Optional[DPConfig] = field(default=None, metadata={"nested": DPConfig})


# Storage choices of exported catalog-sized tables (tfrec.features.quantize reads them).
EXPORT_PRECISIONS = ("float32", "bfloat16", "int8")


@dataclass
class ExportConfig:
    """Versioned SavedModel layout: `<base_dir>/<model_name>/<version>/`."""

    base_dir: str = "work/models"
    model_name: str = "retrieval"
    version: Optional[int] = None  # None: next integer after the highest present
    max_per_brand: int = 3  # pipeline business rule: at most this many results per brand
    # Pipeline search signature: "keep" or "exclude" the request's history items;
    # None: what the ranker's training lists did (ranking.search_history).
    search_history: Optional[str] = None
    # Top-k of the retrieval stage: "exact", "ivf" (inverted-file index, core TF ops) or
    # "auto" (ivf from index_min_items up; below that exact search is about as fast).
    index: str = "auto"
    index_min_items: int = 100_000
    nlist: int = 0  # IVF lists; 0: about 4 * sqrt(catalog size)
    # Lists probed per query; 0: the smallest that reaches index_target_recall (recall@100
    # against exact search on validation queries), measured at export.
    nprobe: int = 0
    # Held-out recall@100 loses 0.25-0.43x the share of exact's top-100 the index misses
    # (validation, bench/README.md): 0.98 keeps it within 1% of exact search.
    index_target_recall: float = 0.98
    index_recall_floor: float = 0.9  # export warns below it (and the card says so)
    # Storage of the SavedModels' catalog-sized tables (towers' and ranker's embedding
    # tables of >= 1024 rows, catalog embeddings; retrieval, ranker and pipeline exports):
    # EXPORT_PRECISIONS: "float32", "bfloat16" or "int8" (a float32 scale per row); read
    # back as float32, so the arithmetic is unchanged.
    precision: str = "float32"
    # Pipeline: a reason per returned item ("because you viewed ...", matched query words,
    # brand / category affinity, popularity), measured with the ranker (tfrec.export.reasons).
    reasons: bool = True


@dataclass
class ServeConfig:
    """Embedded gRPC server settings (same API as TensorFlow Serving)."""

    host: str = "127.0.0.1"
    port: int = 8500
    poll_seconds: float = 1.0
    max_workers: int = 8
    experiments: str = ""  # experiments YAML (traffic split); "" serves models only
    request_log: str = ""  # directory of Parquet request logs; "" logs nothing


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def use_workdir(self, workdir: str, logs: bool = False) -> "Config":
        """Puts data, TFRecords, checkpoints and models (and TensorBoard logs with
        `logs`) under `workdir`, as `tfrec --workdir` does."""
        self.data.data_dir = os.path.join(workdir, "data")
        self.data.tfrecord_dir = os.path.join(workdir, "tfrecords")
        self.train.checkpoint_dir = os.path.join(workdir, "checkpoints")
        self.export.base_dir = os.path.join(workdir, "models")
        if logs:
            self.train.log_dir = os.path.join(workdir, "tensorboard_logs")
        return self

    def to_yaml(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(plain(self.to_dict()), f, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "Config":
        cfg = cls()
        cfg.update(raw)
        return cfg

    @classmethod
    def from_yaml(cls, path: str) -> "Config":
        return cls.from_dict(read_yaml_mapping(path, "config file", "sections"))

    def update(self, raw: Dict[str, Any]) -> "Config":
        """Overrides fields from a nested mapping, rejecting unknown names."""
        sections = {f.name for f in dataclasses.fields(self)}
        for section, values in raw.items():
            if section not in sections:
                raise ValueError(
                    f"unknown config section {section!r}; expected one of {sorted(sections)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section {section!r} must be a mapping")
            target = getattr(self, section)
            for key, value in values.items():
                set_field(target, key, value, prefix=section)
        return self

    def override(self, dotted: List[str]) -> "Config":
        """Applies `section.field=value` strings (CLI `--set`), values parsed as YAML."""
        for item in dotted:
            key, value = parse_assignment(item, "section.field=value")
            if "." not in key:
                raise ValueError(f"--set expects section.field=value, got {item!r}")
            section, name = key.split(".", 1)
            for part in reversed(name.split(".")[1:]):  # train.dp.l2_clip: a nested field
                value = {part: value}
            self.update({section: {name.split(".")[0]: value}})
        return self


def parse_assignment(item: str, usage: str, flag: str = "--set") -> Tuple[str, Any]:
    """`key=value` (CLI `flag`) -> (key, value parsed as YAML), or a ValueError."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{flag} expects {usage}, got {item!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {item!r}: the value is not valid YAML ({e})") from e


def read_yaml_mapping(path: str, what: str, holds: str) -> Dict[str, Any]:
    """The mapping in a YAML file ({} if empty); clear errors for missing / invalid files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {path!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path!r} must hold a mapping of {holds}")
    return raw


def set_field(target: Any, key: str, value: Any, prefix: str = "") -> None:
    """Sets one dataclass field with a type check, so typos fail loudly."""
    names = {f.name: f for f in dataclasses.fields(target)}
    if key not in names:
        raise ValueError(f"unknown config field {prefix}.{key}; expected one of {sorted(names)}")
    nested = names[key].metadata.get("nested")
    if nested is not None:  # an optional sub-config: a mapping of its fields, or null
        setattr(target, key, _nested(nested, value, f"{prefix}.{key}", getattr(target, key)))
        return
    default = getattr(target, key)
    if names[key].type in ("float", "Optional[float]"):
        value = _float(value, f"{prefix}.{key}")
    if names[key].type == "Optional[int]" and value is not None and (
            isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"config field {prefix}.{key} must be an integer or null, got {value!r}")
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        value = tuple(value)
    elif isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"config field {prefix}.{key} must be true/false, got {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        raise ValueError(f"config field {prefix}.{key} must be an integer, got {value!r}")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif default is not None and value is not None and not isinstance(value, type(default)):
        raise ValueError(
            f"config field {prefix}.{key} must be {type(default).__name__}, got {value!r}")
    setattr(target, key, value)


def _float(value: Any, name: str) -> Any:
    """Numbers YAML 1.1 reads as strings ("1e-5": no dot) -> float; ints -> float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config field {name} must be a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _nested(cls: type, value: Any, name: str, current: Any = None) -> Any:
    """A mapping (or null, or an instance) -> an instance of the sub-config `cls`; a
    mapping overrides the fields it names of `current` (if set), keeping the others."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"config field {name} must be a mapping of "
                         f"{sorted(f.name for f in dataclasses.fields(cls))} or null, "
                         f"got {value!r}")
    out = dataclasses.replace(current) if isinstance(current, cls) else cls()
    for key, item in value.items():
        set_field(out, key, item, prefix=name)
    return out


def plain(obj: Any) -> Any:
    """Tuples -> lists, recursively: what yaml.safe_dump can write."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
