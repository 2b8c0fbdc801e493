"""The run layer: config checks on resume, append-only records that survive a kill at any byte,
RNG state, cached benchmark results."""

import json
import random

import numpy as np
import pytest
import torch

from cure_lirpa.errors import UserError
from cure_lirpa.io.runs import Records, Run, cached, config_diff, rng_state, set_rng_state, store


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


# ---------------------------------------------------------------------------------------------
# The run-folder rule (cure_lirpa.io.runs.Run.open) through every command: one test per rule, each
# parametrised over the commands; a command runs with settings 0 or 1 (Commands.argv).

TRAIN = ["train", "--train-count", "128", "--width", "4", "--batch-size", "64", "--epochs", "1",
         "--warmup-epochs", "0", "--ramp-epochs", "1", "--device", "cpu", "--quiet"]  # fmt: skip
VERIFY = ["--threat", "linf:0.01", "--method", "ibp", "--count", "4", "--batch-size", "4",
          "--attack-steps", "2", "--attack-restarts", "1", "--device", "cpu", "--quiet"]  # fmt: skip
SMOOTH_TRAIN = ["smooth", "train", "--sigma", "0.5", "--epochs", "1", "--train-count", "128",
                "--eval-count", "0", "--width", "4", "--batch-size", "64", "--device", "cpu",
                "--quiet"]  # fmt: skip
SAMPLE = ["--n", "100", "--alpha", "0.01", "--batch-size", "100", "--count", "2", "--skip", "150",
          "--device", "cpu", "--quiet"]  # fmt: skip
COMMANDS = ["train", "verify", "smooth train", "smooth certify", "smooth predict",
            "smooth analyze", "merge"]  # fmt: skip
RESUMABLE = [c for c in COMMANDS if c != "merge"]  # merge rebuilds a run of its settings anyway


