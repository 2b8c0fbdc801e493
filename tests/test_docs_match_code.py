"""The docs say what the code does (issue 17, section 6; issue 18: docs/api.md's examples run).

1. Every default a doc states for a ``cure-lirpa`` option equals the option's default in the click
   definition (read from ``cure_lirpa.cli.main``: no list of options here). A default is recognised
   when written in one of these forms (write new ones the same way, or the test cannot see them):

   - `` `--opt`, default VALUE ``, `` `--opt` (default VALUE) ``, `` `--opt` (default: VALUE) ``,
     `` `--opt` defaults to VALUE ``, `` `--opt`, VALUE [words] by default ``;
   - `` `--opt VALUE`, the default ``, `` `--opt VALUE` (default) ``, ``defaults to `--opt VALUE` ``;
   - a table with a ``default`` column and options in its first column
     (`` | `--epochs`, `--lr` | 20, 1e-3 | ``: values in the order of the options);
   - a table whose header names an option (`` `--sequential` ``, `` `cure-lirpa train --method ...` ``)
     and a row whose first cell is `` `VALUE` (default) ``.

   The option is the one of the command named in the statement (`` `cure-lirpa verify --memory-mb` ``),
   else of the command the section's heading names, else of every command that has it (they must
   then agree). A numeric claim for an option whose default is computed (None) fails unless its help
   text names that number.
2. Every ``cure-lirpa ...`` command line in the code blocks of README.md and docs/*.md parses
   (option names, choices, value types); README's chain (train -> verify -> smooth train -> smooth
   certify -> smooth analyze) runs for real with small sizes added.
3. The Python examples of docs/api.md (the blocks that import something; signature blocks do not)
   run, in the folder where the README chain ran (so ``runs/nu-hybrid`` exists), with ``model`` the
   chain's trained model, ``x, y`` 8 test images and ``lb_inf, lb_2`` bounds of shape (8, 9). An
   HTML comment right above a block tells this test what to change:
   ``<!-- docs-test: OLD => NEW -->`` runs it with OLD replaced by NEW (small sizes), and
   ``<!-- docs-test: skip (reason) -->`` does not run it (data or files users make). Keep both few.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
API = REPO / "docs" / "api.md"
NOTE = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")

# ---------------------------------------------------------------------------------------- the CLI


def _main() -> click.Group:
    from cure_lirpa.cli import main

    return main


def _commands() -> dict[str, click.Command]:
    """Every command and group by its path ('' is the main group): 'train', 'smooth certify', ..."""
    out: dict[str, click.Command] = {}

    def walk(cmd: click.Command, path: str) -> None:
        out[path] = cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())

    walk(_main(), "")
    return out


def _leaves_under(path: str) -> list[str]:
    """The leaf commands at or below ``path``."""
    commands = _commands()
    return [
        p
        for p, c in commands.items()
        if not isinstance(c, click.Group) and (not path or p == path or p.startswith(path + " "))
    ]


def _option(command: str, name: str) -> Optional[click.Option]:
    for param in _commands()[command].params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


def _resolve_command(words: list[str]) -> Optional[str]:
    """The longest command path that ``words`` (after ``cure-lirpa``) start with."""
    commands, path = _commands(), ""
    for word in words:
        nxt = f"{path} {word}".strip()
        if nxt not in commands:
            break
        path = nxt
    return path or None


# --------------------------------------------------------------------------------- reading pages


@dataclass
class Block:
    page: Path
    line: int  # line of the opening fence
    lang: str
    body: str
    notes: list[str]  # the docs-test comments right above it

    @property
    def skip(self) -> bool:
        return any(note.startswith("skip") for note in self.notes)

    def shrunk(self) -> str:
        """The body with each ``OLD => NEW`` note applied (each OLD must occur)."""
        body = self.body
        for note in self.notes:
            if "=>" in note:
                old, new = (part.strip() for part in note.split("=>", 1))
                assert old in body, f"{self.page.name}:{self.line}: stale docs-test note {note!r}"
                body = body.replace(old, new)
        return body


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        start, j = i, i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        notes, k = [], start - 1
        while k >= 0 and (not lines[k].strip() or NOTE.match(lines[k])):
            if lines[k].strip():
                notes.insert(0, NOTE.match(lines[k]).group(1))
            k -= 1
        out.append(Block(page, start + 1, m.group(1), "\n".join(lines[start + 1 : j]), notes))
        i = j + 1
    return out


def _prose(page: Path) -> list[tuple[int, str, str]]:
    """(line, text, context command) for each line outside code blocks and HTML comments; the
    context is the last command named by the current heading or one above it."""
    out, fence, contexts = [], False, {}
    text = re.sub(
        r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), page.read_text(), flags=re.S
    )
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        heading = re.match(r"^(#+)\s", line)
        if heading:
            level = len(heading.group(1))
            contexts = {k: v for k, v in contexts.items() if k < level}
            named = _commands_in(line)
            if named:
                contexts[level] = named[-1][1]
        context = contexts[max(contexts)] if contexts else ""
        out.append((n, line, context))
    return out


def _commands_in(text: str) -> list[tuple[int, str]]:
    """(position, command path) of each ``cure-lirpa CMD`` named in ``text``."""
    out = []
    for m in re.finditer(r"cure-lirpa((?:\s+[a-z][a-z-]*)+)", text):
        path = _resolve_command(m.group(1).split())
        if path:
            out.append((m.start(), path))
    return out


def _statements(page: Path) -> list[tuple[int, str, str]]:
    """Prose split into statements (sentences and ';' clauses of a paragraph or list item), with
    the line they start on and their context command; table rows are left out."""
    out: list[tuple[int, str, str]] = []
    para: list[tuple[int, str, str]] = []

    def flush() -> None:
        if para:
            text = " ".join(t.strip() for _, t, _ in para)
            for part in re.split(r"(?<=[.!?])\s+(?=[A-Z(`*])|;\s+", text):
                out.append((para[0][0], part, para[0][2]))
            para.clear()

    for n, line, context in _prose(page):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|")):
            flush()
            continue
        if re.match(r"^([-*]|\d+\.)\s", stripped):
            flush()
        para.append((n, line, context))
    flush()
    return out


def _tables(page: Path) -> list[tuple[int, list[str], list[tuple[int, list[str]]], str]]:
    """(line, header cells, [(line, row cells)], context command) of each table."""
    out, current = [], None
    for n, line, context in _prose(page):
        stripped = line.strip()
        if stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if current is None:
                current = (n, cells, [], context)
                out.append(current)
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                current[2].append((n, cells))
        else:
            current = None
    return out


# ------------------------------------------------------------------------- defaults stated in docs

OPTION = r"-{1,2}[A-Za-z][\w-]*"
MENTION = re.compile(r"`(?:cure-lirpa((?: [a-z][a-z-]*)*) )?(" + OPTION + r")(?:[ =]([^`]+))?`")
NUMBER = re.compile(r"[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?(?:/\d+)?", re.I)
GROUP_GAP = re.compile(r"^\s*(?:,|/|->|and|or)?\s*$")


@dataclass
class Claim:
    page: Path
    line: int
    command: Optional[str]  # named in the statement, or None
    context: str  # command of the section
    options: list[str]
    value: str  # the stated default (of each option, or the list of them in order)
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _clean(value: str) -> str:
    value = re.sub(r"\([^()]*\)", "", value)  # remarks: "0 (off)", "`cnn-small` (width 16)"
    return value.replace("`", "").replace("**", "").strip(" .,:;)=\"'")


def _claims_in_statement(page: Path, line: int, text: str, context: str) -> list[Claim]:
    mentions = list(MENTION.finditer(text))
    claims: list[Claim] = []
    i = 0
    while i < len(mentions):
        group = [mentions[i]]
        while i + 1 < len(mentions) and GROUP_GAP.match(
            text[mentions[i].end() : mentions[i + 1].start()]
        ):
            i += 1
            group.append(mentions[i])
        first, last = group[0], group[-1]
        end = mentions[i + 1].start() if i + 1 < len(mentions) else len(text)
        after, before = text[last.end() : end], text[: first.start()]
        named = [c for pos, c in _commands_in(text) if pos <= first.start()]
        command = (last.group(1) and _resolve_command(last.group(1).split())) or (
            named[-1] if named else None
        )
        inline = last.group(3)
        options = [g.group(2) for g in group]
        value = None
        m = re.match(r"^\W*(?:the\s+)?defaults?\b(?:\s+(?:to|is))?\s*:?\s*(?P<v>[^;)]*)", after)
        if m:
            stated = m.group("v")
            if inline and inline.strip() != "..." and not re.match(r"^\s*\w", stated or ""):
                value = inline  # `--device auto`, the default
            elif stated.strip():
                value = stated
        elif (
            re.search(r"defaults?\s*(?:to|is|are)?\s*[:(]?\s*$", before)
            and all(g.group(3) for g in group)
        ):  # defaults to `--batch-size 64`; the defaults (`--linf-variant ibp`, `--l2-variant ball`)
            for g in group:
                claims.append(Claim(page, line, command, context, [g.group(2)], g.group(3), text))
        else:
            m = re.match(r"^\s*[,(]\s*(?P<v>[^,;()]*?)\s+by default\b", after)
            if m:
                value = m.group("v")  # `--budget`, 30 s of bound computation by default
        if value is not None:
            claims.append(Claim(page, line, command, context, options, value, text))
        i += 1
    return claims


def _claims_in_tables(page: Path) -> list[Claim]:
    claims = []
    for line, header, rows, context in _tables(page):
        defaults = [k for k, cell in enumerate(header) if re.fullmatch(r"(?i)defaults?", cell)]
        if defaults:  # | option | default | ... |
            for n, cells in rows:
                options = [m.group(2) for m in MENTION.finditer(cells[0])]
                if options and len(cells) > defaults[0]:
                    claims.append(
                        Claim(
                            page, n, None, context, options, cells[defaults[0]], " | ".join(cells)
                        )
                    )
            continue
        for n, cells in [(line, header), *rows]:  # other tables: each cell is a statement
            for cell in cells:
                claims += _claims_in_statement(page, n, cell, context)
        named = [m for cell in header for m in MENTION.finditer(cell)]
        if len(named) != 1:
            continue
        command = _resolve_command(named[0].group(1).split()) if named[0].group(1) else None
        for n, cells in rows:  # | `VALUE` (default) | ... |
            m = re.fullmatch(r"`([^`]+)`\s*\(default\)", cells[0])
            if m:
                claims.append(
                    Claim(
                        page,
                        n,
                        command,
                        context,
                        [named[0].group(2)],
                        m.group(1),
                        " | ".join(cells),
                    )
                )
    return claims


def _claims() -> list[Claim]:
    out = []
    for page in PAGES:
        if page.name == "cli.md":  # generated from the help itself (test_docs_current)
            continue
        for line, text, context in _statements(page):
            out += _claims_in_statement(page, line, text, context)
        out += _claims_in_tables(page)
    return out


def _numbers(text: str) -> list[float]:
    out = []
    for token in NUMBER.findall(text.replace(",", " ")):
        token = token.replace("_", "")
        if "/" in token:
            a, b = token.split("/")
            out.append(float(a) / float(b))
        else:
            out.append(float(token))
    return out


def _same(param: click.Option, stated: str) -> Optional[str]:
    """None when ``stated`` agrees with the default of ``param``, else why not."""
    default = param.default
    stated = _clean(stated)
    help_text = param.help or ""
    if default is None or callable(default) or repr(default).endswith("UNSET"):
        numbers = _numbers(stated)
        if numbers and re.match(r"^[-+.\d]", stated):
            described = _numbers(" ".join(re.findall(r"(?i)default[^\]]*", help_text)))
            if not any(math.isclose(a, b) for a in numbers for b in described):
                return f"the code computes this default (help: {help_text!r})"
        choices = getattr(param.type, "choices", None)
        if choices and stated in choices:
            return f"the code has no fixed default (help: {help_text!r})"
        return None
    if isinstance(default, bool) or param.is_flag:
        if stated.lower() in ("on", "true", "yes", *param.opts):
            return None if default else "the flag is off by default"
        if stated.lower() in ("off", "false", "no", *param.secondary_opts):
            return "the flag is on by default" if default else None
        return None
    if isinstance(default, (list, tuple)):
        want = sorted(str(d).lower() for d in default)
        got = sorted(w.lower() for w in re.split(r"\s*(?:,|\band\b|\+)\s*", stated) if w)
        return None if got == want else f"the code's default is {', '.join(map(str, default))}"
    if (
        isinstance(default, (int, float))
        or _numbers(str(default))
        and re.match(r"^[-+.\d][\d.,/e+-]*$", str(default))
    ):
        want_numbers = _numbers(str(default))
        got = _numbers(stated)
        if (
            got[: len(want_numbers)]
            and all(
                math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                for a, b in zip(got[: len(want_numbers)], want_numbers)
            )
            and len(got) >= len(want_numbers)
        ):
            return None
        return f"the code's default is {default}"
    first = re.split(r"[\s,;]+", stated)[0] if stated else ""
    return None if first == str(default) else f"the code's default is {default!r}"


def _split_values(value: str, count: int) -> list[str]:
    if count == 1:
        return [value]
    cleaned = _clean(value)
    for sep in (r"\s*->\s*", r"\s*/\s*", r"\s*,\s*"):
        parts = re.split(sep, cleaned)
        if len(parts) == count:
            return parts
    if len(_numbers(cleaned)) == 1 or not re.match(r"^[-+.\d]", cleaned):
        return [value] * count  # "0 (off)" for both, or a description
    return []


def _check(claim: Claim) -> list[str]:
    errors = []
    values = _split_values(claim.value, len(claim.options))
    if not values:
        return [f"{claim.where()}: cannot pair {claim.options} with {claim.value!r}"]
    for name, value in zip(claim.options, values):
        if claim.command:  # named: that command, or the commands of that group
            targets = [c for c in _leaves_under(claim.command) if _option(c, name)]
            if not targets:
                errors.append(f"{claim.where()}: cure-lirpa {claim.command} has no {name}")
                continue
        else:
            targets = [c for c in _leaves_under(claim.context) if _option(c, name)]
            if not targets:
                targets = [c for c in _leaves_under("") if _option(c, name)]
            if not targets:
                if claim.context:
                    errors.append(f"{claim.where()}: no command has {name}")
                continue  # not a cure-lirpa option (python -m benchmarks ..., pip, torchrun)
        for command in targets:
            why = _same(_option(command, name), value)
            if why:
                errors.append(
                    f"{claim.where()}: says cure-lirpa {command} {name} defaults to "
                    f"{_clean(value)!r}, but {why}\n    {claim.text.strip()[:160]}"
                )
    return errors


def test_the_docs_state_defaults_the_checker_reads():
    """The recognised forms find the defaults docs state (a guard against a checker that reads
    nothing): the training defaults table, the --sequential table and prose claims."""
    claims = _claims()
    found = {(c.page.name, o) for c in claims for o in c.options}
    assert len(claims) >= 15, claims
    for page, option in [
        ("training.md", "--epochs"),
        ("training.md", "--method"),
        ("smoothing.md", "--sequential"),
        ("limits.md", "--memory-mb"),
    ]:
        assert (page, option) in found, (page, option)


def test_stated_defaults_equal_the_click_defaults():
    errors = [e for claim in _claims() for e in _check(claim)]
    assert not errors, "docs contradict the code:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "right, wrong",
    [
        (
            "(`cure-lirpa verify --memory-mb`, default 4096; ",
            "(`cure-lirpa verify --memory-mb`, default 2048; ",
        ),
        (
            "`cure-lirpa train` defaults to `--batch-size 64`;",
            "`cure-lirpa train` defaults to `--batch-size 128`;",
        ),
        (
            "(`--budget`, 30 s of bound computation by default)",
            "(`--budget`, 10 s of bound computation by default)",
        ),
        (
            "`cure-lirpa train --device auto`, the default, uses",
            "`cure-lirpa train --device cpu`, the default, uses",
        ),
        (
            "the defaults (`--linf-variant ibp`, `--l2-variant ball`)",
            "the defaults (`--linf-variant ibp`, `--l2-variant defence`)",
        ),
        (
            "`cure-lirpa verify --count` defaults to every test image.",
            "`cure-lirpa verify --count` defaults to 200.",
        ),
        (
            "`cure-lirpa verify --method` defaults to IBP and CROWN-IBP.",
            "`cure-lirpa verify --method` defaults to IBP.",
        ),
        ("`cure-lirpa smooth --threads` (default 1)", "`cure-lirpa smooth --threads` (default 2)"),
    ],
)
def test_a_stated_default_is_read_and_a_wrong_one_fails(right, wrong):
    page = REPO / "docs" / "training.md"
    for text, ok in ((right, True), (wrong, False)):
        claims = _claims_in_statement(page, 1, text, "train")
        assert claims, text
        errors = [e for claim in claims for e in _check(claim)]
        assert not errors if ok else errors, (text, errors)


def test_a_wrong_default_table_fails():
    page = REPO / "docs" / "training.md"
    right = Claim(page, 1, None, "train", ["--batch-size", "--lr"], "64, 1e-3", "")
    wrong = Claim(page, 1, None, "train", ["--batch-size", "--lr"], "128, 1e-3", "")
    unknown = Claim(page, 1, "verify", "", ["--no-such-option"], "1", "")
    assert not _check(right) and _check(wrong) and _check(unknown)


# --------------------------------------------------------------------------- documented commands

COMMAND_LINE = re.compile(
    r"^\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:\S*/)?cure-lirpa\s+(?P<a>.*)$"
    r"|\s-m\s+cure_lirpa\s+(?P<b>.*)$"
)
# small sizes added to the commands README.md runs for real (a whole documented run takes minutes)
SMALL = {
    "train": ["--epochs", "1", "--train-count", "64"],
    "verify": ["--count", "2", "--budget", "1"],
    "smooth train": ["--epochs", "1", "--train-count", "64", "--eval-count", "0"],
    "smooth certify": ["--count", "4", "--n", "200"],
    "smooth predict": ["--count", "4", "--n", "200"],
}


@dataclass
class CommandLine:
    page: Path
    line: int
    args: list[str]

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}: cure-lirpa {shlex.join(self.args)}"


def _command_lines(page: Path) -> list[CommandLine]:
    out = []
    for block in _blocks(page):
        if block.lang == "python":
            continue
        lines = block.body.split("\n")
        n = 0
        while n < len(lines):
            start, text = n, lines[n]
            while text.rstrip().endswith("\\") and n + 1 < len(lines):
                n += 1
                text = text.rstrip()[:-1] + " " + lines[n].strip()
            n += 1
            m = COMMAND_LINE.search(text)
            if not m or text.lstrip().startswith("#"):
                continue
            rest = re.sub(r"\s{2,}\(.*\)\s*$", "", m.group("a") or m.group("b"))  # help's remarks
            args = []
            for token in shlex.split(rest, comments=True):
                if token in (";", "&", "&&", "|", "||") or token.startswith(">"):
                    break
                args.append(token.rstrip(";"))
                if token.endswith(";"):
                    break
            out.append(CommandLine(page, block.line + 1 + start, args))
    return out


def _split_command(args: list[str]) -> tuple[str, list[str]]:
    """(command path, its arguments), as the click group would dispatch them."""
    args = list(args)
    if args and args[0] == "--":
        args.pop(0)
    path = ""
    while isinstance(_commands()[path], click.Group):
        if not args or f"{path} {args[0]}".strip() not in _commands():
            raise click.UsageError(f"no command {' '.join([path, *args[:1]]).strip()!r}")
        path = f"{path} {args.pop(0)}".strip()
    return path, args


def _parse(line: CommandLine) -> Optional[str]:
    """None when click accepts the line, else its error. ``...`` stands for options shown
    elsewhere: required options may then be missing. Paths need not exist here."""
    elided = "..." in line.args
    try:
        path, args = _split_command([a for a in line.args if a != "..."])
        with _commands()[path].make_context(f"cure-lirpa {path}", args) as _:
            pass
    except click.MissingParameter:
        return None if elided else "missing a required option"
    except click.BadParameter as exc:
        if isinstance(getattr(exc, "param", None) and exc.param.type, click.Path):
            return None  # a path of the example that does not exist on this machine
        return exc.format_message()
    except click.ClickException as exc:
        return exc.format_message()
    return None


def test_documented_command_lines_parse():
    lines = [c for page in PAGES for c in _command_lines(page)]
    assert len(lines) > 30, lines  # README, getting-started, training, smoothing, scaling-out, cli
    errors = [f"{c.where()}\n    {why}" for c in lines for why in [_parse(c)] if why]
    assert not errors, "documented commands click refuses:\n" + "\n".join(errors)


def test_a_wrong_command_line_fails():
    page = REPO / "README.md"
    for args in (
        ["verify", "m.pt", "--treat", "linf:0.1"],
        ["verify", "m.pt", "--method", "crown-alpha"],
        ["train", "--epochs", "two", "--out", "r"],
        ["smooth", "certify", "--sigma", "0.5", "--out", "r"],
        ["verfiy", "m.pt"],
    ):
        assert _parse(CommandLine(page, 1, args)), args


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """README.md's command lines run in order in one folder, with SMALL sizes added (and
    ``--device cpu -q`` where the command has them): (folder, [(command line, result)])."""
    from cure_lirpa.cli import main

    folder = tmp_path_factory.mktemp("readme")
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        runner = CliRunner()
        for line in _command_lines(REPO / "README.md"):
            path, _ = _split_command(line.args)
            extra = list(SMALL.get(path, []))
            extra += ["--device", "cpu"] if _option(path, "--device") else []
            extra += ["-q"] if _option(path, "-q") else []
            results.append((line, runner.invoke(main, [*line.args, *extra])))
    return folder, results


def test_readme_commands_run(readme_runs):
    folder, results = readme_runs
    assert {_split_command(line.args)[0] for line, _ in results} >= set(SMALL) - {"smooth predict"}
    for line, result in results:
        assert result.exit_code == 0, (
            f"{line.where()} (small sizes added) failed:\n{result.output}\n{result.exception!r}"
        )
    assert list(folder.glob("runs/*/verify-*/summary.json"))
    assert (folder / "runs" / "nu-report" / "summary.json").exists()


# ------------------------------------------------------------------------- docs/api.md examples


def test_api_examples_run(readme_runs, monkeypatch):
    import torch

    from cure_lirpa.data import load_dataset, stack, take
    from cure_lirpa.io.checkpoint import load_checkpoint, model_from_checkpoint

    folder, _ = readme_runs
    monkeypatch.chdir(folder)
    model = model_from_checkpoint(load_checkpoint("runs/max-ba/checkpoint.pt"))
    x, y = stack(take(load_dataset("sample", "test"), 0, 8))
    bounds = torch.Generator().manual_seed(0)
    lb_inf, lb_2 = torch.randn(8, 9, generator=bounds), torch.randn(8, 9, generator=bounds)
    blocks = [
        b
        for b in _blocks(API)
        if b.lang == "python" and re.search(r"^(from|import) ", b.body, re.M)
    ]
    skipped = [b.line for b in blocks if b.skip]
    assert len(blocks) >= 8 and len(skipped) <= 2, (len(blocks), skipped)
    for block in blocks:
        if block.skip:
            continue
        namespace = {"model": model, "x": x, "y": y, "lb_inf": lb_inf, "lb_2": lb_2}
        try:
            exec(compile(block.shrunk(), f"{API}:{block.line}", "exec"), namespace)
        except Exception as exc:  # any failure of an example is the finding
            raise AssertionError(f"docs/api.md:{block.line}: the example fails: {exc!r}") from exc


# ------------------------------------------------------------------------- module references


def _resolve(reference: str) -> bool:
    """Does ``cure_lirpa.a.b.name`` name a module or an attribute of one?"""
    import importlib

    parts = reference.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[k:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_module_references_exist():
    """Every `cure_lirpa.x.y` the docs name exists, and so does every `.name` a heading gives
    next to one (a child or a sibling of it): docs follow the code when modules move."""
    errors = []
    for page in [*PAGES, REPO / "examples" / "README.md"]:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            references = re.findall(r"`(cure_lirpa(?:\.\w+)+)", line)
            for reference in references:
                if not _resolve(reference):
                    errors.append(f"{page.relative_to(REPO)}:{n}: {reference}")
            if line.startswith("#") and references:
                base = references[0]
                for name in re.findall(r"`\.(\w+)`", line):
                    if not any(
                        _resolve(f"{parent}.{name}") for parent in (base, base.rsplit(".", 1)[0])
                    ):
                        errors.append(f"{page.relative_to(REPO)}:{n}: .{name} (next to {base})")
    assert not errors, "docs name what the code does not have:\n" + "\n".join(errors)


# ---------------------------------------------------------------- docs/api.md signature blocks


def _section_modules(page: Path, line: int) -> list[str]:
    """The modules the headings above ``line`` name (`cure_lirpa.x`, and `.y` as its child or
    sibling), nearest first, up to the enclosing '## ' heading."""
    lines, out = page.read_text().splitlines(), []
    for text in reversed(lines[: line - 1]):
        if not text.startswith("## ") and not text.startswith("### "):
            continue
        references = re.findall(r"`(cure_lirpa(?:\.\w+)*)", text)
        if references:
            base = references[0]
            out.append(base)
            for name in re.findall(r"`\.(\w+)`", text):
                out += [f"{base}.{name}", f"{base.rsplit('.', 1)[0]}.{name}"]
        if text.startswith("## "):
            break
    return [*out, "cure_lirpa"]


def _find(name: str, modules: list[str]) -> Any:
    import importlib

    for module in modules:
        try:
            value = getattr(importlib.import_module(module), name, None)
        except ModuleNotFoundError:
            continue
        if value is not None:
            return value
    return None


def _same_default(expression: str, real: Any) -> bool:
    import torch

    if repr(real) == "<factory>":  # a dataclass field's default_factory
        return True
    try:
        stated = ast.literal_eval(expression)
    except (ValueError, SyntaxError):
        try:
            stated = eval(expression, {"torch": torch, "math": math})  # e.g. torch.device("cpu")
        except Exception:  # a name of the code (print, cascade_for): compare names
            return expression.split(".")[-1] == getattr(real, "__name__", repr(real))
    if isinstance(real, (list, tuple)) and isinstance(stated, (list, tuple)):
        return list(real) == list(stated)
    return stated == real


def _signature_errors(block: Block) -> list[str]:
    errors, owner = [], None
    for m in re.finditer(r"^\s*(\.?)([A-Za-z_]\w*)\(", block.body, re.M):
        depth, j = 1, m.end()
        while j < len(block.body) and depth:
            depth += {"(": 1, ")": -1}.get(block.body[j], 0)
            j += 1
        arguments = re.sub(r"\.\.\.\s*,?", "", block.body[m.end() : j - 1])
        try:
            stated = ast.parse(f"def f({arguments}): pass").body[0].args
        except SyntaxError:
            errors.append(f"{block.line}: {m.group(2)}(...) is not a signature")
            continue
        if m.group(1):
            obj = getattr(owner, m.group(2), None) if owner is not None else None
        else:
            obj = owner = _find(m.group(2), _section_modules(block.page, block.line))
        if obj is None:
            continue  # a protocol or an object of the example, not a name of the code
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        positional = [*stated.posonlyargs, *stated.args]
        defaults = dict(zip(positional[len(positional) - len(stated.defaults) :], stated.defaults))
        defaults.update((a, d) for a, d in zip(stated.kwonlyargs, stated.kw_defaults) if d)
        for argument in [*positional, *stated.kwonlyargs]:
            where = f"docs/api.md:{block.line}: {m.group(1)}{m.group(2)}"
            if argument.arg not in parameters:
                errors.append(f"{where} has no parameter {argument.arg!r}")
            elif argument in defaults:
                real = parameters[argument.arg].default
                text = ast.unparse(defaults[argument])
                if real is inspect.Parameter.empty or not _same_default(text, real):
                    errors.append(f"{where}: {argument.arg}={text}, the code has {real!r}")
    return errors


def test_api_signatures_match_code():
    """The signature blocks of docs/api.md (Python blocks without imports) name parameters the code
    has, with the code's defaults; names the headings' modules do not define are not checked."""
    blocks = [
        b
        for b in _blocks(API)
        if b.lang == "python" and not re.search(r"^(from|import) ", b.body, re.M)
    ]
    assert len(blocks) >= 5
    errors = [e for block in blocks for e in _signature_errors(block)]
    assert not errors, "docs/api.md signatures differ from the code:\n" + "\n".join(errors)


def test_a_wrong_signature_fails():
    first = next(b for b in _blocks(API) if "BoundedClassifier(" in b.body and b.lang == "python")
    for body in (
        "BoundedClassifier(model, in_shape, memory_mb=1.0)",
        "BoundedClassifier(model, in_shape, no_such_parameter=1)",
    ):
        wrong = Block(API, first.line, "python", body, [])
        assert _signature_errors(wrong), body
    right = Block(
        API, first.line, "python", "BoundedClassifier(model, in_shape, memory_mb=4096.0)", []
    )
    assert not _signature_errors(right)
