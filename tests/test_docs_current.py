"""Generated documentation is current: the CLI reference equals the commands' help, and every
results section of the docs equals the fragment its benchmark suite last wrote."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location(
        "make_cli", REPO / "docs" / "make_cli_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "cli.md").read_text() == module.reference(), (
        "docs/cli.md is stale: run python docs/make_cli_reference.py"
    )


@pytest.mark.parametrize("page", ["benchmarks.md", "results.md", "scaling-out.md"])
def test_results_sections_are_current(page):
    from benchmarks.__main__ import filled_text

    path = REPO / "docs" / page
    assert path.read_text() == filled_text(path, quiet=True), (
        f"docs/{page} is stale: run python -m benchmarks docs"
    )
