"""The generated tables of README.md and BENCHMARKS.md match tools/results/ (run
`python tools/docs_tables.py` after adding or changing a results file)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "tools" / "docs_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _copy(tmp_path: Path) -> Path:
    """The docs, the table config and the results, in a folder of their own."""
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "tables.yaml", tmp_path / "tools" / "tables.yaml")
    shutil.copytree(REPO / "tools" / "results", tmp_path / "tools" / "results")
    for doc in ("README.md", "BENCHMARKS.md"):
        shutil.copy(REPO / doc, tmp_path / doc)
    return tmp_path


def test_docs_are_up_to_date_with_the_results():
    assert _tool().main(["--check"]) == 0, "run `python tools/docs_tables.py`"


def test_a_changed_result_is_detected_and_rewritten(tmp_path):
    tool = _tool()
    root = _copy(tmp_path)
    assert tool.main(["--check", "--root", str(root)]) == 0
    f = root / "tools" / "results" / "resnet20_cp_2x.json"
    data = json.loads(f.read_text())
    data["zero_shot_top1"] = 12.34
    f.write_text(json.dumps(data))
    assert tool.main(["--check", "--root", str(root)]) == 1
    assert "12.34" not in (root / "README.md").read_text()      # --check writes nothing
    assert tool.main(["--root", str(root)]) == 0
    assert "12.34" in (root / "README.md").read_text()
    assert "12.34" in (root / "BENCHMARKS.md").read_text()
    assert tool.main(["--check", "--root", str(root)]) == 0


def test_a_new_results_file_joins_its_table(tmp_path):
    """A ten-epoch run lands in the fine-tuning gap table, paired with its dense run."""
    tool = _tool()
    root = _copy(tmp_path)
    res = root / "tools" / "results"
    for name, top1 in (("resnet20_dense_10ep", 90.01), ("resnet20_auto_3x_10ep", 89.00)):
        base = "resnet20_dense_3ep" if "dense" in name else "resnet20_auto_3x_3ep"
        data = json.loads((res / f"{base}.json").read_text())
        data.update(job=name, epochs=10.0, top1=top1,
                    command=data["command"].replace("epochs=3", "epochs=10"))
        (res / f"{name}.json").write_text(json.dumps(data))
    assert tool.main(["--check", "--root", str(root)]) == 1
    assert tool.main(["--root", str(root)]) == 0
    text = (root / "BENCHMARKS.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `resnet20_auto_3x_10ep`"))
    assert "| 89.00 | 90.01 | 1.01 |" in row and "finetune.epochs=10" in row


def test_a_missing_marker_is_an_error(tmp_path):
    tool = _tool()
    root = _copy(tmp_path)
    doc = root / "BENCHMARKS.md"
    doc.write_text(doc.read_text().replace("<!-- table:zoo -->", ""))
    with pytest.raises(SystemExit, match="zoo"):
        tool.main(["--check", "--root", str(root)])
