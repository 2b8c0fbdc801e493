"""The verify runner and its results files: written results read back to the same rows and summary,
and `cure-lirpa verify` and `cure_lirpa.verify` give the same results."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cure_lirpa.cli import main
from cure_lirpa.io.runs import Records
from cure_lirpa.threats.base import parse_threat
from cure_lirpa.verification.results import (
    SampleRow,
    markdown_table,
    read_samples,
    read_summary,
    summarize,
    to_percent,
    write_results,
)

THREATS = [parse_threat("linf:2/255"), parse_threat("l2:0.5"), parse_threat("patch:2")]
METHODS = ["ibp", "crown", "auto"]
COSTS = ("seconds_per_image", "seconds_total", "peak_memory_mb")


def _rows() -> list[SampleRow]:
    """Rows with every kind of entry: certified, not, misclassified, withdrawn, timed out, skipped."""
    lin, l2, patch = (t.name for t in THREATS)
    rows = []
    for i in range(7):
        r = SampleRow(index=10 + i, label=i % 3, prediction=i % 3 if i != 5 else 0)
        for t in (lin, l2, patch):
            margin = {"ibp": 0.25 * (i - 3) + 1e-7, "crown": 0.5 * (i - 2) / 3, "auto": -math.inf}
            r.margins[t] = margin if r.correct else dict.fromkeys(METHODS, -math.inf)
            r.certified[t] = {m: r.correct and v > 0 for m, v in r.margins[t].items()}
            r.decided_by[t] = "crown" if r.correct else "none"
            r.robust[t] = None if t == patch else i != 1
        r.decided_by[l2] = "timeout" if i == 2 else r.decided_by[l2]
        if i == 4:
            r.skipped[l2] = {"sdp-crown": "a layer it cannot bound"}
        rows.append(r)
    broken = rows[4]  # certified under l∞ and broken by PGD: withdrawn
    broken.robust[lin] = False
    broken.violations.append(lin)
    broken.certified[lin] = dict.fromkeys(broken.certified[lin], False)
    return rows


def test_written_results_read_back_to_the_same_rows_and_summary(tmp_path):
    rows = _rows()
    summary = summarize(rows, THREATS, METHODS, {("l2:0.5", "ibp"): 0.5}, seconds=2.0)
    write_results(tmp_path, rows, summary, THREATS, METHODS)
    assert read_summary(tmp_path) == json.loads(json.dumps(summary))
    assert 0.0 < summary["clean_accuracy"] < 1.0 and summary["accuracy_unit"] == "fraction"
    # samples.csv holds margins to 6 digits and the skipped stages without their reasons
    back = read_samples(tmp_path / "samples.csv")
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        for t in a.margins:
            for m, v in a.margins[t].items():
                assert b.margins[t][m] == pytest.approx(v, rel=1e-5, abs=1e-12)
        assert {t: list(s) for t, s in a.skipped.items()} == {
            t: list(s) for t, s in b.skipped.items()
        }
        same = ("index", "label", "prediction", "certified", "decided_by", "robust", "violations")
        assert all(getattr(a, k) == getattr(b, k) for k in same), a.index
    assert summarize(back, THREATS, METHODS)["certified"] == summary["certified"]
    # samples.jsonl (what the run appends) reads back exactly, and a folder prefers it
    Records(tmp_path / "samples.jsonl").append(asdict(r) for r in rows)
    assert read_samples(tmp_path) == rows == read_samples(tmp_path / "samples.jsonl")


def test_percent_only_in_human_tables_and_old_summaries_are_converted(tmp_path):
    rows = _rows()
    summary = summarize(rows, THREATS, METHODS)
    pct = to_percent(summary)
    assert pct["clean_accuracy"] == 100.0 * 6 / 7 and summary["clean_accuracy"] == 6 / 7
    assert f"| clean (no perturbation) | {100.0 * 6 / 7:.1f} |" in markdown_table(summary, METHODS)
    old = {k: v for k, v in pct.items() if k != "accuracy_unit"}  # a summary.json in percent
    (tmp_path / "summary.json").write_text(json.dumps(old))
    back = read_summary(tmp_path)
    assert back["union"] == pytest.approx(summary["union"])
    assert back["certified"]["l2:0.5"] == pytest.approx(summary["certified"]["l2:0.5"])


def test_the_command_and_the_python_runner_give_the_same_results(mlp_checkpoint, tmp_path):
    import cure_lirpa

    args = ["--threat", "linf:0.02", "--threat", "l2:0.3", "--method", "ibp", "--method", "auto",
            "--count", "12", "--batch-size", "5", "--attack-steps", "5", "--seed", "3"]  # fmt: skip
    cli = tmp_path / "cli"
    res = CliRunner().invoke(
        main,
        ["verify", str(mlp_checkpoint), *args, "--out", str(cli), "--quiet", "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    api = tmp_path / "api"
    result = cure_lirpa.verify(
        mlp_checkpoint, ["linf:0.02", "l2:0.3"], ["ibp", "auto"], count=12, batch_size=5,
        attack_steps=5, seed=3, out=api,
    )  # fmt: skip
    assert result.out == api and result.shard is None
    for name in ("samples.csv", "summary.md"):
        assert (cli / name).read_text() == (api / name).read_text(), name
    assert _untimed(cli) == _untimed(api)  # the records, but for each sample's seconds
    a, b = read_summary(cli), read_summary(api)
    for key in COSTS:
        a.pop(key), b.pop(key)
    assert a == b == {k: v for k, v in result.summary.items() if k not in COSTS}
    assert read_samples(api) == result.rows
    assert f"clean accuracy {100 * a['clean_accuracy']:.1f}%" in res.output


def test_the_python_runner_shards_and_merges_like_the_command(mlp_checkpoint, tmp_path):
    from cure_lirpa.verification.runner import merge_shards, verify

    plain = verify(mlp_checkpoint, ["l2:0.3"], ["ibp"], count=7, attack=False, out=tmp_path / "p")
    parts = [
        verify(
            mlp_checkpoint,
            ["l2:0.3"],
            ["ibp"],
            count=7,
            attack=False,
            out=tmp_path / "s",
            shard=f"{k}/2",
        )  # fmt: skip
        for k in (0, 1)
    ]
    assert [len(p.rows) for p in parts] == [3, 4] and parts[
        1
    ].out == tmp_path / "s" / "shard-1-of-2"
    merged = merge_shards(tmp_path / "s")
    assert merged["certified"] == plain.summary["certified"]
    assert [r.index for r in read_samples(tmp_path / "s")] == list(range(7))


def _untimed(folder: Path) -> list[dict]:
    """The run's samples.jsonl records without their ``seconds`` (wall-clock shares)."""
    records = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_resumed_run_counts_the_time_of_every_session(mlp_checkpoint, tmp_path):
    """Each sample keeps its share of its batch's seconds, so the summary of a run killed and
    resumed (and of a finished run opened again with resume) times every sample, not only the
    last session's."""
    import cure_lirpa

    kw = dict(count=6, batch_size=2, attack_steps=2, out=tmp_path / "run")
    full = cure_lirpa.verify(mlp_checkpoint, ["linf:0.02"], ["ibp", "crown"], **kw).summary
    records = _untimed(tmp_path / "run")
    per_sample = [json.loads(x)["seconds"] for x in (tmp_path / "run" / "samples.jsonl").open()]
    assert all(s["total"] > 0 and s["linf:0.02/crown"] > 0 for s in per_sample)
    assert full["seconds_total"] == pytest.approx(sum(s["total"] for s in per_sample))
    assert full["seconds_per_image"]["linf:0.02/crown"] == pytest.approx(
        sum(s["linf:0.02/crown"] for s in per_sample) / 6
    )
    # a kill after two batches: the resumed run's summary still counts the first four samples
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    (tmp_path / "run" / "samples.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "run" / "summary.json").unlink()
    again = cure_lirpa.verify(mlp_checkpoint, ["linf:0.02"], ["ibp", "crown"], resume=True, **kw)
    assert _untimed(tmp_path / "run") == records
    kept = sum(s["total"] for s in per_sample[:4])
    assert again.summary["seconds_total"] > kept
    # opening the finished run again changes none of its times
    twice = cure_lirpa.verify(mlp_checkpoint, ["linf:0.02"], ["ibp", "crown"], resume=True, **kw)
    for key in ("seconds_total", "seconds_per_image"):
        assert twice.summary[key] == pytest.approx(again.summary[key])


@pytest.mark.parametrize("text", ["patch:5", "rotate:30", "translate:2"])
def test_patch_and_geometric_certificates_are_attacked_too(
    mlp_checkpoint, monkeypatch, tmp_path, text
):
    """Under patches and geometric threats every sample is attacked like under balls: the real
    cascade's certificates all survive; a deliberately wrong cascade that certifies every correct
    sample is caught (violations counted, certificates withdrawn)."""
    import cure_lirpa
    from cure_lirpa.verification import runner
    from cure_lirpa.verification.cascade import Decision

    kw = dict(count=24, batch_size=12, attack_steps=2)
    honest = cure_lirpa.verify(mlp_checkpoint, [text], ["auto"], out=tmp_path / "honest", **kw)
    name = parse_threat(text).name
    attacked = [r for r in honest.rows if r.correct]
    assert attacked and all(r.robust[name] is not None for r in attacked)
    assert honest.summary["soundness_violations"][name] == 0
    assert all(r.robust[name] for r in honest.rows if r.best(name))

    def wrong(bc, model, x, y, threat, times, correct, step, budget, stages):
        step(len(y))
        margin = torch.where(correct, torch.ones(len(y)), torch.full((len(y),), -math.inf))
        return Decision(
            margin, ["ibp"] * len(y), torch.zeros(len(y), dtype=torch.bool), [{}] * len(y)
        )

    monkeypatch.setattr(runner, "run_cascade", wrong)
    result = cure_lirpa.verify(mlp_checkpoint, [text], ["auto"], out=tmp_path / "wrong", **kw)
    broken = [r for r in result.rows if r.correct and r.robust[name] is False]
    assert broken, f"the natural MLP should be broken under {text}"
    assert result.summary["soundness_violations"][name] == len(broken)
    assert not any(r.best(name) for r in broken)
