"""Committed benchmark summaries: stamped with the commit of the code that wrote them, free of
machine paths, and no per-cell or per-point caches in git; the suites form a package that runs as
``python -m benchmarks.<suite>`` without editing ``sys.path``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # on sys.path (tests/conftest.py): `benchmarks`

CACHE_DIRS = ("cells", "points", "rows", "tsv", "models")
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:home|Users|root|tmp|private|mnt)/")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def test_portable_rewrites_absolute_paths_only():
    from benchmarks.harness import REPO as repo
    from benchmarks.harness import portable

    other = "/elsewhere/checkout/benchmarks/results/cure_mnist/ibp-linf/checkpoint.pt"
    keep = "linf:2/255 under l∞/l2/l1 (s)/image, see https://example.org/a/b and /proc/self/statm"
    data = {
        "inside": str(repo / "benchmarks" / "results" / "x" / "results.json"),
        "sibling": [str(repo.parent / "shared" / "data"), other],
        "text": f"row fine-tunes {other}; run that row first",
        "keep": keep,
        "elsewhere": "/var/tmp/pytest-7/run/model.pt",
        "number": 3,
    }
    assert portable(data) == {
        "inside": "benchmarks/results/x/results.json",
        "sibling": ["../shared/data", "benchmarks/results/cure_mnist/ibp-linf/checkpoint.pt"],
        "text": "row fine-tunes benchmarks/results/cure_mnist/ibp-linf/checkpoint.pt; run that row "
        "first",
        "keep": keep,
        "elsewhere": "model.pt",
        "number": 3,
    }


def test_save_summary_stamps_the_commit_and_drops_machine_paths(tmp_path: Path):
    from benchmarks.harness import save_summary

    head = _git("rev-parse", "HEAD")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    save_summary(tmp_path / "s.json", {"commit": "stale", "model": str(REPO / "m" / "c.pt")})
    saved = json.loads((tmp_path / "s.json").read_text())
    assert list(saved) == ["commit", "dirty", "model"]
    assert saved["commit"] == head.stdout.strip() and isinstance(saved["dirty"], bool)
    assert saved["model"] == "m/c.pt"
    save_summary(tmp_path / "s.md", f"checkpoint `{REPO / 'm' / 'c.pt'}`.\n")
    assert (tmp_path / "s.md").read_text() == "checkpoint `m/c.pt`.\n"


def test_committed_results_hold_no_caches_and_no_machine_paths():
    listed = _git("ls-files", "benchmarks/results")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = listed.stdout.split()
    caches = [f for f in files if set(Path(f).parts[2:-1]) & set(CACHE_DIRS)]
    assert not caches, f"caches are committed (git rm -r --cached them): {caches[:5]}"
    here = f"{REPO.parent}/"
    bad = []
    for f in files:
        if Path(f).suffix in (".json", ".jsonl", ".md", ".csv"):
            text = (REPO / f).read_text()
            if here in text or MACHINE_PATH.search(text):
                bad.append(f)
    assert not bad, (
        f"machine paths in committed results (write them with benchmarks.harness.save_summary): {bad[:5]}"
    )


def test_suites_run_as_modules_without_sys_path_edits():
    from benchmarks.harness import SUITES

    sources = {p.stem: p.read_text() for p in (REPO / "benchmarks").glob("*.py")}
    assert not [name for name, text in sources.items() if "sys.path" in text]
    for suite in SUITES.values():
        module = suite.target.split(":")[0].removeprefix("benchmarks.")
        assert 'if __name__ == "__main__":' in sources[module], module


def test_every_cure_training_row_has_a_valid_config(tmp_path):
    """Each row of the CURE suites (the paper's tables included) builds a TrainConfig the library
    accepts, on both datasets' full settings, so a long run never stops at a later row's options."""
    from benchmarks import cure_training as suite

    for dataset, pairs in suite.PAIRS.items():
        for pair in pairs:
            s = suite.settings(False, dataset, pair)
            for row in suite.ROWS:
                cfg = suite.row_config(row, s, tmp_path, None, 1.0, 0)
                assert cfg.method, row
                assert (cfg.eps_linf, cfg.eps_l2) == s["eps"], row
    for table in suite.TABLES.values():
        assert set(table) <= set(suite.ROWS)
