"""Every ```python block of README.md and docs/*.md runs as pasted.

One test per file: its python blocks run in order in one shared namespace (a later block may use
names an earlier one defined), in a temporary working directory, with torch seeded and on one
thread. A block directly preceded (previous non-empty line) by ``<!-- not-run: REASON -->`` is
skipped; the reason must be given. ```bash / ```console blocks are never run. Pages added to docs/
later are picked up at collection time.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"<!--\s*not-run:(.*?)-->")
README_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[test]' && .venv/bin/python -m adaptive_sampling demo",
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[test]' && .venv/bin/python -m pytest",
)
README_MAX_LINES = 220


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the first code line
    source: str
    skip_reason: str | None  # the not-run marker's reason (may be "" when the marker is empty)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the not-run marker that precedes each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(prev)
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.name}:{start}: unclosed code fence")
        source = dedent("\n".join(lines[start:i]))
        blocks.append(Block(lang, start + 1, source, None if marker is None else marker.group(1).strip()))
        i += 1
    return blocks


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", doc_files(), ids=_id)
def test_python_blocks_run(path: Path, tmp_path, monkeypatch, capsys):
    blocks = code_blocks(path)
    name = _id(path)
    text = path.read_text(encoding="utf-8")
    # every not-run marker says why and sits right above a code block
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        assert m.group(1).strip(), f"{name}:{line}: a not-run marker needs a reason: <!-- not-run: REASON -->"
    marked = sum(b.skip_reason is not None for b in blocks)
    assert marked == len(MARKER.findall(text)), f"{name}: a not-run marker that does not directly precede a code block"
    runnable = [b for b in blocks if b.lang == "python" and b.skip_reason is None]
    if not runnable:
        pytest.skip(f"{name}: no python block to run")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from adaptive_sampling.samplers import sampler_names, unregister_sampler

    registered = set(sampler_names())  # a page may register a sampler of its own: removed afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace = {"__name__": f"docs_{path.stem}"}
    timings = []
    try:
        for i, block in enumerate(runnable):
            start = time.perf_counter()
            exec(compile(block.source, f"{name}:block{i}:line{block.line}", "exec"), namespace)
            timings.append(f"block {i} (line {block.line}): {time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(threads)
        for extra in set(sampler_names()) - registered:
            unregister_sampler(extra)
    with capsys.disabled():
        print(f"\n{name}: " + "; ".join(timings))


def test_readme_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, the front page allows {README_MAX_LINES}"
    first = code_blocks(ROOT / "README.md")[0]
    assert first.source.splitlines()[:2] == list(README_COMMANDS), "README.md's first code block must open with the two commands (.ci/run runs the second)"


def test_code_blocks_parser(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- not-run: needs weights -->\n\n```python\nraise\n```\n  ```bash\n  ls\n  ```\n")
    blocks = code_blocks(page)
    assert [(b.lang, b.line, b.source, b.skip_reason) for b in blocks] == [
        ("python", 4, "x = 1", None),
        ("python", 10, "raise", "needs weights"),
        ("bash", 13, "ls", None),
    ]
