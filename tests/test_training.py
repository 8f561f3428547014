"""Training speed and safety options of the training loop (bf16 autocast, channels_last,
cutout/mixup, callbacks, keep-best, non-finite losses) and ``train`` recipes (from random
initialisation)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compresscnn.util.common as utils_mod
from compresscnn.cli import main
from compresscnn.errors import CompressError, RecipeError
from compresscnn.train.loop import TrainRun, finetune, resolve_memory_format
from compresscnn.util.training import cutout as _cutout, mixup_labels as _mixup
from compresscnn.util.common import resolve_amp as _resolve_amp
from compresscnn.recipe.schema import validate


QUIET = TrainRun(progress=False)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def _loader(n: int = 48, seed: int = 0, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 1.0
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_cpu_follows_the_hardware(monkeypatch, native):
    monkeypatch.setattr(utils_mod, "cpu_bf16_native", lambda: native)
    cpu = torch.device("cpu")
    assert _resolve_amp("auto", cpu) == (torch.bfloat16 if native else None)
    assert _resolve_amp("off", cpu) is None and _resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(CompressError, match="fp16 needs a CUDA device"):
        _resolve_amp("fp16", cpu)


def test_memory_format_auto_and_model_left_contiguous():
    assert resolve_memory_format("auto", _net()) == torch.channels_last
    assert resolve_memory_format("auto", nn.Linear(4, 2)) == torch.contiguous_format
    with pytest.raises(CompressError, match="memory_format"):
        resolve_memory_format("nhwc", _net())
    net = _net()
    stats = finetune(net, _loader(), {"lr": 0.05, "lr_batch": 8, "device": "cpu", "amp": "off"},
                     run=QUIET)
    assert stats["memory_format"] == "channels_last" and stats["amp"] is None
    assert net[0].weight.is_contiguous()  # handed back in the default layout


def test_bf16_training_learns_like_fp32():
    accs = {}
    for amp in ("off", "bf16"):
        net = _net()
        finetune(net, _loader(96), {"epochs": 8, "lr": 0.1, "lr_batch": 8, "device": "cpu",
                                    "amp": amp}, run=QUIET)
        x, y = next(iter(DataLoader(_loader(96).dataset, batch_size=96)))
        accs[amp] = (net.eval()(x).argmax(1) == y).float().mean().item()
    assert accs["bf16"] > 0.9 and abs(accs["bf16"] - accs["off"]) < 0.1


def test_cutout_cuts_one_square_per_image():
    torch.manual_seed(0)
    x = torch.ones(64, 3, 32, 32)
    out = _cutout(x, 8)
    holes = (out[:, 0] == 0).sum(dim=(1, 2))
    assert holes.max() == 64 and holes.min() >= 16  # a full square, or clipped at a border
    assert torch.equal((out == 0).any(1), (out == 0).all(1))  # every channel alike


def test_mixup_mixes_pairs():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1)
    y = torch.arange(8)
    mixed, ya, yb, lam = _mixup(x, y, 1.0)
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[yb])


class _Recorder:
    def __init__(self, stop_after: int | None = None):
        self.steps, self.epochs, self.stop_after = [], [], stop_after

    def after_step(self, step):
        self.steps.append(step)

    def on_epoch_end(self, epoch, model):
        self.epochs.append(epoch)
        return self.stop_after is not None and epoch >= self.stop_after

    def penalty(self):
        return torch.zeros(())


def test_callbacks_see_every_step_and_can_stop():
    rec = _Recorder(stop_after=2)
    stats = finetune(_net(), _loader(), {"epochs": 5, "lr": 0.05, "lr_batch": 8, "device": "cpu"},
                     callbacks=[rec], run=QUIET)
    assert rec.steps == list(range(1, 13)) and rec.epochs == [1, 2]
    assert stats["stopped_early"] and stats["steps"] == 12


def test_training_says_where_it_is_in_a_log(monkeypatch, capsys):
    """Off a terminal (a log file, CI), training prints its step, the time left and the
    loss at least every progress.INTERVAL seconds, not only "still running"."""
    import re

    from compresscnn.util import progress

    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # a line at every step
    finetune(_net(), _loader(), {"epochs": 2, "lr": 0.05, "lr_batch": 8, "device": "cpu",
                                 "log_every": 1}, run=TrainRun(section="train"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[train] ")]
    assert lines and re.fullmatch(r"\[train\] 12/12 steps \(100%\), [\d.]+ s, loss [\d.]+, "
                                  r"lr [\d.e-]+", lines[-1]), lines
    assert any("left" in ln for ln in lines[:-1]), lines


def test_keep_best_restores_the_best_epoch(tmp_path):
    scores = iter([10.0, 30.0, 20.0])
    snapshots = {}

    def evaluator(model):
        s = next(scores)
        snapshots[s] = {k: v.clone() for k, v in model.state_dict().items()}
        return s

    net = _net()
    stats = finetune(net, _loader(), {"epochs": 3, "lr": 0.05, "lr_batch": 8, "device": "cpu",
                                      "keep": "best"},
                     evaluator=evaluator, checkpoint_dir=tmp_path, run=QUIET)
    assert stats["best_epoch"] == 2 and stats["best_score"] == 30.0 and stats["kept"] == "best"
    assert [h["score"] for h in stats["history"]] == [10.0, 30.0, 20.0]
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshots[30.0][k])
    assert (tmp_path / "best.pt").is_file()
    with pytest.raises(CompressError, match="keep: best needs held-out"):
        finetune(_net(), _loader(), {"device": "cpu", "keep": "best"}, run=QUIET)


def test_non_finite_loss_names_the_options():
    with pytest.raises(CompressError) as e:
        finetune(_net(), _loader(), {"epochs": 3, "lr": 1e12, "device": "cpu", "amp": "off",
                                     "log_every": 1}, run=TrainRun(progress=False, section="train"))
    msg = str(e.value)
    assert "train.lr" in msg and "train.clip_grad_norm" in msg and "\n" not in msg
    assert "amp" not in msg  # amp is off: not suggested


def test_clipping_bounds_the_update():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    finetune(net, _loader(8), {"max_steps": 1, "lr": 1.0, "lr_batch": 8, "momentum": 0.0,
                               "weight_decay": 0.0, "device": "cpu", "amp": "off",
                               "clip_grad_norm": 1e-3}, run=QUIET)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
    assert moved.norm() <= 1e-3 * 1.0001


_TRAIN = {"model": {"spec": "cifar:resnet20", "weights": None},
          "data": {"dataset": "cifar10", "root": None}, "rules": [], "train": {"epochs": 1}}


def test_train_recipe_validation():
    r = validate(dict(_TRAIN))
    assert r["rules"] == [] and r["train"]["lr"] == 0.1 and r["train"]["init"] == "kaiming"
    bad = [({"model": {"spec": "cifar:resnet20", "weights": "x.th"}}, "model.weights"),
           ({"finetune": {"epochs": 1}}, "finetune"),
           ({"calibration": {}}, "calibration"),
           ({"train": None, "target": {"macs": 0.5}}, "rules")]  # compressing with no rule
    for change, where in bad:
        with pytest.raises(RecipeError) as e:
            validate({**_TRAIN, **change})
        assert where in str(e.value) and "\n" not in str(e.value)


@pytest.mark.shared
def test_train_job_end_to_end(shared_data, tmp_path, capsys):
    recipe = tmp_path / "t.yaml"
    recipe.write_text(
        "model: {spec: 'cifar:resnet20', weights: null}\n"
        f"data: {{dataset: cifar10, root: {shared_data}/cifar10-jpg.zip, train_subset: 256,"
        " test_subset: 100, batch_size: 32, eval_batch_size: 100}\n"
        "rules: []\n"
        "train: {epochs: 1, holdout: 64, keep: best, cutout: 8, label_smoothing: 0.1,"
        " curve: true}\n"
        "export: {onnx: false}\nreport: {latency: false, plots: false}\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["trained"]["top1"] is not None and rep["finetuned"] is None
    assert rep["finetune"]["steps"] == 6 and rep["finetune"]["best_epoch"] == 1
    assert rep["finetune"]["memory_format"] == "channels_last"
    assert "## Training" in (out / "report.md").read_text()
    # the learning curve: top-1 on the evaluation images after the epoch, the trained
    # model's own (the kept best epoch is the only one)
    from compresscnn.runs.sweep import summarise_report
    (point,) = rep["finetune"]["curve"]
    assert point["epoch"] == 1 and point["top1"] == pytest.approx(rep["trained"]["top1"])
    assert summarise_report(rep)["curve"] == rep["finetune"]["curve"]
    assert f"| 1 | {point['top1']:.2f} |" in (out / "report.md").read_text()


@pytest.mark.shared
def test_factorized_train_job_reloads(shared_data, tmp_path):
    """A train job with rules trains the factorized structure (semi-orthogonal steps on),
    and its run directory rebuilds through load_compressed."""
    from compresscnn.runs.loading import load_compressed

    recipe = tmp_path / "t.yaml"
    recipe.write_text(
        "model: {spec: 'cifar:resnet20', weights: null}\n"
        f"data: {{dataset: cifar10, root: {shared_data}/cifar10-jpg.zip, train_subset: 128,"
        " test_subset: 50, batch_size: 32, eval_batch_size: 50}\n"
        "rules: [{match: 'layer1.*.conv*', method: spatial, rank: 0.5}]\n"
        "train: {max_steps: 2, semi_orthogonal: 1, init: spectral}\n"
        "export: {onnx: false}\nreport: {latency: false, plots: false}\n")
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["trained"]["params"] < rep["baseline"]["params"]
    model = load_compressed(out)
    assert isinstance(model.layer1[0].conv1, nn.Sequential)


def test_reference_states_rank_order_and_null_weights():
    """The schema reference says what the code does: tucker2 list ranks are in its
    rank_names order, and weights: null is random initialisation."""
    from compresscnn.core.decomposers import get_decomposer
    from compresscnn.io.models import load_model
    from compresscnn.recipe.reference import reference_markdown

    md = reference_markdown()
    names = get_decomposer("tucker2").rank_names
    assert f"`[{', '.join(names)}]` for tucker2" in md
    assert "null: random initialisation" in md
    a, b = load_model("cifar:resnet20", None), load_model("cifar:resnet20", None)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)  # nothing loaded: fresh draws


def test_learning_curve_scores_every_epoch_and_leaves_the_training_as_it_was(tmp_path):
    """``TrainRun(curve=...)`` scores the model after every epoch (its points in the stats
    and the checkpoint, so a resumed run's curve is whole); the training is bit for bit the
    one without it, even where the score draws from torch's RNG."""
    def score(model):
        torch.rand(3)  # an evaluation that draws random numbers (e.g. a shuffling loader)
        return float(model[-1].weight.detach().abs().sum())

    # cutout draws its squares from torch's global RNG
    cfg = {"epochs": 3, "lr": 0.05, "lr_batch": 8, "device": "cpu", "cutout": 2}
    plain, curved = _net(), _net()
    assert finetune(plain, _loader(), cfg, run=QUIET)["curve"] is None
    stats = finetune(curved, _loader(), cfg, run=TrainRun(progress=False, curve=score))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, curved.state_dict()[k]), k
    assert [p["epoch"] for p in stats["curve"]] == [1, 2, 3]
    assert stats["curve"][-1]["top1"] == pytest.approx(score(curved))

    class Interrupt:
        def on_epoch_end(self, epoch, model):
            if epoch == 2:
                raise KeyboardInterrupt

    first = _net()
    with pytest.raises(KeyboardInterrupt):
        finetune(first, _loader(), cfg, callbacks=[Interrupt()], checkpoint_dir=tmp_path,
                 run=TrainRun(progress=False, curve=score))
    resumed = finetune(first, _loader(), cfg, checkpoint_dir=tmp_path,
                       run=TrainRun(progress=False, curve=score, resume=True))
    assert resumed["curve"] == stats["curve"]
