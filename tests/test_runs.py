"""The run layer: config checks on resume, append-only records that survive a kill at any byte,
RNG state, cached benchmark results."""

import json
import random

import numpy as np
import pytest
import torch

from cure_lirpa.errors import UserError
from cure_lirpa.runs import Records, Run, cached, config_diff, rng_state, set_rng_state, store


def test_records_survive_a_kill_at_every_byte(tmp_path):
    path = tmp_path / "samples.jsonl"
    records = [{"index": i, "margin": i / 3, "name": "x" * i} for i in range(5)]
    Records(path).append(records)
    full = path.read_bytes()
    ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]
    for cut in range(len(full) + 1):  # a kill after any byte of the writes
        path.write_bytes(full[:cut])
        kept = Records(path).read()
        assert kept == records[: sum(1 for e in ends if e <= cut)]
        Records(path).append(records[len(kept) :])  # the resume writes the rest
        assert Records(path).read() == records
        assert path.read_bytes() == full


def test_run_refuses_existing_run_and_other_settings(tmp_path):
    out = tmp_path / "run"
    run = Run.open(out, "verify", {"eps": 0.1, "count": 10})
    run.records().append([{"index": 0}])
    with pytest.raises(UserError, match="--resume to continue"):
        Run.open(out, "verify", {"eps": 0.1, "count": 10})
    with pytest.raises(UserError, match=r"eps: run 0.1, now 0.2"):
        Run.open(out, "verify", {"eps": 0.2, "count": 10}, resume=True)
    with pytest.raises(UserError, match="holds a verify run, not a train run"):
        Run.open(out, "train", {"eps": 0.1, "count": 10}, resume=True)
    again = Run.open(out, "verify", {"eps": 0.1, "count": 20}, resume=True, mutable=["count"])
    assert again.resumed and again.records().read() == [{"index": 0}]
    assert json.loads((out / "config.json").read_text())["config"]["count"] == 20
    fresh = Run.open(out, "verify", {"eps": 0.3}, overwrite=True)
    assert not fresh.resumed and fresh.records().read() == []
    with pytest.raises(UserError, match="no verify run to continue"):
        Run.open(tmp_path / "none", "verify", {}, resume=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="notes.txt"):
        Run.open(tmp_path / "mine", "verify", {})


def test_a_run_that_kept_nothing_leaves_nothing_and_does_not_block(tmp_path):
    out = tmp_path / "run"
    run = Run.open(out, "train", {"lr": 1})
    run.records("metrics.jsonl").append([])
    run.discard_if_empty()
    assert not out.exists()
    Run.open(out, "train", {"lr": 1})  # killed (no cleanup): only its config is there
    again = Run.open(out, "train", {"lr": 2})  # a plain rerun takes the folder over
    assert not again.resumed
    again.file("checkpoint.pt").write_bytes(b"weights")
    again.discard_if_empty()
    assert (out / "checkpoint.pt").exists()


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = rng_state({"data": gen})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    set_rng_state(state, {"data": gen})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def test_cached_results_need_the_same_key(tmp_path):
    path = tmp_path / "cell.json"
    assert cached(path, {"a": 1}) is None
    store(path, {"a": (1, 2)}, {"value": 3})
    assert cached(path, {"a": [1, 2]})["value"] == 3
    assert cached(path, {"a": [1, 3]}) is None
    path.write_text("{torn")
    assert cached(path, {"a": [1, 2]}) is None


def test_config_diff_compares_as_json():
    assert config_diff({"a": (1, 2), "b": 1}, {"a": [1, 2], "b": 2, "c": 0}, ignore=["c"]) == ["b"]
