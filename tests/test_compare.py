"""`compresscnn compare` on tiny random models: fields, files, accuracy sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tools import write_fake_cifar

from compresscnn.cli import main as cli_main
from compresscnn.runs.compare import CompareError, compare, parse_data_arg
from compresscnn.runs.compare_output import write_compare
from compresscnn.runs.compare_recipe import load_compare_recipe
from compresscnn.errors import CompressError

REQUIRED = ("model", "params", "macs", "onnx_bytes", "top1", "top1_source")


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("data") / "cifar.zip")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A minimal run directory as `compresscnn run` writes it (recipe.yaml, weights, report)."""
    from safetensors.torch import save_file

    from compresscnn.io.models import load_model
    from compresscnn.runs.loading import exact_rules
    from compresscnn.recipe.schema import dump_resolved, validate
    from compresscnn.core.surgery import compress

    d = tmp_path_factory.mktemp("runs") / "tiny_alex"
    d.mkdir()
    spec = "cifar:alexnet?hidden=16"
    model, p = compress(load_model(spec), [{"match": "classifier.*", "method": "svd", "rank": 4}],
                        (3, 32, 32))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    dump_resolved(validate({"model": {"spec": spec}, "rules": exact_rules(p), "output": str(d),
                            "finetune": {"enabled": False},
                            "evaluate": {"baseline": False, "zero_shot": False}}),
                  d / "recipe.yaml")
    (d / "report.json").write_text(json.dumps(
        {"compressed": {"top1": 30.0}, "finetuned": {"top1": 42.5, "top5": 90.0, "n": 100}}))
    return d


def test_compare_rows_files_and_sources(tmp_path: Path, fake_cifar: Path, run_dir: Path) -> None:
    from safetensors.torch import save_file
    from torchvision.models import get_model_weights

    from compresscnn.io.models import load_model

    w = tmp_path / "sq.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("cifar:squeezenet1_1").state_dict().items()},
              str(w))
    rows = compare(
        ["torchvision:squeezenet1_1",
         {"model": "cifar:squeezenet1_1", "weights": str(w), "label": "sq-cifar"},
         str(run_dir)],
        {"input_size": (3, 32, 32), "data": {"cifar10": {"root": str(fake_cifar)}},
         "latency_batches": (1, 2), "threads": 1, "repeats": 2, "warmup": 1},
        workdir=tmp_path / "onnx")
    assert len(rows) == 3
    for r in rows:
        for k in REQUIRED:
            assert k in r
        assert r["onnx_bytes"] and r["onnx_bytes"] > 0
        assert r["onnx_int8_bytes"] and r["onnx_int8_bytes"] < r["onnx_bytes"]
        assert "QInt8" in r["int8_method"]
        assert r["threads"] == 1
        assert {"torch_b1", "ort_b1", "torch_b2", "ort_b2"} <= set(r["latency_ms"])
    tv, measured, run = rows
    # published accuracy comes from torchvision's metadata, never from a constant here
    meta = get_model_weights("squeezenet1_1").DEFAULT.meta["_metrics"]["ImageNet-1K"]
    assert tv["top1_source"] == "published" and tv["top1"] == pytest.approx(meta["acc@1"])
    assert tv["top1_images"] == 50_000
    assert tv["params"] == 1_235_496
    assert measured["top1_source"] == "measured" and measured["accuracy"]["n"] == 20
    assert measured["top1_images"] == 20
    assert measured["model"] == "sq-cifar"
    # a run report's number is labelled as such, with its image count
    assert run["top1_source"] == "run report" and run["top1"] == 42.5 and run["kind"] == "run"
    assert run["top1_images"] == 100
    from compresscnn.io.models.alexnet_cifar import alexnet_cifar_param_count
    assert run["params"] < alexnet_cifar_param_count(10, 16)

    out = write_compare(rows, tmp_path / "out", title="tiny", json_path=tmp_path / "x.json")
    png = out["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = out["markdown"].read_text()
    assert "published" in md and "measured" in md and "QInt8" in md and "thread" in md
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in md.splitlines() if line.startswith("| ")}
    src, n = table["Model"].index("Top-1 source"), table["Model"].index("Images")
    assert (table["squeezenet1_1"][src], table["squeezenet1_1"][n]) == ("published", "50,000")
    assert (table["sq-cifar"][src], table["sq-cifar"][n]) == ("measured here", "20")
    assert (table["tiny_alex"][src], table["tiny_alex"][n]) == ("run report", "100")
    data = json.loads((tmp_path / "x.json").read_text())
    assert [d["model"] for d in data] == [r["model"] for r in rows]


def test_untrained_has_no_accuracy_and_skips(tmp_path: Path) -> None:
    rows = compare(["cifar:squeezenet1_0?sr=0.25"], {"onnx": False, "latency": False},
                   workdir=tmp_path)
    r = rows[0]
    assert r["top1"] is None and r["top1_source"] is None
    assert r["onnx_bytes"] is None and r["latency_ms"] == {}
    write_compare(rows, tmp_path / "o", title="t")
    assert (tmp_path / "o" / "compare.png").is_file()


