"""Cuttlefish as a ``train`` job (``train.switch``): dense epochs with the stable ranks
measured after each, the switch to the factorized model at the stable ranks, the factorized
epochs, resume across the switch, and the refused combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compresscnn.train import loop as ft_mod
from compresscnn.cli import main
from compresscnn.io.data import CIFAR10_CLASSES
from compresscnn.errors import CheckpointError
from compresscnn.runs.loading import load_compressed

from test_data import make_cifar_zip

# cifar:resnet20 from random weights on 8 training images of 32x32 (two classes) in batches of
# 4: two steps an epoch, three epochs; one dense epoch, then two factorized ones. The
# classifier's stable rank drops in the dense epoch (its update has rank <= 2), so svd
# factorizes it; layer1's convs hardly move and stay dense (no smaller at their ranks).
RECIPE = """\
seed: 1
model: {{spec: "cifar:resnet20", weights: null}}
data: {{dataset: cifar10, root: {root}, batch_size: 4, eval_batch_size: 4, augment: false}}
rules:
  - {{match: "layer1.*.conv*", method: spatial, rank: 0.5}}
  - {{match: linear, method: svd, rank: 0.5}}
train: {{epochs: 3, lr: 0.2, lr_batch: 4, amp: "off", log_every: 1,
        switch: {{max_epochs: 1, window: 2}}}}
