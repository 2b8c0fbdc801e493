"""benchmarks/generalisation.py: the generalisation table built from verify runs of tiny models on
the built-in sample (one geometric and one patch threat, a few images; seconds in all)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from benchmarks.generalisation import (
    GEOMETRIC,
    PATCH,
    VERIFY,
    main,
    quick_models,
    table_models,
)

THREATS = ("translate:1", "patch:2x2@4")  # 9 and 49 boxes per 28x28 image
N = 12
BUDGET = "0.000001"  # the cascade stops after IBP (and the patch attack): timeouts happen


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Three tiny MLPs, trained in seconds: natural, single-norm (IBP l∞) and CURE-Joint."""
    folder = tmp_path_factory.mktemp("models")
    models = quick_models(folder, ["natural", "ibp-linf", "cure-joint"])
    return {"plain": models[0].checkpoint, "single": models[1].checkpoint,
            "cure": models[2].checkpoint}  # fmt: skip


def _args(out: Path, checkpoints: dict[str, Path], *extra: str) -> list[str]:
    named = [a for name, p in checkpoints.items() for a in ("--checkpoint", f"{name}={p}")]
    return ["--quick", "--out", str(out), *named, "--threads", "1", "--no-progress",
            "--threats", ",".join(THREATS), "--n", str(N), "--budget", BUDGET, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoints) -> Path:
    out = tmp_path_factory.mktemp("generalisation")
    res = _invoke(*_args(out, checkpoints))
    assert res.exit_code == 0, res.output
    return out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["datasets"]["sample"]


def test_table_counts_equal_the_per_sample_flags(run: Path):
    d = _summary(run)
    assert d["threats"] == list(THREATS)
    assert list(d["models"]) == ["cure", "plain", "single"]  # not in a known order: by name
    methods = {k: r["method"] for k, r in d["models"].items()}
    assert methods == {"plain": "natural", "single": "ibp-linf", "cure": "cure-joint"}
    timeouts = 0
    for name, r in d["models"].items():
        assert r["n"] == N and r["start"] == 0
        rows = _csv(run / "sample" / name / VERIFY / "samples.csv")
        assert len(rows) == N
        assert r["clean"]["count"] == sum(row["correct"] == "1" for row in rows)
        flags = {t: [row[f"{t}/certified"] == "1" for row in rows] for t in THREATS}
        for t in THREATS:
            assert r["certified"][t]["count"] == sum(flags[t])
            assert r["certified"][t]["percent"] == pytest.approx(100 * sum(flags[t]) / N)
            # samples out of budget: counted, and never certified
            out_of_time = [row[f"{t}/auto/decided_by"] == "timeout" for row in rows]
            assert r["timeouts"][t] == sum(out_of_time)
            assert not any(o and f for o, f in zip(out_of_time, flags[t]))
            timeouts += sum(out_of_time)
        union = sum(all(flags[t][i] for t in THREATS) for i in range(N))
        assert r["union"]["all"]["count"] == union
        assert r["union"][GEOMETRIC]["count"] == sum(flags["translate:1"])
        assert r["union"][PATCH]["count"] == sum(flags["patch:2x2@4"])
        assert all(union <= r["certified"][t]["count"] for t in THREATS)
        assert r["timeouts"]["total"] == sum(r["timeouts"][t] for t in THREATS)
        assert r["seconds_per_image"]["total"] > 0
    assert timeouts > 0  # the tiny budget ran out on some images
    md = (run / "summary.md").read_text()
    assert "| timeouts |" in md and "union geometric" in md and "union patch" in md
    assert "Certificates broken, all runs: 0 (must be 0)." in md
    assert "![certified accuracy per model and threat](generalisation.png)" in md
    assert (run / "generalisation.png").stat().st_size > 0


