"""The `tfrec` command line as a user runs it: real processes, real gRPC on loopback."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tfrec.cli import build_parser

SUBCOMMANDS = ["generate", "train", "train-ranker", "evaluate", "export", "serve", "query",
               "explain", "board", "demo", "text", "forget"]


def tfrec(*args, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", "tfrec.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: tfrec " + command in capsys.readouterr().out


def test_train_without_data_is_a_clear_error(tmp_path):
    proc = tfrec("train", "--workdir", str(tmp_path))
    assert proc.returncode == 2
    assert "tfrec: error:" in proc.stderr and "tfrec generate" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["export", "--precision", "fp16"], "tfrec: error: export: argument --precision: "
                                        "invalid choice: 'fp16'"),
    (["search", "nope"], "tfrec: error: search: argument SEARCH_COMMAND: invalid choice: "
                         "'nope'"),
    (["search", "train", "--nope"], "tfrec: error: unrecognized arguments: --nope"),
    (["nope"], "tfrec: error: argument COMMAND: invalid choice: 'nope'"),
])
def test_usage_errors_have_the_tfrec_prefix(argv, message, capsys):
    """Usage errors of any subcommand read like every other error of the CLI."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: tfrec" in err, err


def test_bad_config_values_are_rejected(tmp_path):
    proc = tfrec("generate", "--workdir", str(tmp_path), "--set", "train.epochs=many")
    assert proc.returncode == 2 and "train.epochs must be int" in proc.stderr
    proc = tfrec("generate", "--workdir", str(tmp_path), "--set", "train.epoch=3")
    assert proc.returncode == 2 and "unknown config field train.epoch" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    proc = tfrec("generate", "--config", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_corrupt_events_file_is_named(tmp_path, tiny_world_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_world_dir, data)
    (data / "events.parquet").write_bytes(b"not a parquet file at all")
    proc = tfrec("train", "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "events" in proc.stderr and "Traceback" not in proc.stderr


def test_query_against_unreachable_server_fails_cleanly():
    proc = tfrec("query", "--server", f"127.0.0.1:{free_port()}", "--user", "U1",
                 "--timeout", "2")
    assert proc.returncode == 2
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr


def test_serve_and_query_the_exported_model(exported_model, tiny_world, tmp_path):
    """`tfrec serve` in its own process, `tfrec query` from another, then a hot swap."""
    base = os.path.dirname(os.path.dirname(exported_model))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tfrec.cli", "serve", "--base-dir", base, "--port", str(port),
         "--poll-seconds", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        deadline = time.time() + 120
        while not line.startswith("serving ") and time.time() < deadline and server.poll() is None:
            line = server.stdout.readline()
        assert f"127.0.0.1:{port}" in line, line
        user = tiny_world.events["user_id"].iloc[100]
        item = tiny_world.catalog["item_id"].iloc[0]
        title = tiny_world.catalog["title"].iloc[0]
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--user", user, "--k", "5",
                     "--history", item)
        assert proc.returncode == 0, proc.stderr
        rows = [l for l in proc.stdout.splitlines() if l.strip()[:1].isdigit()]
        assert len(rows) == 5 and item not in proc.stdout
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--user", user, "--query",
                     title, "--k", "3")
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) >= 3
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--similar", item, "--k", "3")
        assert proc.returncode == 0 and item not in proc.stdout.split("\n", 1)[1]
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--user", user, "--k", "0")
        assert proc.returncode == 2 and "INVALID_ARGUMENT" in proc.stderr
        assert "k must be >= 1" in proc.stderr
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--similar", "NO-SUCH-ITEM")
        assert proc.returncode == 2 and "unknown item_id" in proc.stderr
        proc = tfrec("query", "--server", f"127.0.0.1:{port}", "--model", "nope", "--user", "u")
        assert proc.returncode == 2 and "NOT_FOUND" in proc.stderr

        # Hot swap: a new version appears on disk and is served without restart.
        from tfrec.serving.client import PredictClient

        staged = os.path.join(os.path.dirname(exported_model), ".tmp-copy")
        shutil.copytree(exported_model, staged)
        os.rename(staged, os.path.join(os.path.dirname(exported_model), "2"))
        client = PredictClient(f"127.0.0.1:{port}")
        deadline = time.time() + 30
        versions = []
        while time.time() < deadline:
            versions = client.status("retrieval")
            if any(v == 2 and s == "AVAILABLE" for v, s in versions):
                break
            time.sleep(0.3)
        assert (2, "AVAILABLE") in versions, versions
        response = client.predict_response("retrieval", _inputs(user))
        assert response.model_spec.version.value == 2
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(os.path.join(os.path.dirname(exported_model), "2"), ignore_errors=True)


def _inputs(user):
    import numpy as np

    return {"user_id": np.array([user], dtype=object), "history": np.array([[""]], dtype=object),
            "query": np.array([""], dtype=object), "device": np.array(["mobile"], dtype=object),
            "hour": np.array([8], np.int64), "k": np.array([3], np.int32),
            "exclude_seen": np.array([True])}


def test_evaluate_the_exported_saved_model(exported_model, tiny_world_dir, tmp_path):
    """What is served is what is measured: metrics straight from the SavedModel."""
    proc = tfrec("evaluate", "--saved-model", exported_model, "--data-dir", tiny_world_dir,
                 "--workdir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = __import__("json").loads(proc.stdout)
    assert set(rows) == {"two_tower", "popularity", "oracle", "search:two_tower", "search:bm25",
                         "cold items", "warm items"}
    assert rows["two_tower"]["recall@100"] > rows["popularity"]["recall@100"]
    # Search sessions: the personalized two-tower finds what searchers engage with.
    assert rows["search:two_tower"]["recall@100"] > 0.3
    # The searcher's history items left out, as `search_history: exclude` serves them.
    proc = tfrec("evaluate", "--saved-model", exported_model, "--data-dir", tiny_world_dir,
                 "--workdir", str(tmp_path), "--json", "--search-history", "exclude")
    assert proc.returncode == 0, proc.stderr[-2000:]
    excluded = __import__("json").loads(proc.stdout)
    assert excluded["search:bm25"] == rows["search:bm25"]  # BM25 never reads the history
    assert excluded["search:two_tower"] != rows["search:two_tower"]
    proc = tfrec("evaluate", "--saved-model", str(tmp_path), "--data-dir", tiny_world_dir)
    assert proc.returncode == 2 and "not a SavedModel directory" in proc.stderr
