"""`compresscnn inspect`: the per-layer table a user writes a recipe from."""

import torchvision

from compresscnn.cli import main
from compresscnn.measure.inspection import inspect_rows


def test_inspect_rows_methods_and_energy_ranks():
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    rows = {r["name"]: r for r in inspect_rows(m, (3, 32, 32), energies=(0.5, 0.99))}
    dw = rows["features.1.conv.0.0"]               # depthwise 3x3
    assert "tucker2" not in dw["methods"] and "spatial" in dw["methods"]
    assert dw["default"] == "spatial"
    fc = rows["classifier.1"]
    assert fc["methods"] == ["svd"] and fc["default"] == "svd"
    r50, r99 = fc["energy_ranks"][0.5], fc["energy_ranks"][0.99]
    assert r50[0] <= r99[0] <= 10
    assert rows["features.0.0"]["macs"] == 3 * 32 * 9 * 16 * 16


def test_inspect_cli(capsys):
    assert main(["inspect", "cifar:resnet20", "--energy", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "rank@0.9" in out and "tucker2" in out
    assert "linear" in out and "svd" in out


def test_inspect_unknown_model_is_one_line_error(capsys):
    assert main(["inspect", "torchvision:resnet1800"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet1800" in err[0]
