"""The README's layout section names every part of the tree, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fedcrm"
# What a checkout may hold besides the repository's own folders (.gitignore): never part of the layout.
NOT_THE_TREE = {"__pycache__", "build", "data", "runs", "state"}


def _layout() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]


def _folders(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_THE_TREE and not p.name.endswith(".egg-info")
    )


def test_every_module_and_folder_of_the_tree_is_in_the_layout() -> None:
    words = set(re.findall(r"\w+(?:\.py)?", _layout()))
    expected = [p.name for p in _folders(REPO)]
    expected += [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    expected += [p.name for p in _folders(PACKAGE)]
    # Modules of the library's subpackages by name (commands/ is the CLI's: named as a whole).
    expected += [
        p.stem
        for sub in _folders(PACKAGE)
        if sub.name != "commands"
        for p in sub.glob("*.py")
        if p.name != "__init__.py"
    ]
    expected += [p.name for p in _folders(REPO / "tests")]
    missing = sorted(set(expected) - words)
    assert not missing, f"README.md's layout section does not name {missing}"


def test_every_path_the_layout_names_exists() -> None:
    layout = _layout()
    folders = set(re.findall(r"^(\w+)/", layout, flags=re.M))
    package_parts = set(re.findall(r"^  (\w+)/", layout, flags=re.M)) | set(re.findall(r"\b(\w+\.py)\b", layout))
    gone = sorted(
        [f"{f}/" for f in folders if not (REPO / f).is_dir()]
        + [f"fedcrm/{n}" for n in package_parts if not (PACKAGE / n).exists()]
    )
    assert not gone, f"README.md's layout section names {gone}, which are not in the tree"