def _cli(*args):
    from click.testing import CliRunner

    from cure_lirpa.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(res):
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _refused(res, *phrases: str) -> str:
    """A clean one-line error naming ``phrases`` (exit code 1, no traceback); returns it."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


class Commands:
    """The inputs every command needs, and one finished run of each command (settings 0)."""

    def __init__(self, root):
        self.root = root
        self.model, self.base, self.cert = root / "model", root / "base", root / "cert"
        _ok(_cli(*TRAIN, "--out", self.model))
        _ok(_cli(*SMOOTH_TRAIN, "--out", self.base))
        _ok(_cli(*self.argv("smooth certify", self.cert, 0)))
        for variant in (0, 1):  # verify shards of both settings, for merge
            for k in (0, 1):
                argv = self.argv("verify", root / f"shards{variant}", variant)
                _ok(_cli(*argv, "--shard", f"{k}/2"))
        self.finished = {
            "train": self.model,
            "smooth train": self.base,
            "smooth certify": self.cert,
        }
        for name in COMMANDS:
            if name not in self.finished:
                out = self.fresh(name, root / name.replace(" ", "-"))
                _ok(_cli(*self.argv(name, out, 0)))
                self.finished[name] = out

    def argv(self, name: str, out, variant: int) -> list:
        """The command line of ``name`` writing into ``out`` with settings ``variant`` (0 or 1)."""
        seed = ["--seed", variant]
        smooth = ["-c", self.base, "--sigma", "0.5", *SAMPLE, *seed, "--out", out]
        if name == "train":
            return [*TRAIN, *seed, "--out", out]
        if name == "verify":
            return ["verify", self.model / "checkpoint.pt", *VERIFY, *seed, "--out", out]
        if name == "smooth train":
            return [*SMOOTH_TRAIN, *seed, "--out", out]
        if name == "smooth certify":
            return ["smooth", "certify", "--n0", "10", *smooth]
        if name == "smooth predict":
            return ["smooth", "predict", *smooth]
        if name == "smooth analyze":
            radii = "0.5" if variant else "0.25"
            return ["smooth", "analyze", self.cert, "--radii", radii, "--out", out]
        shards = sorted((self.root / "shards1").glob("shard-*")) if variant else []
        return ["merge", out, *shards]  # settings 1: the shards of settings 1, given explicitly

    def fresh(self, name: str, out):
        """A folder for a new run: empty (for merge: holding the shards of settings 0)."""
        import shutil

        if name == "merge":
            shutil.copytree(self.root / "shards0", out)
        else:
            out.mkdir(parents=True)
        return out

    def copy(self, name: str, out):
        """A copy of the finished run of ``name``."""
        import shutil

        shutil.copytree(self.finished[name], out)
        return out


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    return Commands(tmp_path_factory.mktemp("commands"))


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_creates_a_run_in_a_new_or_empty_folder(commands, name, tmp_path):
    kind = _config(commands.finished[name])["kind"]
    assert kind == name.replace(" ", "-").replace("merge", "verify")
    out = commands.fresh(name, tmp_path / "empty")
    _ok(_cli(*commands.argv(name, out, 0)))
    assert _config(out)["kind"] == kind and (out / "config.json").is_file()


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_a_folder_with_other_files(commands, name, tmp_path):
    out = commands.fresh(name, tmp_path / "mine")
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    _refused(_cli(*commands.argv(name, out, 0)), "notes.txt", "choose an empty or new folder")
    assert _files(out) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_a_finished_run_without_a_flag(commands, name, tmp_path):
    out = commands.copy(name, tmp_path / "run")
    before = _files(out)
    _refused(_cli(*commands.argv(name, out, 1)), str(out), "already holds", "--overwrite")
    assert _files(out) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_resumes_a_run_of_the_same_settings_only(commands, name, tmp_path):
    out = commands.copy(name, tmp_path / "run")
    flag = ["--resume"] if name in RESUMABLE else []  # merge rebuilds without a flag
    before = _files(out)
    _ok(_cli(*commands.argv(name, out, 0), *flag))
    assert _config(out)["config"] == _config(commands.finished[name])["config"]
    assert set(_files(out)) == set(before)
    if name in RESUMABLE:
        _refused(_cli(*commands.argv(name, out, 1), "--resume"), "--resume", "other settings")
        new = commands.fresh(name, tmp_path / "new")
        _refused(_cli(*commands.argv(name, new, 0), "--resume"), "holds no", "run to continue")
        assert not (new / "config.json").exists()


@pytest.mark.parametrize("name", COMMANDS)
def test_only_overwrite_replaces_a_finished_run(commands, name, tmp_path):
    out = commands.copy(name, tmp_path / "run")
    (out / "notes.txt").write_text("deleted with the run")
    shards = sorted(p.name for p in out.glob("shard-*"))
    _ok(_cli(*commands.argv(name, out, 1), "--overwrite"))
    assert _config(out)["config"] != _config(commands.finished[name])["config"]
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in out.glob("shard-*")) == shards  # a merge keeps its shards


@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_with_overwrite_is_refused_and_the_finished_run_survives(commands, name, tmp_path):
    out = commands.copy(name, tmp_path / "run")
    before = _files(out)
    res = _cli(*commands.argv(name, out, 0), "--resume", "--overwrite")
    _refused(res, "--resume and --overwrite contradict each other", "pass one of them")
    assert _files(out) == before


@pytest.fixture(scope="module")
def locker():
    """Another process that holds the folders written to its stdin (as a running command does)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom cure_lirpa.io.runs import lock_folder\n"
        "for line in sys.stdin:\n    lock_folder(line.strip())\n    print('held', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip

    def hold(folder) -> None:
        proc.stdin.write(f"{folder}\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "held"

    yield hold
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_a_folder_another_process_uses(commands, locker, name, tmp_path):
    out = commands.copy(name, tmp_path / "run")
    before = _files(out)
    locker(out)
    _refused(_cli(*commands.argv(name, out, 1), "--overwrite"), "in use by another")
    assert _files(out) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_refuses_another_commands_run_even_with_overwrite(commands, name, tmp_path):
    other = "verify" if name == "smooth certify" else "smooth certify"
    out = commands.copy(other, tmp_path / "run")  # e.g. analyze --out <a certify run>
    before = _files(out)
    _refused(_cli(*commands.argv(name, out, 1), "--overwrite"), "choose another folder")
    assert _files(out) == before
