"""A strong attack on every certified image of finished benchmark rows (a soundness check).

The certification benchmarks run a 20-step PGD beside every certificate. This script attacks each
image a row's ``verify/samples.csv`` marks as certified under a threat again, far harder: the
package's PGD (:func:`cure_lirpa.attacks.pgd`) with ``--steps`` steps and ``--restarts`` random
restarts, once with the margin loss and once with cross-entropy, under the same threat. Any image it
breaks is a wrong certificate. Writes ``<row>/verify/reattack.json`` (per threat: certified images,
broken images and their indices, the attack's settings) and prints one line per row and threat::

    python -m benchmarks.reattack benchmarks/results/cure_mnist_blocks/sabr-linf+shi-ctrain
    python -m benchmarks.reattack benchmarks/results/cure_cifar10/* --steps 500 --restarts 10
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from benchmarks.harness import data_root_option, save_summary
from cure_lirpa.attacks import pgd
from cure_lirpa.data import load_dataset
from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint
from cure_lirpa.threats.base import parse_threat
from cure_lirpa.verification.results import read_samples


def certified_images(samples_csv: Path) -> dict[str, list[tuple[int, int]]]:
    """Per threat of ``samples.csv`` (e.g. ``linf:0.1``): the (index, label) of every image
    certified under it by any bound method (the row's best-of flag)."""
    rows = read_samples(samples_csv)
    return {t: [(r.index, r.label) for r in rows if r.best(t)] for t in rows[0].robust}


def attack_row(
    row: Path, data_root: str, steps: int, restarts: int, batch: int, seed: int
) -> dict[str, dict]:
    """Attack the certified images of ``row``; returns per threat {certified, broken, ...}."""
    ckpt = load_checkpoint(row / "checkpoint.pt")
    model = model_from_checkpoint(ckpt).eval()
    dataset = json.loads((row / "config.json").read_text())["config"]["dataset"]
    test = load_dataset(dataset, "test", root=data_root)
    out: dict[str, dict] = {}
    for threat_text, images in certified_images(row / "verify" / "samples.csv").items():
        threat = parse_threat(threat_text)
        gen = torch.Generator().manual_seed(seed)
        broken: list[int] = []
        t0 = time.perf_counter()
        for k in range(0, len(images), batch):
            part = images[k : k + batch]
            x = torch.stack([test[i][0] for i, _ in part])
            y = torch.tensor([int(test[i][1]) for i, _ in part])
            if [lab for _, lab in part] != y.tolist():
                raise click.ClickException(f"{row}: samples.csv labels differ from the test split")
            robust = torch.ones(len(part), dtype=torch.bool)
            for loss in ("margin", "ce"):
                x_adv = pgd(model, x, y, threat, steps, restarts, loss=loss, generator=gen)
                with torch.no_grad():
                    robust &= model(x_adv).argmax(1) == y
            broken += [i for (i, _), ok in zip(part, robust.tolist()) if not ok]
        out[threat_text] = {
            "certified": len(images),
            "broken": len(broken),
            "broken_indices": broken,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


@click.command()
@click.argument("rows", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--restarts", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@data_root_option(help="Folder holding the rows' dataset.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def main(
    rows: tuple[str, ...],
    steps: int,
    restarts: int,
    batch: int,
    seed: int,
    data_root: str,
    threads: int,
) -> None:
    """Attack every certified image of each ROW folder (checkpoint.pt, verify/samples.csv)."""
    torch.set_num_threads(threads)
    total = 0
    for row in map(Path, rows):
        if not (row / "checkpoint.pt").is_file() or not (row / "verify/samples.csv").is_file():
            click.echo(f"{row}: skipped (no checkpoint.pt or verify/samples.csv)", err=True)
            continue
        result = attack_row(row, data_root, steps, restarts, batch, seed)
        settings = {"steps": steps, "restarts": restarts, "losses": ["margin", "ce"], "seed": seed}
        save_summary(row / "verify" / "reattack.json", {"attack": settings, "threats": result})
        for t, r in result.items():
            total += r["broken"]
            click.echo(
                f"{row.name} {t}: {r['certified']} certified, {r['broken']} broken "
                f"({r['seconds']} s)"
            )
    if total:
        raise click.ClickException(f"{total} certified image(s) broken: wrong certificates")


if __name__ == "__main__":
    main()
