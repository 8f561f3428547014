"""report.json / report.md / plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresscnn.runs.report import collect_versions, render_markdown, to_json, write_report


def _report() -> dict:
    return {
        "baseline": {"top1": 76.13, "top5": 92.862, "params": 25_557_032, "macs": 4_089_184_256},
        "compressed": {"top1": 70.5, "top5": 89.0, "agreement": 81.25, "params": 12_000_000, "macs": 2_000_000_000,
                       "disagreements_near_tie": 63.157},
        "finetuned": {"top1": 75.0, "top5": 92.0, "agreement": 90.5, "params": 12_000_000, "macs": 2_000_000_000},
        "onnx": {"path": Path("/runs/x/model.onnx"), "bytes": 48_000_000, "max_abs_diff": 2.3e-6,
                 "opset": 18, "exporter": "dynamo",
                 "verify": {"onnxruntime": {"max_abs_diff": 2.3e-6, "rel_l2": 1.1e-6},
                            "openvino": {"max_abs_diff": 3.25e-6, "rel_l2": 1.4e-6}},
                 "folded": {"batchnorms": 20, "gathers": 8}},
        "layers": [
            {"name": "layer1.0.conv2", "type": "Conv2d", "method": "tucker2", "rank": (16, 24),
             "params_before": 36864, "params_after": 9000, "macs_before": 115_605_504,
             "macs_after": 28_000_000, "rel_error": 0.1234567, "skipped": None},
            {"name": "fc", "type": "Linear", "method": None, "rank": None, "params_before": 2_049_000,
             "params_after": 2_049_000, "macs_before": 2_048_000, "macs_after": 2_048_000,
             "rel_error": None, "skipped": "excluded by rule | 3"},
        ],
        "timings": {"report": 0.5, "finetune": 120.0, "plan": 1.25, "custom_stage": 3.0},
        "latency": {"baseline": {"torch": {"median_ms": 12.5, "p10_ms": 12.0, "p90_ms": 14.0, "runtime": "torch",
                                           "threads": 1, "batch": 1}},
                    "finetuned": {"onnxruntime": {"median_ms": 6.0, "p10_ms": 5.5, "p90_ms": 7.0,
                                                  "runtime": "onnxruntime", "threads": 1, "batch": 1}}},
        "recipe": Path("recipes/resnet50.yaml"),
        "finetune": {"steps": 100, "images_per_s": 512.345, "final_loss": float("nan")},
        "date": "2025-01-01T00:00:00+00:00",
        "versions": collect_versions(),
        "machine": {"platform": "Linux", "cpu_count": 2, "torch_threads": 2},
    }


def test_write_report_files_and_json(tmp_path):
    write_report(tmp_path / "run", _report())
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["latency.png", "layers.png", "report.json", "report.md"]
    data = json.loads((run / "report.json").read_text())
    for key in ("baseline", "compressed", "finetuned", "onnx", "layers", "timings", "versions",
                "latency", "recipe", "finetune", "date", "machine"):
        assert key in data
    assert set(data["versions"]) >= {"python", "torch", "torchvision", "onnx", "onnxruntime",
                                     "tensorly", "timm", "compresscnn"}
    assert data["layers"][0]["rank"] == [16, 24]
    assert data["onnx"]["path"] == "/runs/x/model.onnx"
    assert data["finetune"]["final_loss"] is None  # NaN is not JSON
    text = (run / "report.json").read_text()
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    for png in ("layers.png", "latency.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_tables_and_determinism(tmp_path):
    rep = _report()
    md = render_markdown(rep)
    assert md == render_markdown(json.loads(to_json(rep)))  # dict and file agree
    write_report(tmp_path, rep, plots=False)
    assert (tmp_path / "report.md").read_text() == md
    assert not (tmp_path / "layers.png").exists()
    assert "| Stage | Top-1 % | Top-5 % | Agreement % |" in md
    assert "| baseline | 76.13 | 92.86 | — | 25.56 M | 4.09 G | 1.00× | 1.00× |" in md
    assert "| finetuned | 75.00 | 92.00 | 90.50 | 12.00 M | 2.00 G | 2.13× | 2.04× |" in md
    assert "`layer1.0.conv2` | Conv2d | tucker2 | (16, 24) |" in md
    assert ("the share on which the baseline's two largest probabilities are within 0.05 of each "
            "other (decisions it makes by a hair, which small changes flip): compressed 63.16%."
            ) in md  # only the stage that recorded it
    assert "excluded by rule \\| 3" in md  # pipes escaped
    assert ("Runtimes, max abs diff against PyTorch (relative L2 error): onnxruntime 2.3e-06 "
            "(1.1e-06), openvino 3.2e-06 (1.4e-06).") in md
    assert "Folded before export: 20 BatchNorm(s) into the convs before them, 8 Fire" in md
    for section in ("## ONNX", "## Layers", "## Latency", "## Stage timings", "## Versions", "## Fine-tuning"):
        assert section in md
    # timings in pipeline order, unknown stages last
    assert md.index("| plan |") < md.index("| finetune |") < md.index("| report |") < md.index("| custom_stage |")


def test_skipped_stages_render(tmp_path):
    rep = {"baseline": {"top1": 50.0, "top5": None, "params": 10, "macs": None}, "compressed": None}
    md = render_markdown(rep)
    assert "| compressed | — | — | — | — | — | — | — | — |" in md
    assert "two largest probabilities" not in md  # nothing recorded, nothing said
    write_report(tmp_path, rep)
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"date", "versions", "machine"} <= set(data)
    assert not (tmp_path / "layers.png").exists()  # nothing to plot


def test_unserialisable_value_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="report.json"):
        write_report(tmp_path, {"baseline": object()})
    assert list(tmp_path.iterdir()) == []


def test_latency_as_list_of_rows(tmp_path):
    rep = {"latency": [
        {"model": "baseline", "runtime": "torch", "batch": 1, "threads": 1, "median_ms": 3.0, "p10_ms": 2.5, "p90_ms": 4.0},
        {"model": "compressed", "runtime": "torch", "batch": 8, "threads": 1, "median_ms": 9.0, "p10_ms": 8.0, "p90_ms": 11.0},
    ]}
    md = render_markdown(rep)
    assert "| baseline | torch | 1 | 1 | 3.00 | 2.50 | 4.00 |" in md
    assert "| compressed | torch | 1 | 8 | 9.00 | 8.00 | 11.00 |" in md
    write_report(tmp_path, rep)
    assert (tmp_path / "latency.png").is_file()


def test_utils_timer_and_atomic_write(tmp_path):
    from compresscnn.util.common import Timer, atomic_write_text

    timings: dict = {}
    with Timer("a", timings):
        pass
    with Timer(timings, "a") as t:  # either argument order
        pass
    assert set(timings) == {"a"} and timings["a"] >= t.seconds >= 0
    atomic_write_text(tmp_path / "x.txt", "hello")
    with pytest.raises(ZeroDivisionError):
        from compresscnn.util.common import atomic_path

        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            1 / 0
    assert (tmp_path / "x.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_data_aware_fit_section():
    fit = {"output_error_data_free": 0.25, "output_error": 0.125, "fit_seconds": 0.5,
           "fit_solver": "closed_form", "fit_iters": 100}
    rep = {"layers": [{"name": "layer1.0.conv1", "rank": [8], "fit": fit},
                      {"name": "layer1.0.conv2", "rank": None, "fit": {}}],
           "calibration": {"solver": "closed_form", "seconds": 3.25, "forward_passes": 2,
                           "walk": "lockstep", "layers": 2,
                           "dense_refitted": {"linear": {**fit, "fit_iters": 0}}}}
    md = render_markdown(rep)
    assert "## Data-aware fit" in md
    assert "3.25 s in all, 2 forward passes" in md
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    fitted = [r for r in rows if "closed_form" in r]
    assert [r.split("|")[1].strip() for r in fitted] == ["`layer1.0.conv1`", "`linear`"]
    assert "| 0.25 | 0.125 | 0.50 |" in fitted[0]
    assert "## Data-aware fit" not in render_markdown({"layers": rep["layers"]})


def test_each_warning_is_written_once_before_the_run_facts():
    rep = {**_report(), "warnings": ["the fine-tuned model is worse"]}
    lines = render_markdown(rep).splitlines()
    hits = [i for i, line in enumerate(lines) if line.startswith("> **Warning:**")]
    assert len(hits) == 1 and hits[0] == 2
    assert lines.index(next(x for x in lines if x.startswith("- Date:"))) > hits[0]
