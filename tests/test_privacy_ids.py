"""Pseudonymised user ids (data.pseudonymize_users) and `tfrec forget`.

One pseudonymised run on a copy of the tiny world (prepare, train, ranker, evaluation
report, export, a served query with a request log) is scanned byte by byte for raw user
ids; the last test forgets a shopper in it.
"""

import contextlib
import copy
import io
import json
import os
import re
import shutil

import pandas as pd
import pytest
import tensorflow as tf

from tfrec.cli import main
from tfrec.data.pseudonym import (KEY_ENV, is_pseudonym, key_fingerprint, pseudonym,
                                  pseudonymize, read_key)

from tests.helpers import small_run_config

KEY = b"0123456789abcdef-test-key"
RAW_ID = re.compile(rb"U\d{6}")  # the tiny world's ids: U000042


@pytest.fixture(scope="module")
def pseudo(tiny_world_dir, tmp_path_factory):
    """A pseudonymised run on a copy of the tiny world: config, key, work dir, results."""
    from tfrec import workflow
    from tfrec.serving import ModelServer, PredictClient

    data = str(tmp_path_factory.mktemp("pii_data") / "data")
    shutil.copytree(tiny_world_dir, data)  # forget rewrites the tables
    key_file = tmp_path_factory.mktemp("pii_secret") / "key"
    key_file.write_bytes(KEY + b"\n")
    work = tmp_path_factory.mktemp("pii_work")
    cfg = small_run_config(data, work, "pseudo")
    cfg.train.epochs = 2
    cfg.data.pseudonymize_users = True
    cfg.data.pseudonym_key_file = str(key_file)
    cfg.serve.request_log = str(work / "request_logs")
    result = workflow.train(copy.deepcopy(cfg))
    ranker_cfg = copy.deepcopy(cfg)
    ranker_cfg.ranking.epochs = 1
    workflow.train_ranker(ranker_cfg, run="pseudo", retrieval=result.model)
    report = workflow.evaluate(copy.deepcopy(cfg), run="pseudo", report_dir=str(work / "report"))
    version = workflow.export(cfg, run="pseudo", model=result.model)

    events = pd.read_parquet(os.path.join(data, "events.parquet"))
    counts = events["user_id"].value_counts()
    user, other = str(counts.index[0]), str(counts.index[1])  # active: in the vocabulary
    server = ModelServer({"retrieval": os.path.dirname(version)}, port=0, poll_seconds=0,
                         request_log=cfg.serve.request_log).start()
    client = PredictClient(server.address, timeout=60)
    try:  # the server sees pseudonyms only: a raw id sent to it would be logged
        answers = {u: client.recommend("retrieval", pseudonym(u, KEY), k=10)
                   for u in (user, other, "not-a-shopper")}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # `tfrec query` hashes the raw id itself
            code = main(["query", "--server", server.address, "--user", user, "--json",
                         "--pseudonymize-users", "--pseudonym-key-file", str(key_file)])
    finally:
        client.close()
        server.stop(grace=0)  # writes the request log
    return dict(cfg=cfg, work=str(work), data=data, version=version, run_dir=result.run_dir,
                user=user, other=other, answers=answers, report=report,
                query=(code, printed.getvalue()))


def test_pseudonymize_is_keyed_deterministic_and_unicode_safe():
    ids = ["U000001", "Ünïcødé 用户 😀", "42", 42, "", None, "  "]
    once, again = pseudonymize(ids, KEY), pseudonymize(ids, KEY)
    assert once == again
    assert all(is_pseudonym(p) for p in once[:4]) and once[2] == once[3]  # 42 read as "42"
    assert once[4:] == ["", None, "  "]  # missing stays missing for validation
    assert once[1] == pseudonym("Ünïcødé 用户 😀", KEY) != once[0]
    other = pseudonymize(ids[:2], b"another key of enough bytes")
    assert set(other).isdisjoint(once)
    column = pd.Series(["U1", "U2", "U1"], index=[7, 8, 9])
    out = pseudonymize(column, KEY)
    assert list(out.index) == [7, 8, 9] and out[7] == out[9] != out[8]
    assert key_fingerprint(KEY) != key_fingerprint(b"another key of enough bytes")
    assert KEY.decode() not in key_fingerprint(KEY)


