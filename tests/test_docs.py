"""The README is the user guide and links into docs/ for the rest: every link must lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(document: Path) -> set:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _local_links(document: Path):
    """(target path, anchor or None) of every link in ``document`` that is not a web address."""
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        yield (document.parent / path if path else document), anchor or None


def test_every_link_in_the_readme_and_docs_resolves():
    broken = []
    for document in [README, *DOCS]:
        for path, anchor in _local_links(document):
            if not path.exists():
                broken.append(f"{document.name}: {path.relative_to(ROOT)} does not exist")
            elif anchor is not None and anchor not in _anchors(path):
                broken.append(f"{document.name}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_the_readme_is_a_short_guide_that_links_every_document():
    assert len(README.read_text().splitlines()) <= 250  # the measured tables and the commands; the rest lives in docs/
    linked = {path.resolve() for path, _ in _local_links(README)}
    assert {d.resolve() for d in DOCS} <= linked, "a document in docs/ the README does not link"
    for name in ("checkpoints", "design", "reliability", "performance", "configs"):
        assert (ROOT / "docs" / f"{name}.md") in DOCS


def test_the_design_note_ends_with_how_to_extend():
    design = (ROOT / "docs" / "design.md").read_text()
    last = re.findall(r"^## (.+)$", design, flags=re.M)[-1]
    assert last == "How to extend"
    extend = design.split("## How to extend", 1)[1]
    for point in ("A structure", "A size measure", "An objective", "An export format", "A checkpoint importer",
                  "The hidden dimension as a structure"):
        assert re.search(rf"^### {point}", extend, flags=re.M | re.I), point


def test_anchor_matches_githubs():
    assert _anchor("`prune inspect`") == "prune-inspect"
    assert _anchor("Walk-through: the hidden dimension as a structure (not built)") == \
        "walk-through-the-hidden-dimension-as-a-structure-not-built"
