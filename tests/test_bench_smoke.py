"""Every benchmark script runs end to end in its quick mode (`--smoke`).

Nothing else runs bench/*.py, so a refactor can break one silently (issue 22: a helper
moved to bench/_common.py and serving_latency.py crashed after its gRPC rows). Each test
runs `python bench/<name>.py --smoke` from the repository root in a subprocess, as a
person would: the real script on tiny sizes (see the "Smoke mode" paragraph of each
script's docstring; TensorFlow's graph optimizer is off, see bench/_common.py), no
mocks. It checks the exit status and that the table was printed (its header columns on
one line, and some row labels).

Benches that need real data under ../shared/data (or $TFREC_DATA_DIR) print
"skipped: <reason>" and exit 0 without it; their test is then skipped with that reason.

Marked `bench` (registered in setup.cfg): they run by default, `-m "not bench"` leaves
them out. Each is a fresh TensorFlow process (17-37 s alone: import, tracing, tiny
training and export, some with a model server or cluster processes beside it), much of
it single-threaded, so the selected benches run two at a time (`PARALLEL`) as soon as the
first of these tests asks, and each test waits for its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds per bench, against hangs; compression's ran over 300 s on a loaded machine
PARALLEL = 2  # smoke processes at a time (3 measured slower on 2 cores: 1917 s vs 1805 s)
LONGEST = ("compression", "abtest")  # started first: about 3 and 1 minutes alone on 2 cores

pytestmark = pytest.mark.bench


def row(label: str) -> str:
    """A table row starting with `label` (then the column gap of format_table)."""
    return re.escape(label) + r"\s{2,}\S"


class Expect(NamedTuple):
    headers: Sequence[Tuple[str, ...]]  # each tuple: column names printed on one line
    rows: Sequence[str]  # regular expressions, each matching the start of a table row
    data: bool = False  # needs ../shared/data; may print "skipped: ..."
    forbidden: Sequence[str] = ()  # must not appear in stdout


BENCHES: Dict[str, Expect] = {
    "retrieval_train": Expect(
        [("pipeline", "ex/s median", "vs baseline", "warm-up s")],
        [row("baseline TFRS tutorial (ids)"), row("tfrec (as tfrec train)"),
         row("tfrec input pipeline only")]),
    "step_profile": Expect(
        [("model", "step ms", "vs baseline", "op ms", "embedding lookups", "optimizer")],
        [row("baseline TFRS tutorial (ids)"), row("tfrec"), row("tfrec, ids only")]),
    "serving_latency": Expect(  # the direct row is the one issue 22 crashed on
        [("catalog", "path", "threads", "p50 ms", "errors", "p50 vs ref")],
        [r"1,000 +gRPC +1 +\d", r"1,000 +gRPC +2 +\d", r"1,000 +direct +1 +\d"]),
    "serving_load": Expect(
        [("batching", "log", "clients", "QPS", "reqs/call", "p50 vs 1st", "QPS vs log off")],
        [r"file +off +1 +\d", r"file +off +4 +\d", r"file +on +4 +\d"]),
    "abtest": Expect(
        [("arm", "requests", "CTR", "GMV/user", "GMV/req", "CTR vs retrieval"),
         ("per-user metric", "retrieval", "ranker", "uplift", "95% CI of uplift"),
         ("measure", "retrieval", "ranker", "ranker vs retrieval"),
         ("policy / metric", "estimator", "online", "estimate", "95% CI", "online in CI"),
         ("search arm", "requests", "CTR", "CTR vs retrieval"),
         ("search per-user metric", "uplift", "95% CI of uplift")],
        [row("retrieval"), row("retrieval (exploit only)"), row("ranker"), row("clicks"),
         row("gmv"),
         row("offline ndcg@10 (test period)"), row("online clicks per user"),
         # PBM-IPS rows may be skipped (with a printed reason) in a smoke run's few lists.
         r"ranker clicks_per_request +IPS +\d", r"retrieval exploit clicks_per_request +IPS +\d",
         r"search decision: "]),
    "ranking_latency": Expect(
        [("ranker", "K", "endpoint", "p50 ms", "p99 vs ref")],
        [r"bow +50 +pipeline search +\d", r"bow +50 +ranker +\d"]),
    "ranking_offline": Expect(
        [("order", "ndcg@10 clicks", "ndcg@10 purchases")],
        [row("logged order"), row("popularity"), row("ranker")]),
    "recommendation_rerank": Expect(
        [("seed", "order", "ndcg@10", "recall@100", "purchase_rate@10"),
         ("order", "ndcg@10 (vs retrieval)", "mrr (vs retrieval)"),
         ("variant", "s per epoch", "query batch-1 ms (median)")],
        [r"0 +two_tower +\d", row("two_tower+ranker"), row("two_tower+oracle_ranker"),
         r"0 +oracle \(whole catalog\) +\d", r"default +\d+\.\d +1\.00x"]),
    "large_catalog": Expect(
        [("catalog", "batch", "p50 ms", "queries/s"),
         ("optimizer", "catalog", "ms/step", "vs smallest", "range")],
        [r"1,000 +1 +\d", r"1,000 +32 +\d", r"1,000 \(exported model\) +32 +-",
         r"lazy_adam +1,000 +32 +\d+ +1\.00x +1\.00-1\.00x"]),
    "distributed": Expect(
        [("setup", "cluster", "ex/s median", "vs 1 process")],
        [row("PS: 1 worker + 1 ps")], forbidden=["failed"]),
    "movielens": Expect(
        [("model", "top-100 acc (TFRS metric)", "numpy check"),
         ("model", "MAP", "nDCG@10", "Recall@10")],
        [row("TFRS tutorial model, re-run on this split"),
         row("tfrec popularity baseline"),
         row("tfrec co-occurrence baseline (SAR-like, jaccard)")], data=True),
    "homedepot_search": Expect(
        [("model", "NDCG@10", "Recall@100", "MRR", "ms/query")],
        [row("BM25, plain terms, as typed"), row("BM25, as typed"),
         row("BM25 + speller, no compounds"), row("BM25 + speller"),
         row("MiniLM zero-shot"), row("two-tower+ranker")], data=True),
    "open_catalog": Expect(  # Home Depot slice, or the synthetic world's judgments
        [("queries", "model", "NDCG@10", "Recall@100", "MRR", "NDCG vs BM25")],
        [r"unseen +BM25 +\d", r"unseen +two-tower\+ranker +\d", r"all +hybrid +\d"]),
    "privacy": Expect(
        [("run", "epsilon", "noise", "test recall@100", "vs non-private", "step ms")],
        [row("non-private"), r"eps=8 +8\.00 +\d"]),
    "warm_start": Expect(
        [("run", "steps/epoch", "val recall@100 per epoch", "steps to target")],
        [row("scratch"), row("warm"), r"warm, last \d+ days +\d"]),
    "ann_retrieval": Expect(
        [("catalog", "index", "recall@100", "b1 p50 ms", "vs exact", "build s"),
         ("catalog", "signature", "b1 p50 ms", "b32 p99 ms", "vs exact")],
        [r"2,000 trained +exact +1\.000", r"2,000 trained +ivf nprobe=8 +\d",
         r"2,000 random +ivf nprobe=1 +\d", r"2,000 +exact serving_default +\d",
         r"2,000 +ivf recommend_nprobe nprobe=8 +\d"]),
    "compression": Expect(
        [("variant", "ndcg@10", "vs SavedModel", "top-10 overlap", "size MB", "p50 ms",
          "p50 vs SavedModel"),
         ("pipeline (ranker)", "val ndcg@10", "test ndcg@10", "kept ranker gain",
          "ranker weights trained", "p50 vs teacher")],
        [row("SavedModel float32"), row("SavedModel int8"), row("TFLite float32"),
         row("TFLite int8"), row("teacher float32"), row("student, distilled T=5"),
         # Home Depot tables (or their skip line without the file)
         r"(LoRA r=4 \(query, value\)\s{2,}\S|search table skipped)",
         r"(top-1 blocks\s{2,}\S|search table skipped)",
         r"(student, word bag\s{2,}\S|distillation table skipped)",
         r"(student, word bag int8\s{2,}\S|distillation table skipped)"]),
    "explanations": Expect(
        [("seed", "cited by", "pairs", "share", "cited drop", "other drop"),
         ("seed", "K", "without", "with reasons", "ratio")],
        [r"0 +reason \(leave-one-out\) +\d", r"0 +most recent item +\d",
         r"0 +matched query word +\d", r"0 +100 +\d"]),
    "catalog_index": Expect(
        [("catalog", "dense top-k", "index s", "products/s", "peak MB", "export MB",
          "own title top-10")],
        [r"300 +exact +\d"]),
    "prepare": Expect(
        [("world", "engine", "wall s", "time vs pandas", "all procs peak MB",
          "MB per 1M events", "disk peak MB", "same as pandas")],
        [r"tiny \(0\.03M events\) +pandas +\d.* yes$",
         r"tiny \(0\.03M events\) +Beam, memory shuffle +\d.* yes$",
         r"tiny \(0\.03M events\) +Beam, disk shuffle +\d.* yes$"]),
    "retrieval_topk": Expect(
        [("items", "users", "numpy s", "tfrec s", "tfrec speed-up", "same ids")],
        [r"2,000 +64 +\d", r"20,000 +64 +\d"]),
    "weight_histograms": Expect(
        [("item table", "keras s", "tfrec s", "tfrec vs keras", "keras RSS growth MB")],
        [r"1,000 x 64 +\d", r"20,000 x 64 +\d"]),
    "title_embedding": Expect(
        [("batching", "embedded", "titles/s", "vs before")],
        [row("padded (before)"), row("trimmed, by tokens"), row("+ 2 batches in flight"),
         r"\+ (bfloat16|float32) \(after\) +\d", row("re-index, 1% changed")]),
    "text_tokenize": Expect(
        [("texts", "n", "ascii us/text", "unicode us/text", "vs ascii")],
        [r"synthetic titles \(en\), batch 1 +\d", r"synthetic titles \(zh\), batch 4096 +\d",
         r"synthetic titles \(zh\), python lists +\d"]),
    "speller": Expect(
        [("queries", "n", "changed", "metric", "plain", "speller", "vs plain")],
        [r"tiny world \(en\), typo +\d", r"tiny world \(zh\), clean +\d",
         r"tiny world \(zh\), one homophone slip +\d",
         r"corrections of one query .*: [\d.]+ ms"]),
    "query_category": Expect(
        [("search ranker", "NDCG@10", "vs off", "R@100", "val NDCG@10", "val vs off")],
        [r"tiny world \(en\), no category +\d", r"tiny world \(en\), query category +\d"]),
    "search_relevance": Expect(
        [("method", "test NDCG@10", "vs BM25", "val NDCG@10")],
        [row("BM25"), row("MiniLM zero-shot cosine"), row("MiniLM fast, fine-tuned"),
         row("MiniLM cross-encoder, fine-tuned")], data=True),
}


def run_smoke(name: str) -> subprocess.CompletedProcess:
    """`python bench/<name>.py --smoke` from the repository root; kills its process group
    (server and worker processes included) when it overruns TIMEOUT."""
    proc = subprocess.Popen([sys.executable, os.path.join("bench", f"{name}.py"), "--smoke"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"bench/{name}.py --smoke ran over {TIMEOUT}s\n--- stdout:\n{out[-3000:]}"
                    f"\n--- stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def smoke_runs(request) -> Iterator[Dict[str, Future]]:
    """Starts every selected bench's smoke run, PARALLEL at a time: LONGEST first, then in
    test order."""
    names = [item.callspec.params["name"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_bench_smoke"]
    names.sort(key=lambda name: name not in LONGEST)  # so no slot idles at the end
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    yield {name: pool.submit(run_smoke, name) for name in names}
    pool.shutdown(wait=True, cancel_futures=True)  # e.g. after -x stopped the session


def test_every_bench_has_a_smoke_test():
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "bench"))
               if f.endswith(".py") and not f.startswith("_")}
    assert scripts == set(BENCHES)


def test_work_dir_keeps_the_given_one_and_removes_its_own_at_exit(tmp_path):
    """bench/_common.work_dir: a given --workdir stays; a temporary one (~25 MB per
    compression smoke) is gone once the bench process exits, so runs do not fill /tmp."""
    script = ("import os, sys; sys.path.insert(0, 'bench'); from _common import work_dir; "
              "mine = work_dir(None, 'tfrec-work-dir-test-'); "
              "open(os.path.join(mine, 'f'), 'w').close(); "
              "print(mine, work_dir(sys.argv[1], 'unused-'))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    mine, given = proc.stdout.split()
    assert given == str(tmp_path) and tmp_path.is_dir()
    assert os.path.basename(mine).startswith("tfrec-work-dir-test-")
    assert not os.path.exists(mine)


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_bench_smoke(name, smoke_runs):
    expect = BENCHES[name]
    result = smoke_runs[name].result()
    report = (f"bench/{name}.py --smoke exited {result.returncode}\n--- stdout:\n"
              f"{result.stdout[-3000:]}\n--- stderr:\n{result.stderr[-3000:]}")
    assert result.returncode == 0, report
    lines: List[str] = result.stdout.splitlines()
    if expect.data and lines and lines[-1].startswith("skipped: "):
        pytest.skip(f"bench/{name}.py: {lines[-1]}")
    for header in expect.headers:
        assert any(all(column in line for column in header) for line in lines), (
            f"no line holds the header columns {header}\n{report}")
    for pattern in expect.rows:
        assert any(re.match(pattern, line) for line in lines), (
            f"no table row matching {pattern!r}\n{report}")
    for text in expect.forbidden:
        assert text not in result.stdout, f"{text!r} in the output\n{report}"