export: {{onnx: false}}
report: {{latency: false, plots: false}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cuttlefish")
    make_cifar_zip(d / "c.zip", {c: 4 for c in CIFAR10_CLASSES[:2]})
    r = d / "r.yaml"
    r.write_text(RECIPE.format(root=d / "c.zip"))
    return r


def _run(recipe: Path, out: Path, *extra: str) -> int:
    return main(["run", str(recipe), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """An uninterrupted run of ``recipe``."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _run(recipe, out) == 0
    return out


def test_switch_job_trains_dense_then_factorized(reference):
    out = reference
    rep = json.loads((out / "report.json").read_text())
    sw = rep["switch"]
    assert sw["epoch"] == 1 and sw["reason"] == "max_epochs"  # window 2: cannot settle in 1
    names = [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)] + ["linear"]
    assert sorted(sw["ranks"]) == sorted(names)
    assert all(1 <= sw["ranks"][n] <= sw["full_ranks"][n] for n in names)
    assert sw["full_ranks"]["linear"] == 10 and sw["ranks"]["linear"] < 8
    assert len(sw["seconds_per_epoch"]["dense"]) == 1
    assert len(sw["seconds_per_epoch"]["factorized"]) == 2
    assert sw["dense"]["steps"] == 2 and rep["finetune"]["steps"] == 4
    assert rep["finetune"]["total_steps"] == 4  # the remaining 2 epochs
    # the plan is the stable-rank one, and the run's model is the factorized one
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(rows) == set(names)
    for n in names:
        assert rows[n]["policy"] == f"stable rank {sw['ranks'][n]} of {sw['full_ranks'][n]}"
    assert rep["trained"]["params"] == rep["compressed"]["params"]
    assert rows["linear"]["skipped"] is None and rows["linear"]["rank"] == [sw["ranks"]["linear"]]
    assert rep["trained"]["params"] < rep["baseline"]["params"]
    model = load_compressed(out)
    assert isinstance(model.linear, nn.Sequential)
    dense = [n for n in names if rows[n]["skipped"] is not None]
    for n in dense:  # where the factorization would not be smaller
        assert isinstance(model.get_submodule(n), nn.Conv2d)
        assert rows[n]["skipped"].startswith("no smaller than dense at stable rank")
    assert any(f"{len(dense)} of the 7 layer(s) the rules take stay dense" in w
               for w in rep["warnings"]) == bool(dense)
    for f in ("train_log.csv", "train_log_dense.csv", "checkpoints/switch.json",
              "checkpoints/last.pt", "checkpoints/factorized/last.pt"):
        assert (out / f).is_file(), f


def test_resume_in_the_factorized_phase(recipe, reference, tmp_path, monkeypatch):
    ref = reference
    # interrupt right after the first checkpoint of the factorized phase
    real = ft_mod.atomic_torch_save

    def save_then_stop(obj, path, **kw):
        real(obj, path, **kw)
        if Path(path).parent.name == "factorized":
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(ft_mod, "atomic_torch_save", save_then_stop)
    assert _run(recipe, out) == 130
    monkeypatch.setattr(ft_mod, "atomic_torch_save", real)
    partial = out.with_name("run.partial")
    assert not out.exists() and (partial / "checkpoints/factorized/last.pt").is_file()
    dense_log = (partial / "train_log_dense.csv").read_text()
    assert _run(recipe, out, "--resume") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["finetune"]["resumed_from_step"] == 2  # after the first factorized epoch
    assert rep["switch"]["dense"]["resumed_from_step"] == 2  # finished: not trained again
    assert (out / "train_log_dense.csv").read_text() == dense_log
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ra = json.loads((ref / "report.json").read_text())
    assert rep["switch"]["ranks"] == ra["switch"]["ranks"]


@pytest.mark.parametrize("sets, says", [
    (["train.switch.window=1"], "train.switch.window"),
    (["train.switch.tol=0"], "train.switch.tol"),
    (["train.switch.min_fraction=2"], "train.switch.min_fraction"),
    (["train.switch.after=3"], "train.switch.after"),
    (["train.switch.max_epochs=3"], "leaves no epoch"),
    (["train.epochs=1", "train.switch.max_epochs=null"], "at least 2"),
    (["train.max_steps=5"], "train.max_steps"),
    (["train.init=spectral"], "train.init"),
    (["rules=[]"], "needs rules"),
    (['rules=[{match: "layer1.*.conv*", method: auto}]'], "rules[0].method"),
])
def test_bad_switch_options_are_one_line_errors(recipe, tmp_path, capsys, sets, says):
    out = tmp_path / "run"
    argv = [a for s in sets for a in ("--set", s)]
    assert _run(recipe, out, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err, err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_switch_point_state_survives_a_restart(tmp_path):
    """The dense phase's state file: a restarted run reads it, and an epoch it redoes
    replaces that epoch's measurements instead of adding to them."""
    from compresscnn.train.cuttlefish import StableRankMonitor, SwitchPoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    path = tmp_path / "switch.json"
    point = SwitchPoint(StableRankMonitor(net, ["0", "2"], window=2), 3, path)
    for epoch in (1, 2):
        with torch.no_grad():
            net[2].weight.mul_(torch.linspace(0.5, 2.0, 4)[:, None])
        assert point.on_epoch_end(epoch, net) is False
    again = SwitchPoint(StableRankMonitor(net, ["0", "2"], window=2), 3, path)
    assert again.monitor.epochs == [1, 2] and again.monitor.trace == point.monitor.trace
    assert again.on_epoch_end(2, net) is False  # redone after a resume
    assert again.monitor.epochs == [1, 2] and sorted(again.seconds["dense"]) == [1, 2]
    assert again.on_epoch_end(3, net) is True and again.epoch == 3
    assert again.reason in ("settled", "max_epochs")
    path.write_text("{")
    with pytest.raises(CheckpointError, match="switch.json"):
        SwitchPoint(StableRankMonitor(net, ["0", "2"]), 3, path)


def test_switch_rules_need_no_rank_policy(recipe):
    """The switch chooses ranks (stable ranks), so its rules may give no policy, as with a
    target; without the switch such a rule is refused."""
    from compresscnn.recipe.schema import load_recipe
    from compresscnn.errors import RecipeError
    text = recipe.read_text().replace(", rank: 0.5}", "}")
    path = recipe.with_name("nopolicy.yaml")
    path.write_text(text)
    rules = load_recipe(path)["rules"]
    assert [r["rank"] for r in rules] == [None, None]
    path.write_text(text.replace("switch: {max_epochs: 1, window: 2}", "switch: null"))
    with pytest.raises(RecipeError, match="give one of rank"):
        load_recipe(path)