def test_comparison_is_paired_on_the_same_images(run: Path):
    d = _summary(run)
    by_column = {c["column"]: c for c in d["comparison"]}
    assert set(by_column) == {"geometric union", "patch union", *THREATS}
    for c in by_column.values():
        assert c["cure_model"] == "cure" and c["single_norm_model"] == "single"
        a = _csv(run / "sample" / "cure" / VERIFY / "samples.csv")
        b = _csv(run / "sample" / "single" / VERIFY / "samples.csv")
        assert [r["index"] for r in a] == [r["index"] for r in b]
        fa = [all(r[f"{t}/certified"] == "1" for t in c["threats"]) for r in a]
        fb = [all(r[f"{t}/certified"] == "1" for t in c["threats"]) for r in b]
        g = c["paired"]
        assert g["n"] == N
        assert g["cure_only"] == sum(x and not y for x, y in zip(fa, fb))
        assert g["single_norm_only"] == sum(y and not x for x, y in zip(fa, fb))
        assert g["difference"] == pytest.approx(100 * (sum(fa) - sum(fb)) / N)
        assert g["low"] <= g["difference"] <= g["high"] and 0 <= g["sign_test_p"] <= 1
        assert c["cure_percent"] - c["single_norm_percent"] == pytest.approx(g["difference"])
        assert c["paper"] is None  # the paper's numbers are for CIFAR-10
    assert "The CURE paper reports +6.8 points" in (run / "summary.md").read_text()


def test_rerun_reuses_finished_runs(run: Path, checkpoints):
    files = [p for name in checkpoints for p in (run / "sample" / name / VERIFY).iterdir()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    res = _invoke(*_args(run, checkpoints))
    assert res.exit_code == 0, res.output
    assert res.output.count("is finished: reused, nothing recomputed") == len(checkpoints)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before


def test_killed_run_resumes_where_it_stopped(tmp_path: Path, run: Path, checkpoints):
    """A run killed after 5 images certifies the other 7 and ends with the same flags."""
    one = {"plain": checkpoints["plain"]}
    first = _invoke(*_args(tmp_path, one))
    assert first.exit_code == 0, first.output
    folder = tmp_path / "sample" / "plain" / VERIFY
    whole = _csv(folder / "samples.csv")
    lines = (folder / "samples.jsonl").read_text().splitlines(keepends=True)
    (folder / "samples.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # torn last line
    (folder / "summary.json").unlink()
    res = _invoke(*_args(tmp_path, one))
    assert res.exit_code == 0, res.output
    assert "resumed after 5 images" in res.output
    assert _csv(folder / "samples.csv") == whole
    r = _summary(tmp_path)["models"]["plain"]
    kept = sum(json.loads(line)["seconds"]["total"] for line in lines[:5])
    assert r["n"] == N and r["seconds_per_image"]["total"] * N > kept  # every session timed


def test_other_settings_are_refused_until_overwrite(tmp_path: Path, checkpoints):
    one = {"plain": checkpoints["plain"]}
    assert _invoke(*_args(tmp_path, one)).exit_code == 0
    res = _invoke(*_args(tmp_path, one, "--n", "6"))
    assert res.exit_code != 0
    assert "count: run 12, now 6" in res.output and "--overwrite" in res.output
    res = _invoke(*_args(tmp_path, one, "--n", "6", "--overwrite"))
    assert res.exit_code == 0, res.output
    assert _summary(tmp_path)["models"]["plain"]["n"] == 6


def test_report_only_rebuilds_the_summary(tmp_path: Path, run: Path):
    (run / "summary.md").unlink()
    res = _invoke("--report-only", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert "| plain | natural | 12 |" in (run / "summary.md").read_text()
    res = _invoke("--report-only", "--out", str(tmp_path / "empty"))
    assert res.exit_code != 0 and "no finished run" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quick", "--models", "bogus"], "unknown model(s) bogus"),
        (["--quick", "--threats", "linf:0.1"], "is an lp ball"),
        (["--quick", "--threats", "spin:3"], "unknown threat kind"),
        (["--quick", "--checkpoint", "x=/no/such.pt"], "no such file"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, args, message):
    res = _invoke(*args, "--out", str(tmp_path))
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "models").exists()  # refused before any training


def test_table_models_skip_rows_still_training(tmp_path: Path, checkpoints, capsys):
    ready, training = tmp_path / "natural-b64", tmp_path / "cure-joint-mtl2-b64"
    for folder in (ready, training):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(checkpoints["plain"].read_bytes())
    (ready / "row.json").write_text(json.dumps({"method": "natural", "description": "d"}))
    models = table_models(tmp_path, ["natural-b64", "cure-joint-mtl2-b64", "mtl-ibp-linf-b64"])
    assert [(m.name, m.method) for m in models] == [("natural-b64", "natural")]
    err = capsys.readouterr().err
    assert "still training" in err and "does not exist" in err
    with pytest.raises(click.BadParameter, match="unknown model"):
        table_models(tmp_path, ["natural-b64", "no-such-row"])
