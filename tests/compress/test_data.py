import json

import pytest
import torch

from compress.data import calibration_windows, eval_windows, load_texts
from compress.errors import InputError, UsageError


def test_builtin_split_is_the_documented_one():
    import pydoc_data.topics as T

    keys = sorted(T.topics)
    ev, cal = load_texts("builtin:pydoc", "eval"), load_texts("builtin:pydoc", "calibration")
    assert ev[0] == T.topics[keys[0]] and ev[1] == T.topics[keys[5]]
    assert len(ev) + len(cal) == len(keys) and cal[0] == T.topics[keys[1]]


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_texts(str(tmp_path / "a.txt")) == ["hello world"]
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "y"}) + "\n")
    assert load_texts(str(tmp_path / "a.jsonl")) == ["x", "y"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InputError, match=r"b.jsonl:1: the record has no 'text' field"):
        load_texts(str(tmp_path / "b.jsonl"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "c.parquet")) == ["p", "q"]
    with pytest.raises(InputError, match="no such data file"):
        load_texts(str(tmp_path / "missing.txt"))


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not-a-local-file-xyz"):
        load_texts("not-a-local-file-xyz")


def test_windows_deterministic():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 16, 64)
    assert a.shape == (16, 64) and torch.equal(a, calibration_windows(ids, 16, 64))
    r1 = calibration_windows(ids, 16, 64, "random", seed=1)
    assert torch.equal(r1, calibration_windows(ids, 16, 64, "random", seed=1))
    assert not torch.equal(r1, calibration_windows(ids, 16, 64, "random", seed=2))
    e = eval_windows(ids, 512)
    assert e.shape == (19, 512) and torch.equal(e.flatten(), ids[: 19 * 512])
    with pytest.raises(UsageError, match="fewer than calibration.seq_len"):
        calibration_windows(ids[:10], 1, 64)
