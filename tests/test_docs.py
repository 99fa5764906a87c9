"""The README and docs/ stay true to themselves: every relative link resolves, the README fits
on a screen and holds exactly the two set-up commands.

A link is ``[text](target)`` or ``![alt](target)`` outside code; ``target`` is a file relative
to the document (it must exist) with an optional ``#anchor``, or ``#anchor`` alone (the same
document). An anchor must be the GitHub slug of a heading of the target.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 200
SETUP_HEADING = "## Two commands on a fresh machine"
SETUP_COMMANDS = [
    "bash pipeline/demo.sh",
    "python3 -m pip install -e '.[test]' && python3 -m pytest -q",
]

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before numbering repeats)."""
    text = _INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeats numbered -1, -2 as GitHub does."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code in a markdown file."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken_links(path: Path, *, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``path`` that does not resolve (paths shown from ``root``)."""
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        where = f"{path.relative_to(root)}:{number}: {target}"
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{where} (no file {file_part})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading #{anchor} in {dest.relative_to(root)})")
        elif anchor and dest.suffix != ".md":
            broken.append(f"{where} (an anchor into a file that is not markdown)")
    return broken


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    assert links(path), f"{path.name} has no link at all"
    assert broken_links(path) == []


def test_every_doc_links_back_to_the_readme():
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), f"{path.name}: starts with a one-line title"
        head = "\n".join(lines[:4])
        assert "](../README.md)" in head, f"{path.name}: links back to README.md at the top"


def test_the_readme_links_every_doc():
    targets = {target.partition("#")[0] for _, target in links(README)}
    assert {f"docs/{path.name}" for path in DOCS} <= targets


def test_readme_fits_on_a_screen():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES}"


def test_readme_holds_exactly_the_two_setup_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(SETUP_HEADING)
    opening = next(i for i in range(start, len(lines)) if _FENCE.match(lines[i]))
    closing = next(i for i in range(opening + 1, len(lines)) if _FENCE.match(lines[i]))
    block = [line.split("  #")[0].strip() for line in lines[opening + 1 : closing]]
    assert [line for line in block if line] == SETUP_COMMANDS


def test_the_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A title\n\n## Second `part`: here\n", "utf-8")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Top\n\n[ok](docs/a.md#second-part-here) [ok](#top) ![img](docs/a.md)\n"
        "[gone](docs/b.md) [bad](docs/a.md#third) [self](#nowhere)\n"
        "`[code](not/checked.md)`\n```\n[fenced](not/checked.md)\n```\n",
        "utf-8",
    )
    assert [line.split(": ", 1)[1] for line in broken_links(doc, root=tmp_path)] == [
        "docs/b.md (no file docs/b.md)",
        "docs/a.md#third (no heading #third in docs/a.md)",
        "#nowhere (no heading #nowhere in README.md)",
    ]