def test_missing_or_short_key_is_a_clear_error(monkeypatch, tmp_path, tiny_world_dir, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        read_key()
    monkeypatch.setenv(KEY_ENV, "short-secret")
    with pytest.raises(ValueError, match="at least 16"):
        read_key()
    with pytest.raises(FileNotFoundError, match="key file"):
        read_key(str(tmp_path / "nope"))
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert read_key() == KEY
    (tmp_path / "empty").write_text("\n")
    code = main(["prepare", "--data-dir", tiny_world_dir, "--out", str(tmp_path / "rec"),
                 "--pseudonymize-users", "--pseudonym-key-file", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tfrec: error:") and "key" in err
    assert not os.path.exists(tmp_path / "rec" / "meta.json")
    from tfrec.data.prepare import prepare_dataset
    with pytest.raises(ValueError, match="Beam engine"):  # the key would ship in the pipeline
        prepare_dataset(tiny_world_dir, str(tmp_path / "rec"), engine="beam", users_key=KEY)


def _files(root):
    for parent, _, names in os.walk(root):
        for name in names:
            yield os.path.join(parent, name)


def test_pseudonymised_run_writes_no_raw_user_id(pseudo):
    raw = set(pd.read_parquet(os.path.join(pseudo["data"], "users.parquet"))["user_id"])
    scanned, leaks = 0, {}
    for path in _files(pseudo["work"]):
        with open(path, "rb") as f:
            found = {m.decode() for m in RAW_ID.findall(f.read())} & raw
        if path.endswith(".parquet"):  # compressed pages: look at the values too
            table = pd.read_parquet(path)
            found |= {v for c in table.columns for v in table[c].astype(str)} & raw
        scanned += 1
        if found:
            leaks[path] = sorted(found)[:3]
    assert not leaks, leaks
    assert scanned > 30  # records, vocabularies, checkpoints, TensorBoard, report, model
    kinds = {os.path.relpath(p, pseudo["work"]).split(os.sep)[0] for p in _files(pseudo["work"])}
    assert {"tfrecords", "checkpoints", "tensorboard_logs", "report", "models",
            "request_logs"} <= kinds
    with open(os.path.join(pseudo["work"], "tfrecords", "meta.json")) as f:
        assert json.load(f)["pseudonym_key"] == key_fingerprint(KEY)
    with open(os.path.join(pseudo["run_dir"], "vocab.json")) as f:
        users = json.load(f)["users"]
    assert pseudonym(pseudo["user"], KEY) in users and all(is_pseudonym(u) for u in users)
    assert not any(KEY in open(p, "rb").read() for p in _files(pseudo["work"]))  # no secret


def test_served_model_answers_the_pseudonymised_user(pseudo):
    answers = pseudo["answers"]
    known, other, unknown = (answers[pseudo["user"]], answers[pseudo["other"]],
                             answers["not-a-shopper"])
    assert len(known) == 10
    scores = [[r["score"] for r in rows] for rows in (known, other, unknown)]
    assert scores[0] != scores[2]  # the user's own embedding row, not the unknown-user one
    assert scores[0] != scores[1]
    code, printed = pseudo["query"]
    assert code == 0
    assert [r["item_id"] for r in json.loads(printed)] == [r["item_id"] for r in known]


def test_records_of_another_key_or_raw_ids_are_refused(pseudo, tmp_path):
    from tfrec.training.trainer import ensure_prepared

    other = copy.deepcopy(pseudo["cfg"])
    (tmp_path / "key").write_bytes(b"a different secret of 32 bytes!!")
    other.data.pseudonym_key_file = str(tmp_path / "key")
    with pytest.raises(ValueError, match="key fingerprint .* another one"):
        ensure_prepared(other)
    other.data.pseudonymize_users = False
    with pytest.raises(ValueError, match="pseudonymize_users off"):
        ensure_prepared(other)
    assert ensure_prepared(copy.deepcopy(pseudo["cfg"]))["pseudonym_key"] == key_fingerprint(KEY)


def _record_users(tfrecord_dir):
    users = []
    for path in sorted(tf.io.gfile.glob(os.path.join(tfrecord_dir, "*.tfrecord"))):
        for record in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(record.numpy())
            users.append(example.features.feature["user_id"].bytes_list.value[0].decode())
    return users


def test_forget_removes_the_user_everywhere_and_lists_what_to_retrain(pseudo, capsys):
    """Last in the file: it rewrites the run's data."""
    from tfrec.serving.request_log import read_request_logs
    from tfrec.training.trainer import ensure_prepared

    cfg, user = pseudo["cfg"], pseudo["user"]
    alias = pseudonym(user, KEY)
    config = os.path.join(pseudo["work"], "..", "forget.yaml")
    cfg.to_yaml(config)
    events_path = os.path.join(pseudo["data"], "events.parquet")
    before_events = pd.read_parquet(events_path)
    before_records = _record_users(cfg.data.tfrecord_dir)
    before_logs = read_request_logs(cfg.serve.request_log)

    mtime = os.stat(events_path).st_mtime_ns
    assert main(["forget", "--config", config, "--user", "nobody-at-all"]) == 2
    assert capsys.readouterr().err.startswith("tfrec: error: no data of user(s) nobody-at-all")
    assert os.stat(events_path).st_mtime_ns == mtime  # nothing rewritten

    assert main(["forget", "--config", config, "--user", user, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    events = pd.read_parquet(events_path)
    removed_events = int((before_events["user_id"] == user).sum())
    assert removed_events > 0 and report["removed"]["tables"]["events"] == removed_events
    assert user not in set(events["user_id"]) and len(events) == len(before_events) - removed_events
    users = pd.read_parquet(os.path.join(pseudo["data"], "users.parquet"))
    assert user not in set(users["user_id"])
    records = _record_users(cfg.data.tfrecord_dir)
    assert report["removed"]["records"] == before_records.count(alias) > 0
    assert alias not in records
    assert len(records) == len(before_records) - before_records.count(alias)
    logs = read_request_logs(cfg.serve.request_log)
    assert (before_logs["user_id"] == alias).sum() == 2  # the client's call and the CLI's
    assert alias not in set(logs["user_id"]) and len(logs) == len(before_logs) - 2
    assert report["removed"]["request_logs"] == 2 and report["removed"]["vocabulary"] == 1
    assert report["removed"]["tables"]["users"] == 1
    assert report["retrain"] == [pseudo["run_dir"]]
    assert report["reexport"] == [pseudo["version"]]

    # The next training prepares again from the rewritten tables: the user stays out.
    meta = ensure_prepared(copy.deepcopy(cfg))
    assert sum(meta["counts"].values()) == len(_record_users(cfg.data.tfrecord_dir))
    assert alias not in _record_users(cfg.data.tfrecord_dir)
    with open(os.path.join(cfg.data.tfrecord_dir, "vocab", "users.jsonl")) as f:
        assert alias not in f.read()
