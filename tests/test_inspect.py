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


# --------------------------------------------------------------------------- what fits

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from compresscnn.measure.inspection import fit_report, fit_text, layer_kind  # noqa: E402


class _Mixed(nn.Module):
    """A 3x3 conv and a Linear the methods take; a ConvTranspose2d, a Conv1d and a Conv3d
    they do not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.seq = nn.Conv1d(8, 8, 3)
        self.vol = nn.Conv3d(1, 2, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.up(self.conv(x))                       # 8 x 32 x 32
        z = self.seq(y.flatten(2))                      # 8 x 1022
        w = self.vol(y[:, None, :4, :8, :8])            # 2 x 2 x 6 x 6
        return self.fc(z.mean(-1)) + w.mean()


def test_fit_report_lists_what_no_method_takes():
    rep = fit_report(_Mixed().eval(), (3, 16, 16))
    conv, up = 16 * 16 * 8 * 3 * 9, 16 * 16 * 8 * 8 * 4
    seq, vol = 1022 * 8 * 8 * 3, 2 * 2 * 6 * 6 * 27
    assert rep["macs"] == conv + up + seq + vol + 8 * 4
    assert rep["kinds"]["spatial kxk"]["macs"] == conv
    assert rep["kinds"]["linear"]["macs"] == 32 and rep["kinds"]["linear"]["methods"] == ["svd"]
    got = {e["type"]: e["macs"] for e in rep["not_taken"]}
    assert got == {"ConvTranspose2d": up, "Conv1d": seq, "Conv3d": vol}
    # only the 3x3 conv and the Linear can shrink: the most removable is below their share
    assert rep["removable"] < (conv + 32) / rep["macs"]
    assert [r["method"] for r in rep["rules"]] == ["tucker2"]
    text = fit_text(rep)
    for what in ("not taken: ConvTranspose2d", "not taken: Conv1d", "not taken: Conv3d"):
        assert what in text


def test_fit_report_on_mobilenet_v2_recommends_by_kind():
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    rep = fit_report(m, (3, 32, 32))
    k = rep["kinds"]
    assert k["depthwise"]["layers"] == 17 and k["depthwise"]["methods"] == ["spatial"]
    assert "tucker2" not in k["depthwise"]["methods"]
    assert k["pointwise 1x1"]["share"] > 0.5 and "svd" in k["pointwise 1x1"]["methods"]
    assert sum(v["share"] for v in k.values()) == pytest.approx(1.0)
    assert not rep["not_taken"]
    assert rep["rules"][0] == {"match": "*", "method": "svd"}
    assert rep["methods"]["svd"]["removable"] <= rep["methods"]["svd"]["share"]
    # a shared layer's MACs are counted at every call
    shared = nn.Conv2d(4, 4, 3, padding=1)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert fit_report(twice, (4, 8, 8))["macs"] == 2 * 8 * 8 * 4 * 4 * 9


def test_layer_kind():
    assert layer_kind(nn.Conv2d(4, 4, 3, groups=4)) == "depthwise"
    assert layer_kind(nn.Conv2d(4, 8, 3, groups=2)) == "grouped"
    assert layer_kind(nn.Conv2d(4, 8, 1)) == "pointwise 1x1"
    assert layer_kind(nn.Conv2d(4, 8, (1, 3))) == "spatial kxk"
    assert layer_kind(nn.Linear(4, 8)) == "linear"


def test_inspect_and_dry_run_print_what_fits(capsys, tmp_path):
    assert main(["inspect", "cifar:resnet20", "--energy", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "What fits this model" in out and "recommended rules" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {spec: 'cifar:resnet20'}\nrules: [{match: linear, method: svd, "
                      "rank: 2}]\nfinetune: {enabled: false}\n"
                      "evaluate: {baseline: false, zero_shot: false}\n")
    assert main(["run", str(recipe), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.index("What fits this model") < out.index("est. err")  # then the plan
    assert "- {match: \"*\", method: tucker2}" in out
