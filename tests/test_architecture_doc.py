"""The worked examples of docs/architecture.md run as written (adding a pattern, adding a kernel)."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_document_has_its_two_worked_examples():
    assert len(EXAMPLES) == 2
    assert "patterns.register" in EXAMPLES[0] and "run_kernel" in EXAMPLES[1]


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=["add-a-pattern", "add-a-kernel"])
def test_worked_example_runs(index):
    # the stand-in reads a kernel's source to check the NKI subset: give it the example's lines
    filename = f"{DOC.name}:example{index}"
    linecache.cache[filename] = (len(EXAMPLES[index]), None, EXAMPLES[index].splitlines(True), filename)
    exec(compile(EXAMPLES[index], filename, "exec"), {"__name__": "example"})


def test_the_readme_pipeline_table_names_every_file_of_the_package_once():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("| step | file") : readme.index("Found today on tiny random models")]
    named = re.findall(r"`([\w/]+\.py)`", table)
    # ``rules.py`` etc. are named inside their folder's row: resolve them against that folder
    resolved = []
    for row in table.splitlines():
        folder = re.search(r"\(in `([\w/]+)/`\)", row)
        for name in re.findall(r"`([\w/]+\.py)`", row):
            resolved.append(f"{folder.group(1)}/{name}" if folder and "/" not in name else name)
    package = sorted(str(p.relative_to(root / "neuronmm_fx")) for p in (root / "neuronmm_fx").rglob("*.py"))
    assert named and sorted(resolved) == package
