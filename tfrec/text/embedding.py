"""Sentence embeddings from TF-Hub-format encoders: masked mean pooling + L2 norm.

Sentence-transformers models such as all-MiniLM-L6-v2 were trained with this pooling
(not the [CLS] pooler), so cosine similarity of these vectors is what they rank by.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import tfrec  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text  # noqa: F401  (registers the ops the preprocessor SavedModel uses)

from tfrec.data.io import atomic_write

log = logging.getLogger(__name__)

KEY_DTYPE = "S40"  # hex SHA-1 of a text (ASCII bytes): TextVectorCache keys
PRECISIONS = ("auto", "float32", "bfloat16")
_BF16_OPTION = "auto_mixed_precision_onednn_bfloat16"


def bfloat16_pays() -> bool:
    """True on a CPU-only machine whose cores multiply bfloat16 natively (AMX / AVX512-BF16).

    There oneDNN runs bfloat16 matmuls several times faster than float32; elsewhere the
    conversion would only cost time.
    """
    if tf.config.list_physical_devices("GPU"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    """"auto" -> "bfloat16" where `bfloat16_pays()`, else "float32"; others checked.

    Raises:
      ValueError: `precision` is not one of PRECISIONS.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if bfloat16_pays() else "float32"
    return precision


@contextlib.contextmanager
def bfloat16_rewrite(enabled: bool = True):
    """Functions first called inside run their float32 graphs in bfloat16 (oneDNN rewrite).

    The rewrite is a process-wide graph-optimizer option, so it is switched on only for
    the calls made inside the block: training graphs built later stay float32 (a thread
    that makes its first TF call while the block is open may keep it: TF caches the
    option per thread).
    """
    if not enabled:
        yield
        return
    before = bool(tf.config.optimizer.get_experimental_options().get(_BF16_OPTION, False))
    tf.config.optimizer.set_experimental_options({_BF16_OPTION: True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({_BF16_OPTION: before})


def mean_pool(sequence_output: tf.Tensor, input_mask: tf.Tensor) -> tf.Tensor:
    """Average of the token vectors where `input_mask` is 1: [B, L, H] -> [B, H]."""
    mask = tf.cast(input_mask, sequence_output.dtype)[:, :, tf.newaxis]
    total = tf.reduce_sum(sequence_output * mask, axis=1)
    count = tf.maximum(tf.reduce_sum(mask, axis=1), tf.constant(1e-9, sequence_output.dtype))
    return total / count


def trim_padding(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Drops padding columns beyond the longest row: masked keys make them exact no-ops.

    With batches of similar lengths, a title of 12 tokens no longer pays for 64.
    """
    longest = tf.reduce_max(tf.reduce_sum(inputs["input_mask"], axis=1))
    length = tf.maximum(longest, 2)  # also safe for an empty batch
    return {k: v[:, :length] for k, v in inputs.items()}


def sentence_embeddings(sequence_output: tf.Tensor, input_mask: tf.Tensor) -> tf.Tensor:
    """Masked mean pooling then L2 normalisation (the sentence-transformers recipe)."""
    return tf.math.l2_normalize(mean_pool(sequence_output, input_mask), axis=-1)


Handle = Union[str, Any]  # an export path, or the object hub.load() returned for it


def sentence_embedding_model(encoder: Handle, preprocessor: Handle,
                             seq_length: Optional[int] = None,
                             trainable: bool = False, trim: bool = True) -> tf.keras.Model:
    """Keras model: [B] raw strings -> [B, H] unit-norm sentence embeddings.

    Uses only the TF Hub interface (`tokenize`, `bert_pack_inputs`, the encoder's
    `__call__`), so any TF-Hub-format BERT encoder/preprocessor pair works.

    Args:
      encoder: exported encoder (path or loaded object).
      preprocessor: matching preprocessor (path or loaded object).
      seq_length: packed length (default: the preprocessor's own).
      trainable: fine-tune the encoder weights when the model is trained.
      trim: cut each batch to its longest text (exact; needs an encoder that takes any
        sequence length, as TF-Hub BERT encoders do).
    """
    if seq_length is not None and seq_length < 2:
        raise ValueError(f"seq_length must be >= 2 ([CLS] and [SEP]), got {seq_length}")
    if isinstance(preprocessor, str):
        preprocessor = hub.load(preprocessor)
    sentences = tf.keras.layers.Input(shape=(), dtype=tf.string, name="sentences")
    if seq_length is None:
        inputs = hub.KerasLayer(preprocessor, name="preprocessor")(sentences)
    else:
        tokens = hub.KerasLayer(preprocessor.tokenize, name="tokenize")(sentences)
        inputs = hub.KerasLayer(preprocessor.bert_pack_inputs, name="bert_pack_inputs",
                                arguments={"seq_length": seq_length})([tokens])
    if trim:
        inputs = tf.keras.layers.Lambda(trim_padding, name="trim_padding")(inputs)
    outputs = hub.KerasLayer(encoder, trainable=trainable, name="encoder")(inputs)
    embeddings = tf.keras.layers.Lambda(
        lambda t: sentence_embeddings(t[0], t[1]), name="mean_pool_l2")(
            [outputs["sequence_output"], inputs["input_mask"]])
    return tf.keras.Model(sentences, embeddings, name="sentence_encoder")


class SentenceEncoder:
    """Batches texts through `sentence_embedding_model` in inference mode.

    Texts are batched by token count and each batch is cut to its longest text (`trim`),
    so short titles do not pay for the packed length; `workers` batches run at once (one
    batch's serial ops overlap another's matmuls) and on CPUs with native bfloat16 the
    matmuls run in bfloat16 (`precision`). Rows come back in input order.

    Args:
      encoder: exported encoder (path or loaded object).
      preprocessor: matching preprocessor (path or loaded object).
      seq_length: packed length (default: the preprocessor's own).
      batch_size: texts per forward pass.
      trim: batch by length and drop padding columns (False: input order, full length).
      progress_seconds: log texts/s and the time left this often (0: never).
      workers: batches in flight at once.
      precision: "float32", "bfloat16" (cosine to the float32 vector > 0.999) or "auto"
        (`resolve_precision`).

    Raises:
      ValueError: batch_size or workers not positive, or an unknown precision.
    """

    def __init__(self, encoder: Handle, preprocessor: Handle,
                 seq_length: Optional[int] = None, batch_size: int = 64,
                 trim: bool = True, progress_seconds: float = 10.0,
                 workers: int = 2, precision: str = "float32"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        self.batch_size = batch_size
        self.trim = trim
        self.progress_seconds = progress_seconds
        self.workers = workers
        self.precision = resolve_precision(precision)
        if isinstance(preprocessor, str):
            preprocessor = hub.load(preprocessor)
        self.model = sentence_embedding_model(encoder, preprocessor, seq_length,
                                              trim=trim and seq_length is not None)
        self._embed = tf.function(
            lambda s: self.model(s, training=False),
            input_signature=[tf.TensorSpec([None], tf.string)])

        def tokens(s: tf.Tensor) -> tf.Tensor:
            packed = (preprocessor(s) if seq_length is None else
                      preprocessor.bert_pack_inputs([preprocessor.tokenize(s)],
                                                    seq_length=seq_length))
            return tf.reduce_sum(tf.cast(packed["input_mask"], tf.int32), axis=1)

        self._tokens = tf.function(tokens, input_signature=[tf.TensorSpec([None], tf.string)])

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.model.output_shape[-1])

    def token_counts(self, texts: Sequence[str], chunk: int = 8192) -> np.ndarray:
        """Packed tokens of each text ([CLS] and [SEP] included): what a batch pays for."""
        counts = [self._tokens(tf.constant(list(texts[i:i + chunk]), tf.string)).numpy()
                  for i in range(0, len(texts), chunk)]
        return np.concatenate(counts) if counts else np.zeros([0], np.int32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, H] float32 unit vectors (rows in input order)."""
        texts = [str(t) for t in texts]
        vectors = np.zeros([len(texts), self.dim], np.float32)
        order = (np.argsort(self.token_counts(texts), kind="stable") if self.trim
                 else np.arange(len(texts)))
        batches = [order[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        start = last = time.perf_counter()
        done = 0
        with bfloat16_rewrite(self.precision == "bfloat16"), \
                concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            # Results come back in batch order; `workers` run at a time.
            results = pool.map(
                lambda rows: self._embed(tf.constant([texts[r] for r in rows])).numpy(),
                batches)
            for rows, batch in zip(batches, results):
                vectors[rows] = batch
                done += len(rows)
                now = time.perf_counter()
                if self.progress_seconds and now - last >= self.progress_seconds:
                    last, rate = now, done / (now - start)
                    log.info("embedded %d/%d texts (%.0f/s, %.0fs left)", done, len(texts),
                             rate, (len(texts) - done) / rate)
        return vectors

    def throughput(self, texts: Sequence[str], repeats: int = 3) -> Dict[str, float]:
        """Sentences per second over `texts` (best of `repeats`, after one warm-up pass)."""
        self.encode(texts[:self.batch_size])
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            self.encode(texts)
            best = min(best, time.perf_counter() - start)
        return {"sentences": len(texts), "seconds": best,
                "sentences_per_second": len(texts) / best}


class TextVectorCache:
    """Vectors of texts on disk, one row per distinct text (keyed by a content hash).

    A catalog that gains or edits a few products re-embeds only those: every other
    text's vector is read back. New vectors go to a new shard file, written every `chunk`
    texts, so a re-index writes only what it embedded and an interrupted pass over a
    million titles keeps what it finished. One cache directory serves one encoder setting
    (`key`).

    Args:
      directory: where the cache lives (created when first written).
      key: what the vectors depend on besides the text (encoder path, length, ...).
      chunk: texts embedded (and written as one shard) at a time.
      max_shards: above this many shards, a call merges them into one.
    """

    def __init__(self, directory: str, key: str, chunk: int = 65536, max_shards: int = 32):
        if chunk < 1 or max_shards < 1:
            raise ValueError(f"chunk and max_shards must be >= 1, got {chunk}, {max_shards}")
        self.directory = directory
        self.prefix = os.path.join(directory, "text_vectors_" + hashlib.sha1(
            key.encode("utf-8")).hexdigest()[:16])
        self.chunk, self.max_shards = int(chunk), int(max_shards)
        self.embedded = 0  # texts the last `vectors` call had to embed

    @staticmethod
    def text_key(text: str) -> bytes:
        return hashlib.sha1(text.encode("utf-8")).hexdigest().encode("ascii")

    def _shard_names(self) -> List[str]:
        """Shard prefixes, oldest first (the single-file layout of older caches first)."""
        names = [p[:-len(".keys.npy")] for p in glob.glob(glob.escape(self.prefix)
                                                           + ".*.keys.npy")]
        legacy = [self.prefix] if os.path.exists(self.prefix + ".keys.npy") else []
        return legacy + sorted(names)

    def _load(self) -> List[Tuple[str, np.ndarray, np.ndarray]]:
        """[(shard, keys, vectors)]; shards half-written or merged away meanwhile are skipped."""
        shards = []
        for name in self._shard_names():
            try:  # plain arrays: no pickle from a cache dir
                keys = np.load(name + ".keys.npy").astype(KEY_DTYPE)
                vectors = np.load(name + ".vectors.npy", mmap_mode="r")
            except (FileNotFoundError, ValueError) as e:
                log.warning("text-vector cache: skipping shard %s (%s)", name, e)
                continue
            if len(keys) != len(vectors):
                log.warning("text-vector cache: skipping shard %s (%d keys, %d vectors)",
                            name, len(keys), len(vectors))
                continue
            shards.append((name, keys, vectors))
        return shards

    def _write(self, keys: np.ndarray, vectors: np.ndarray) -> str:
        """Writes one shard; vectors first, so keys never index rows that are not there."""
        os.makedirs(self.directory, exist_ok=True)
        name = f"{self.prefix}.{time.time_ns():020d}-{os.getpid()}"
        atomic_write(name + ".vectors.npy", lambda p: _save(p, vectors))
        atomic_write(name + ".keys.npy", lambda p: _save(p, keys.astype(KEY_DTYPE)))
        return name

    def vectors(self, texts: Sequence[str],
                embed: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        """[N, H] vectors of `texts`; `embed` is called on the texts the cache lacks.

        Args:
          texts: the texts, in the order wanted.
          embed: texts -> [n, H] vectors (e.g. `SentenceEncoder.encode`).
        """
        texts = [str(t) for t in texts]
        wanted = np.array([self.text_key(t) for t in texts], KEY_DTYPE)
        shards = self._load()
        blocks = [vectors for _, _, vectors in shards]
        # Every stored key as (block, row), sorted by key; the oldest copy of a key wins.
        keys = np.concatenate([k for _, k, _ in shards] + [np.zeros([0], KEY_DTYPE)])
        block = np.repeat(np.arange(len(shards)), [len(k) for _, k, _ in shards])
        row = np.concatenate([np.arange(len(k)) for _, k, _ in shards] + [np.zeros([0], int)])
        keys, first = np.unique(keys, return_index=True)
        block, row = block[first], row[first]
        pos = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
        found = (keys[pos] == wanted) if len(keys) else np.zeros(len(wanted), bool)
        unfound = np.flatnonzero(~found)
        new_keys, new_first = np.unique(wanted[unfound], return_index=True)
        order = np.argsort(new_first)  # sorted new key -> position in `missing`
        missing = new_keys[order]  # in the order first asked for
        missing_texts = [texts[i] for i in unfound[new_first[order]]]
        self.embedded = len(missing)
        for start in range(0, len(missing), self.chunk):
            fresh = np.asarray(embed(missing_texts[start:start + self.chunk]), np.float32)
            self._write(missing[start:start + self.chunk], fresh)
            blocks.append(fresh)
        located_block = np.where(found, block[pos] if len(keys) else 0, 0)
        located_row = np.where(found, row[pos] if len(keys) else 0, 0)
        if len(missing):
            index = np.searchsorted(new_keys, wanted[unfound])  # into the sorted new keys
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            position = rank[index]
            located_block[unfound] = len(shards) + position // self.chunk
            located_row[unfound] = position % self.chunk
        if not blocks:
            return np.zeros([len(texts), 0], np.float32)
        out = np.empty([len(texts), blocks[0].shape[1]], np.float32)
        for b in np.unique(located_block):
            rows = np.flatnonzero(located_block == b)
            out[rows] = blocks[b][located_row[rows]]  # reads only these rows
        if len(shards) + -(-len(missing) // self.chunk) > self.max_shards:
            self._merge()
        return out

    def _merge(self) -> None:
        """Rewrites every shard as one (distinct keys), then removes the old files."""
        shards = self._load()
        if len(shards) < 2:
            return
        keys = np.concatenate([k for _, k, _ in shards])
        keep = np.sort(np.unique(keys, return_index=True)[1])
        vectors = np.concatenate([np.asarray(v) for _, _, v in shards])[keep]
        self._write(keys[keep], vectors)
        for name, _, _ in shards:
            for suffix in (".keys.npy", ".vectors.npy"):
                try:
                    os.remove(name + suffix)
                except FileNotFoundError:  # another process merged it first
                    pass


def _save(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
        np.save(f, array, allow_pickle=False)


def cached_sentence_vectors(texts: Sequence[str], encoder: str, preprocessor: str,
                            seq_length: int, batch_size: int = 128,
                            cache_dir: Optional[str] = None, what: str = "texts",
                            precision: str = "auto") -> np.ndarray:
    """Frozen sentence embeddings [N, H] of `texts`, cached on disk per text.

    Frozen vectors depend only on the text and the encoder setting, so each text is
    embedded once and shared by runs; a catalog with a few new or edited titles embeds
    only those (`TextVectorCache`). The encoder is loaded only when some text is missing.

    Args:
      texts: the texts, in the order wanted.
      encoder, preprocessor: TF-Hub-format encoder and preprocessor paths.
      seq_length: tokens per text.
      batch_size: texts per forward pass.
      cache_dir: cache directory (None: embed everything, keep nothing).
      what: what the texts are, in the log lines ("titles").
      precision: the encoder's matmuls (`SentenceEncoder`); bfloat16 vectors are cached
        apart from float32 ones.
    """
    texts = [str(t) for t in texts]
    precision = resolve_precision(precision)
    loaded: List[SentenceEncoder] = []

    def embed(batch: Sequence[str]) -> np.ndarray:
        if not loaded:
            loaded.append(SentenceEncoder(encoder, preprocessor, seq_length=seq_length,
                                          batch_size=batch_size, precision=precision))
        log.info("embedding %d %s with %s (%s)", len(batch), what, encoder, precision)
        return loaded[0].encode(batch)

    if not cache_dir:
        return embed(texts)
    setting = f"{os.path.abspath(encoder)}\n{seq_length}"
    cache = TextVectorCache(cache_dir, setting if precision == "float32"
                            else f"{setting}\n{precision}")
    vectors = cache.vectors(texts, embed)
    log.info("%s vectors: %d of %d %s embedded, the rest read from %s", what, cache.embedded,
             len(texts), what, cache_dir)
    return vectors
