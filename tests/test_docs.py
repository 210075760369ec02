"""README, CONTRIBUTING and docs/: every relative link and anchor resolves, and nothing cites a file
outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slugs(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (outside code fences)."""
    slugs, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in _slugs(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_nothing_cites_a_file_outside_the_repository():
    for path in [*ROOT.glob("v2drop_eval/**/*.py"), *ROOT.glob("tests/*.py"), *PAGES]:
        if path == Path(__file__):
            continue
        text = path.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, f"{path} cites a file outside the repository"