def test_bad_entries_and_recipes(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match=r"compare\[0\]"):
        compare(["alexnet"], workdir=tmp_path)
    with pytest.raises(CompareError, match="unknown key"):
        compare([{"model": "cifar:alexnet", "wieghts": "x"}], workdir=tmp_path)
    with pytest.raises(CompareError, match=r"compare: threds: unknown key.*threads"):
        compare(["cifar:alexnet"], {"threds": 2}, workdir=tmp_path)
    with pytest.raises(CompareError, match=r"compare: runtimes\[0\]: .*tensorrt"):
        compare(["cifar:alexnet"], {"runtimes": ["tensorrt"]}, workdir=tmp_path)
    with pytest.raises(CompareError, match="DATASET=PATH"):
        parse_data_arg("imagenet")
    rec = tmp_path / "r.yaml"
    rec.write_text("compare: [cifar:alexnet]\nthreds: 2\n")
    with pytest.raises(CompareError, match="threds.*did you mean 'threads'"):
        load_compare_recipe(rec)
    rec.write_text("compare: [cifar:alexnet]\nlatency_batches: [0]\n")
    with pytest.raises(CompressError, match="latency_batches"):
        load_compare_recipe(rec)
    assert cli_main(["compare", "--recipe", str(tmp_path / "missing.yaml")]) == 2


def test_shipped_recipes_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    cfg = load_compare_recipe(root / "squeezenet_vs_alexnet_imagenet.yaml")
    assert cfg["latency_batches"] == [1, 32] and "imagenet" in cfg["data"]
    assert len(cfg["compare"]) >= 10
    from compresscnn.recipe.schema import load_recipe

    for f in sorted(root.glob("alexnet_imagenet_*.yaml")):
        assert load_recipe(f)["model"]["spec"] == "torchvision:alexnet"


def test_cli_compare(tmp_path: Path, capsys) -> None:
    rc = cli_main(["compare", "cifar:squeezenet1_1", "--no-onnx", "--no-latency", "--quiet",
                   "--out", str(tmp_path / "o"), "--json", str(tmp_path / "c.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "c.json").read_text())
    assert rows[0]["params"] == 727_626 and rows[0]["onnx_bytes"] is None
    assert (tmp_path / "o" / "compare.md").is_file() and (tmp_path / "o" / "compare.png").is_file()


def test_run_accuracy_of_a_training_run_is_its_trained_top1():
    from compresscnn.runs.compare import _run_accuracy

    rep = {"baseline": {"top1": None}, "compressed": {"top1": None},
           "trained": {"top1": 54.27, "top5": 94.63, "n": 10000}}
    assert _run_accuracy(rep)["top1"] == 54.27 and _run_accuracy(rep)["stage"] == "trained"
    rep = {"compressed": {"top1": 63.12}, "finetuned": {"top1": 63.03}}
    assert _run_accuracy(rep)["stage"] == "finetuned"
    assert _run_accuracy({"compressed": {"top1": None}}) is None


def test_a_run_brings_its_int8_file_and_accuracy(tmp_path: Path, run_dir: Path) -> None:
    """A run made with export.quantize: its own (static, calibrated) int8 file is compared,
    with the top-1 its report measured, beside the fp32 file, in each runtime asked for."""
    import importlib.util
    import shutil

    import torch

    from compresscnn.io.export import export_onnx, quantize_onnx
    from compresscnn.runs.loading import load_compressed

    run = tmp_path / "tiny_alex_int8"
    shutil.copytree(run_dir, run)
    fp32 = tmp_path / "m.onnx"
    export_onnx(load_compressed(run), fp32, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    q = quantize_onnx(fp32, run / "model.int8.onnx",
                      [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)])
    rep = json.loads((run / "report.json").read_text())
    rep["int8"] = {**q, "path": "model.int8.onnx", "top1": 41.0, "agreement": 97.0}
    (run / "report.json").write_text(json.dumps(rep))
    ov = importlib.util.find_spec("openvino") is not None
    rows = compare([str(run)], {"input_size": (3, 32, 32), "latency_batches": (1,), "threads": 1,
                                "repeats": 2, "warmup": 1,
                                "runtimes": ("torch", "onnxruntime") + (("openvino",) if ov else ())},
                   workdir=tmp_path / "onnx")
    (r,) = rows
    assert r["onnx_int8_bytes"] == q["bytes"] and "static int8" in r["int8_method"]
    assert (r["int8_top1"], r["int8_agreement"]) == (41.0, 97.0)
    assert {"ort_b1", "ort_int8_b1"} <= set(r["latency_ms"])
    if ov:
        assert {"ov_b1", "ov_int8_b1"} <= set(r["latency_ms"])
    md = write_compare(rows, tmp_path / "out")["markdown"].read_text()
    assert "int8 top-1 %" in md and "| 41.00 |" in md and "export.quantize" in md


def test_match_size_adds_each_larger_spec_factorized_to_the_smallest(tmp_path: Path) -> None:
    """``match_size``: "SqueezeNet, or AlexNet made as small?" in one call. The larger spec
    gets a low-rank copy at the smallest entry's parameter count, labelled as factorized
    here and without an accuracy it did not measure."""
    rows = compare(["cifar:resnet56", "cifar:resnet20"],
                   {"match_size": True, "onnx": False, "latency": False}, workdir=tmp_path)
    assert [r["kind"] for r in rows] == ["spec", "lowrank", "spec"]
    big, low, small = rows
    assert 0.9 * small["params"] < low["params"] <= small["params"] < 0.5 * big["params"]
    assert low["top1"] is None and low["top1_source"] is None
    assert any("factorized here to the size of resnet20" in n for n in low["notes"])
    assert compare(["cifar:resnet20"], {"match_size": True, "onnx": False, "latency": False},
                   workdir=tmp_path)[0]["kind"] == "spec"  # nothing smaller: no copy
