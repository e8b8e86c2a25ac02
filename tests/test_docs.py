"""The documentation stays true to the code: every ``gpt2lab`` command shown in a code block of README.md or
docs/*.md is accepted by the real command-line parser (nothing is run), every relative link in README.md and
docs/**/*.md points at a file (and, from README.md and docs/*.md, at a heading that exists), and the documented
study command writes into a fresh, git-ignored folder rather than over the committed report in docs/study."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from gpt2lab.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMMAND_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}  # unlabelled blocks hold output and schematics


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """The block's lines, with backslash continuations joined."""
    lines, current = [], ""
    for raw in body.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return [line for line in lines if line.strip()]


def gpt2lab_arguments(line: str) -> list[list[str]]:
    """The arguments of each gpt2lab invocation on a shell line: ``gpt2lab ...``, ``.venv/bin/gpt2lab ...``,
    ``VAR=x gpt2lab ...`` and ``torchrun/python ... -m gpt2lab ...``, in any segment of ``&&``, ``|`` or ``;``."""
    if not re.search(r"(^|[\s/])gpt2lab\b", line):
        return []
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # not shell: program output or a file listing in an unlabelled block
        if re.match(r"^\s*(\S*/)?gpt2lab\s", line):
            raise
        return []
    found, segment = [], []
    for token in [*tokens, "&&"]:
        if token not in ("&&", "||", "|", ";"):
            segment.append(token)
            continue
        words = [w for w in segment if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)] if segment else []
        if words and re.fullmatch(r"(\S*/bin/)?gpt2lab", words[0]):
            found.append(words[1:])
        elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "gpt2lab":
            found.append(words[words.index("-m") + 2 :])
        segment = []
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every gpt2lab command in a shell code block of README.md and docs/*.md."""
    commands = []
    for doc in COMMAND_DOCS:
        for language, body in code_blocks(doc.read_text(encoding="utf-8")):
            if language in SHELL_LANGUAGES:
                for line in shell_lines(body):
                    for args in gpt2lab_arguments(line):
                        commands.append((f"{doc.relative_to(ROOT)}: {line.strip()}", args))
    return commands


def parse(args: list[str]):
    """The parser's namespace for ``args``, or pytest.fail with argparse's own message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"gpt2lab {shlex.join(args)}: {stderr.getvalue().strip()}")


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    """The extraction itself works: the README's two commands are found, and most subcommands are shown."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shell = [body for language, body in code_blocks(readme) if language in SHELL_LANGUAGES]
    assert any("bash scripts/setup.sh && .venv/bin/gpt2lab demo\nbash scripts/test.sh\n" in b for b in shell)
    shown = {args[0] for _, args in COMMANDS if args}
    assert {
        "demo",
        "generate",
        "prepare",
        "train",
        "plan",
        "eval",
        "harness",
        "study",
        "info",
        "serve",
        "export",
    } <= shown
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses(where, args):
    parse(args)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(text):
        slug = github_slug(heading)
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("doc", LINK_DOCS, ids=[str(d.relative_to(ROOT)) for d in LINK_DOCS])
def test_every_relative_link_resolves(doc):
    checks_anchors = doc in COMMAND_DOCS
    problems = []
    for target in relative_links(doc):
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and checks_anchors and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{target}: no heading with that anchor in {name}")
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def git_ignored_roots() -> set[str]:
    """Top-level folders .gitignore excludes (``/runs/``): nothing committed lives there."""
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    return {line.strip("/") for line in lines if re.fullmatch(r"/[^/*]+/", line.strip())}


def test_the_documented_study_command_writes_into_a_fresh_folder():
    studies = [(where, parse(args)) for where, args in COMMANDS if args[:1] == ["study"]]
    assert any(where.startswith("README.md") for where, _ in studies)
    ignored = git_ignored_roots()
    assert "runs" in ignored
    for where, namespace in studies:
        out = Path(namespace.out)
        assert not out.is_absolute() and ".." not in out.parts, where
        # a git-ignored folder, or a new one (the GPU suite's chunks are committed as they finish):
        # never a folder the checkout already holds, such as the committed report in docs/study
        fresh = out.parts[0] in ignored or not (ROOT / out).exists()
        assert fresh, f"{where}: --out {out} is in the checkout already and not in a git-ignored folder"


# Paths the docs name in prose or code; a file a reader is told to create is not expected to exist.
REPO_PATH = re.compile(
    r"\b(src/gpt2lab/[\w/]+\.py|tests/[\w/]+\.py|benchmarks/\w+\.py|scripts/[\w-]+\.sh|configs/[\w/-]+\.toml"
    r"|notebooks/\w+\.ipynb)"
)
EXAMPLE_FILES = {"configs/mine.toml"}


@pytest.mark.parametrize("doc", COMMAND_DOCS, ids=[str(d.relative_to(ROOT)) for d in COMMAND_DOCS])
def test_every_source_file_the_docs_name_exists(doc):
    named = set(REPO_PATH.findall(doc.read_text(encoding="utf-8"))) - EXAMPLE_FILES
    assert not sorted(p for p in named if not (ROOT / p).exists()), doc.relative_to(ROOT)
