"""`compresscnn run` feeds the data it says it feeds: at the model's input size, from named
train / calibration / eval sources that never share images unless allowed (and then the
report says so first), to a head whose classes are the data's; and `compare` measures a model
exactly as `run` does."""

from __future__ import annotations

import io
import json
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from compresscnn.cli import main
from compresscnn.io.data import CIFAR10_CLASSES, imagenet_wnids

REPO = Path(__file__).resolve().parents[1]


def _png(rng: torch.Generator, size: int) -> bytes:
    arr = torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, folders: list[str], size: int = 32, per: int = 2) -> Path:
    rng = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(path, "w") as zf:
        for folder in folders:
            for i in range(per):
                zf.writestr(f"{folder}/{i}.png", _png(rng, size))
    return path


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    """A recipe file: ``text`` plus no ONNX export, latency or plots (fast)."""
    p = tmp_path / name
    p.write_text(textwrap.dedent(text) + "export: {onnx: false}\n"
                 "report: {latency: false, plots: false}\n")
    return p


def test_data_is_fed_at_model_input_size(tmp_path: Path, monkeypatch) -> None:
    """torchvision:resnet18 at model.input_size [3, 32, 32] on 32x32 images is evaluated at
    32x32, not resized to 256 and cropped to 224 by its default preprocessing."""
    import compresscnn.measure.evaluation as E

    wn = imagenet_wnids()
    z = _zip(tmp_path / "inet.zip", [wn[1], wn[2]])
    seen = []
    real = E.evaluate

    def spy(model, loader, **kw):
        seen.append(tuple(next(iter(loader))[0].shape[1:]))
        return real(model, loader, **kw)

    monkeypatch.setattr(E, "evaluate", spy)
    r = _recipe(tmp_path, f"""\
        model: {{spec: "torchvision:resnet18", input_size: [3, 32, 32]}}
        data: {{dataset: imagenet, root: {z}, eval_batch_size: 4}}
        rules: [{{match: fc, method: svd, rank: 8}}]
        finetune: {{enabled: false}}
        """)
    out = tmp_path / "run"
    assert main(["run", str(r), "--out", str(out), "--quiet"]) == 0
    assert seen == [(3, 32, 32), (3, 32, 32)]  # baseline and zero-shot
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["eval"]["images"] == 4 and rep["input_size"] == [3, 32, 32]


