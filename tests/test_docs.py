"""Every documentation reference points at a file that a user of the repository has.

Users see the repository, nothing beside it: no reference to notes kept outside it (the study protocol and Ray
notes the docs were written from now live in docs/study-protocol.md and docs/ray.md), and every `docs/*.md`
named in the README, the docs, the code or a search space exists.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "semimed", "search_spaces", "configs")
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".txt", ".toml"}
# Files kept outside the repository while it was written: a reference to one is a dead link for every user.
OUTSIDE = re.compile(r"STUDY_PROTOCOL(\.md)?|RAY_NOTES(\.md)?|ARCHITECTURE\.md|\.\./shared")
DOC_LINK = re.compile(r"docs/[A-Za-z0-9_.-]+\.md")


def _files() -> list[Path]:
    out = []
    for name in SCANNED:
        path = REPO / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [
                p for p in sorted(path.rglob("*")) if p.suffix in SUFFIXES and "__pycache__" not in p.parts
            ]
    return out


def _hits(pattern: re.Pattern) -> list[tuple[str, int, str]]:
    hits = []
    for path in _files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in pattern.finditer(line):
                hits.append((str(path.relative_to(REPO)), number, match.group(0)))
    return hits


def test_scan_reaches_the_files_it_should():
    names = {str(p.relative_to(REPO)) for p in _files()}
    assert {"README.md", "docs/study-protocol.md", "docs/ray.md", "semimed/cli/__init__.py"} <= names
    assert any(n.startswith("search_spaces/") for n in names)


def test_no_reference_to_notes_outside_the_repository():
    found = [f"{path}:{line}: {text}" for path, line, text in _hits(OUTSIDE)]
    assert not found, "references to files users do not have:\n" + "\n".join(found)


def test_every_docs_link_exists():
    missing = [
        f"{path}:{line}: {link}" for path, line, link in _hits(DOC_LINK) if not (REPO / link).is_file()
    ]
    assert not missing, "links to docs that do not exist:\n" + "\n".join(missing)


def test_the_docs_the_readme_promises_exist_and_say_what_they_should():
    protocol = (REPO / "docs" / "study-protocol.md").read_text()
    # Code and search spaces cite its rules by number (rule 5: steps, rule 7: val labels, rule 10: anchors).
    for number in range(1, 11):
        assert re.search(rf"^## {number}\. ", protocol, re.MULTILINE), f"rule {number}"
    for phrase in ("Patient-disjoint", "matched supervised control", "paired", "val_policy", "seeds"):
        assert phrase in protocol, phrase
    ray = (REPO / "docs" / "ray.md").read_text()
    for phrase in ("TorchTrainer", "sweep.log", "TBXLoggerCallback", "reuse_actors", "prepare_data_loader"):
        assert phrase in ray, phrase
