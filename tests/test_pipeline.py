"""End to end on real data: cifar:resnet20 with the shared weights, a 1,000-image test
subset and a few fine-tuning steps; plus the run directory's contract."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresscnn.cli import main
from compresscnn.runs.loading import load_compressed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def resnet20_recipe(shared_data, tmp_path):
    text = (REPO / "recipes" / "resnet20_tucker2_cifar10.yaml").read_text()
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.shared
def test_run_resnet20_end_to_end(resnet20_recipe, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    out = tmp_path / "run"
    args = ["run", str(resnet20_recipe), "--out", str(out), "--quiet",
            "--set", "data.test_subset=1000", "--set", "data.train_subset=1024",
            "--set", "finetune.max_steps=4", "--set", "report.latency_batch=[1]",
            "--set", "calibration={batches: 2, batch_size: 64, steps: 20, "
                     "bn_recalibrate: true}"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    for key in ("baseline", "compressed", "finetuned"):
        assert set(rep[key]) >= {"top1", "top5", "params", "macs"}
    assert rep["baseline"]["n"] == 1000
    assert 70 < rep["baseline"]["top1"] < 95  # the JPEG copy scores ~81% on the full set
    ratio = rep["compressed"]["macs"] / rep["baseline"]["macs"]
    assert 0.49 <= ratio <= 0.5
    assert rep["onnx"]["max_abs_diff"] < 1e-3 and rep["onnx"]["bytes"] > 0
    assert {"path", "bytes", "max_abs_diff"} <= set(rep["onnx"])
    assert any(r["method"] == "tucker2" and r["rank"] for r in rep["layers"])
    assert rep["bn_recalibrated_layers"] == 19
    assert rep["calibration"]["solver"] == "closed_form"
    assert rep["calibration"]["forward_passes"] == 2   # one pass of each model
    assert all(r["fit"]["output_error"] <= r["fit"]["output_error_data_free"]
               for r in rep["layers"] if r["rank"])
    assert "## Data-aware fit" in (out / "report.md").read_text()
    for stage in ("load_model", "plan", "compress", "finetune", "export_onnx"):
        assert stage in rep["timings"]
    assert (out / "report.md").read_text().count("|") > 20
    assert not (out.parent / "run.partial").exists()

    # load_compressed rebuilds the architecture from recipe.yaml and loads the weights
    model = load_compressed(out)
    saved = load_file(str(out / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    import onnxruntime as ort
    x = torch.randn(3, 3, 32, 32)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        y = model(x)
    assert abs(y.numpy() - y_onnx).max() < 1e-3

    # an existing run directory is not overwritten without --overwrite
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


@pytest.mark.shared
def test_dry_run_prints_plan_and_writes_nothing(resnet20_recipe, shared_data, tmp_path,
                                                monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    out = tmp_path / "dry"
    assert main(["run", str(resnet20_recipe), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "tucker2" in text and "MACs" in text
    assert not out.exists() and not (tmp_path / "dry.partial").exists()


def test_demo_recipe_dry_run(capsys):
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Fashion-MNIST (Debian's dataset-fashion-mnist) is not installed")
    assert main(["run", str(REPO / "recipes" / "demo.yaml"), "--dry-run"]) == 0
    assert "fc1" in capsys.readouterr().out


@pytest.mark.shared
def test_dense_reference_is_fine_tuned_like_a_compressed_model(resnet20_recipe, shared_data,
                                                               tmp_path, monkeypatch):
    """`rules: []` (no target, no calibration): the uncompressed model given the same
    fine-tuning, the fair reference for "after fine-tuning" figures."""
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    out = tmp_path / "dense"
    assert main(["run", str(resnet20_recipe), "--out", str(out), "--quiet",
                 "--set", "rules=[]", "--set", "target=null", "--set", "calibration=null",
                 "--set", "data.test_subset=500", "--set", "data.train_subset=256",
                 "--set", "finetune.max_steps=2", "--set", "report.latency=false",
                 "--set", "export.onnx=false"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["layers"] == [] and rep["compressed"]["params"] == rep["baseline"]["params"]
    assert rep["compressed"]["agreement"] == 100.0 and rep["finetuned"]["top1"] is not None
    assert load_compressed(out) is not None


@pytest.mark.parametrize("extra", [["--set", "target.macs=0.5"],
                                   ["--set", "calibration={batches: 2}"],
                                   ["--set", "finetune.enabled=false"]])
def test_empty_rules_need_a_dense_job(tmp_path, capsys, extra):
    """`rules: []` only where nothing would be compressed: a budget, a calibration section or
    no fine-tuning make it a one-line error."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {spec: 'cifar:resnet20', weights: null}\n"
                      "data: {dataset: cifar10, root: .}\nrules: []\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o"), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rules" in err[0] and "at least one rule" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.shared
def test_factor_lr_scales_the_factors_of_the_decomposed_layers(resnet20_recipe, shared_data,
                                                              tmp_path, monkeypatch):
    """`finetune.factor_lr`: every factor chain the decomposers built gets lr x factor_lr,
    the rest of the model lr; the report records the multiplier."""
    import compresscnn.runs.run_training as pipeline
    from compresscnn.train.engine import factor_lr_scale, factorized_layers

    seen = {}
    real = pipeline.finetune

    def spy(student, loader, config, **kw):
        seen["scale"], seen["layers"] = factor_lr_scale(student, config.factor_lr), \
            factorized_layers(student)
        return real(student, loader, config, **kw)

    monkeypatch.setattr(pipeline, "finetune", spy)
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    out = tmp_path / "run"
    assert main(["run", str(resnet20_recipe), "--out", str(out), "--quiet",
                 "--set", "data.test_subset=200", "--set", "data.train_subset=128",
                 "--set", "finetune.max_steps=1", "--set", "finetune.factor_lr=0.25",
                 "--set", "calibration=null",
                 "--set", "report.latency=false", "--set", "export.onnx=false"]) == 0
    assert seen["layers"] and seen["scale"] == {name: 0.25 for name in seen["layers"]}
    rep = json.loads((out / "report.json").read_text())
    assert rep["finetune"]["factor_lr"] == 0.25


@pytest.mark.shared
def test_output_allocation_plans_on_the_calibration_images(resnet20_recipe, shared_data,
                                                           tmp_path, monkeypatch, capsys):
    """`allocation: output` reads the calibration batches to plan (even in a dry run), and
    without a calibration section it is a one-line error naming the key."""
    monkeypatch.setenv("COMPRESSCNN_SHARED_DATA", str(shared_data))
    out = tmp_path / "dry"
    small = ["--set", "calibration.batches=1", "--set", "calibration.batch_size=16"]
    assert main(["run", str(resnet20_recipe), "--out", str(out), "--dry-run",
                 "--set", "allocation=output", *small]) == 0
    assert "layer3.0.conv1" in capsys.readouterr().out and not out.exists()
    assert main(["run", str(resnet20_recipe), "--out", str(out), "--dry-run", "--quiet",
                 "--set", "allocation=output", "--set", "calibration=null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allocation: output needs a calibration section" in err[0]
    assert not out.exists()
