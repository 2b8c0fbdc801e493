"""The README's Python snippet runs (after ``make demo``; here on a stand-in checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

from cure_lirpa.data import dataset_info
from cure_lirpa.io.checkpoint import atomic_torch_save, make_checkpoint
from cure_lirpa.models import build_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    info = dataset_info("sample")  # the checkpoint `make demo` writes: cnn-small on the sample
    model = build_model("cnn-small", info.in_shape, 10, info.mean, info.std, width=4)
    ckpt = make_checkpoint(model.eval(), "cnn-small", info, {"method": "natural"}, {"width": 4})
    atomic_torch_save(ckpt, tmp_path / "runs" / "demo" / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["linf:0.1", "l2:0.5"]
    assert all(re.fullmatch(r"\S+ certified \d+\.\d%", line) for line in lines)