def test_mismatched_image_size_is_refused(tmp_path: Path, capsys) -> None:
    z = _zip(tmp_path / "c.zip", [f"{s}/{c}" for s in ("train", "test") for c in CIFAR10_CLASSES[:2]])
    r = _recipe(tmp_path, f"""\
        model: {{spec: "cifar:resnet20", input_size: [3, 64, 64]}}
        data: {{dataset: cifar10, root: {z}}}
        rules: [{{match: linear, method: svd, rank: 4}}]
        finetune: {{enabled: false}}
        """)
    assert main(["run", str(r), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "32x32" in err[0] and "64x64" in err[0] and "data.resize" in err[0]
    assert not (tmp_path / "o").exists()
    # resolved explicitly: upsample on purpose
    assert main(["run", str(r), "--out", str(tmp_path / "o"), "--quiet",
                 "--set", "data.resize=64"]) == 0


def _no_split_recipe(tmp_path: Path) -> tuple[Path, Path]:
    z = _zip(tmp_path / "flat.zip", list(CIFAR10_CLASSES[:2]), per=4)  # <class>/<file>, no split
    r = _recipe(tmp_path, f"""\
        model: {{spec: "cifar:resnet20"}}
        data: {{dataset: cifar10, root: {z}, batch_size: 4}}
        rules: [{{match: "layer1.0.conv1", method: tucker2, rank: 4}}]
        finetune: {{max_steps: 1, lr: 0.001}}
        """)
    return r, z


def test_training_on_eval_images_is_refused(tmp_path: Path, capsys) -> None:
    r, z = _no_split_recipe(tmp_path)
    out = tmp_path / "run"
    for extra in ([], ["--set", "finetune.enabled=false", "--set",
                       "calibration={batches: 1, batch_size: 4, steps: 1}"]):
        assert main(["run", str(r), "--out", str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "flat.zip" in err[0] and "allow_eval_overlap" in err[0]
        assert not out.exists() and not (tmp_path / "run.partial").exists()
    # the escape hatch: allowed, and said first in the report
    assert main(["run", str(r), "--out", str(out), "--quiet",
                 "--set", "data.allow_eval_overlap=true"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_overlap"] is True
    assert "fine-tuning used the images accuracy is measured on" in rep["warnings"][0]
    head = (out / "report.md").read_text().splitlines()[:4]
    assert head[2].startswith("> **Warning:** fine-tuning used the images accuracy")


def test_separate_sources_train_without_overlap(tmp_path: Path) -> None:
    r, z = _no_split_recipe(tmp_path)
    ev = _zip(tmp_path / "eval.zip", list(CIFAR10_CLASSES[2:4]))
    out = tmp_path / "run"
    assert main(["run", str(r), "--out", str(out), "--quiet", "--set", f"data.eval.root={ev}",
                 "--set", "calibration={batches: 1, batch_size: 4, steps: 1}"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_overlap"] is False and rep["warnings"] == []
    assert rep["data"]["train"]["root"] == str(z) and rep["data"]["eval"]["root"] == str(ev)
    assert rep["data"]["calibration"]["root"] == str(z) and rep["baseline"]["n"] == 4


def test_imagenet_head_on_cifar_needs_num_classes(tmp_path: Path, capsys) -> None:
    z = _zip(tmp_path / "c.zip", [f"{s}/{c}" for s in ("train", "test") for c in CIFAR10_CLASSES[:2]])
    r = _recipe(tmp_path, f"""\
        model: {{spec: "torchvision:resnet18", input_size: [3, 32, 32]}}
        data: {{dataset: cifar10, root: {z}, batch_size: 4}}
        rules: [{{match: "layer4.*.conv2", method: tucker2, rank: 8}}]
        finetune: {{max_steps: 1, lr: 0.001}}
        """)
    out = tmp_path / "run"
    assert main(["run", str(r), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1000-class head" in err[0] and "model.num_classes: 10" in err[0]
    assert main(["run", str(r), "--out", str(out), "--quiet",
                 "--set", "model.num_classes=10"]) == 2  # the original cannot teach new classes
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune.distill.enabled: false" in err[0]
    assert main(["run", str(r), "--out", str(out), "--quiet", "--set", "model.num_classes=10",
                 "--set", "finetune.distill.enabled=false"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "head (fc) was replaced" in rep["warnings"][0]
    from compresscnn.runs.loading import load_compressed

    assert load_compressed(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.shared
def test_shipped_squeezenet_recipe_calibrates_on_train_images(shared_data: Path, monkeypatch) -> None:
    from compresscnn.io import data as D
    from compresscnn.recipe.schema import load_recipe

    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    r = load_recipe(REPO / "recipes" / "squeezenet1_1_val500.yaml")
    cfg = D.resolve_data_cfg(r["data"])
    assert Path(D.source_of(cfg, "calibration")["root"]).name == "imagenet-train1000.zip"
    assert Path(D.source_of(cfg, "eval")["root"]).name == "imagenet-val500.zip"
    assert r["calibration"] is not None
    assert D.check_sources(cfg, train=True, calibrate=True) == []


@pytest.mark.shared
@pytest.mark.slow
def test_compare_and_run_measure_the_same(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    """SqueezeNet 1.1 on val500: `compare --data` and `run` give the same top-1 (compare used
    to resize the 224-pixel images to 256 and crop them back: 52.0 against the run's 53.0)."""
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    weights = shared_data / "weights/imagenet-squeezenet1_1/squeezenet1_1.pth"
    val = shared_data / "imagenet-val500.zip"
    js = tmp_path / "c.json"
    assert main(["compare", "torchvision:squeezenet1_1", "--weights-for",
                 f"torchvision:squeezenet1_1={weights}", "--data", f"imagenet={val}",
                 "--no-onnx", "--no-latency", "--quiet", "--out", str(tmp_path / "c"),
                 "--json", str(js)]) == 0
    row = json.loads(js.read_text())[0]
    out = tmp_path / "run"
    assert main(["run", str(REPO / "recipes" / "squeezenet1_1_val500.yaml"), "--out", str(out),
                 "--quiet", "--set", "calibration=null", "--set", "evaluate.zero_shot=false",
                 "--set", "rules.0.method=cp",  # the baseline is what is compared
                 "--set", "export.onnx=false", "--set", "report.latency=false",
                 "--set", "report.plots=false"]) == 0
    base = json.loads((out / "report.json").read_text())["baseline"]
    assert row["top1"] == base["top1"] == pytest.approx(53.0)
    assert row["top5"] == base["top5"]
    assert row["top1_source"] == "measured" and row["top1_images"] == base["n"] == 500
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["eval"]["root"] == str(val)
