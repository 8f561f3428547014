"""Fine-tuning: learning, distillation, exact resume, safe checkpoints, CSV log."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from compresscnn.errors import CheckpointError
from compresscnn.train.loop import TrainRun, distillation_loss, finetune, lr_factor

QUIET = TrainRun(progress=False)


def _tiny_cnn(classes: int = 3, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(16, classes),
    )


def _separable_data(n: int = 48, classes: int = 3, seed: int = 0):
    """Class c lights up a distinct quadrant of an 8x8 image: learnable by the tiny CNN."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 1.0
    return x, y


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_loss_decreases_and_csv_written(tmp_path):
    x, y = _separable_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    net = _tiny_cnn()
    stats = finetune(net, loader, {"epochs": 6, "lr": 0.1, "lr_batch": 8, "device": "cpu",
                                   "log_every": 4}, checkpoint_dir=tmp_path, run=QUIET)
    assert stats["steps"] == 36 and stats["epochs"] == pytest.approx(6.0)
    assert stats["images"] == 6 * 48 and stats["images_per_s"] > 0
    rows = _read_csv(stats["log_csv"])
    assert list(rows[0]) == ["step", "epoch", "loss", "kd_loss", "ce_loss", "lr", "images_per_s"]
    assert [int(r["step"]) for r in rows] == list(range(1, 37))
    assert rows[0]["kd_loss"] == ""  # no distillation
    first = sum(float(r["loss"]) for r in rows[:6]) / 6
    last = sum(float(r["loss"]) for r in rows[-6:]) / 6
    assert last < 0.5 * first
    assert stats["final_loss"] == pytest.approx(float(rows[-1]["loss"]), rel=1e-4)
    # cosine schedule: starts at lr, ends near 0
    assert float(rows[0]["lr"]) == pytest.approx(0.1)
    assert float(rows[-1]["lr"]) < 0.01
    assert net.training


def test_kd_alpha_one_follows_teacher():
    x, _ = _separable_data(n=64, classes=4, seed=1)
    teacher = _tiny_cnn(classes=4, seed=123).eval()
    with torch.no_grad():
        t_pred = teacher(x).argmax(1)
    noise_labels = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(5))
    loader = DataLoader(TensorDataset(x, noise_labels), batch_size=16, shuffle=True)
    student = _tiny_cnn(classes=4, seed=7)

    def kl_to_teacher() -> float:
        student.eval()
        with torch.no_grad():
            _, kd, _ = distillation_loss(student(x), teacher(x), noise_labels, temperature=4.0, alpha=1.0)
        student.train()
        return kd.item()

    before = kl_to_teacher()
    stats = finetune(
        student, loader, {"epochs": 25, "optimizer": "adamw", "lr": 0.02, "lr_batch": 16,
                          "weight_decay": 0.0, "distill": {"alpha": 1.0, "temperature": 4.0},
                          "device": "cpu"}, teacher=teacher, run=QUIET)
    assert stats["distill"] == {"enabled": True, "alpha": 1.0, "temperature": 4.0}
    after = kl_to_teacher()
    assert after < 0.3 * before
    student.eval()
    with torch.no_grad():
        agree = (student(x).argmax(1) == t_pred).float().mean().item()
    assert agree >= 0.85
    assert not teacher.training


class _NoisyData(Dataset):
    """Random augmentation from the global torch RNG (as torchvision transforms do), and a
    simulated crash after ``crash_after`` items have been fetched."""

    def __init__(self, x, y, crash_after=None):
        self.x, self.y, self.crash_after, self.fetched = x, y, crash_after, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.fetched += 1
        if self.crash_after is not None and self.fetched > self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        return self.x[i] + 0.05 * torch.randn_like(self.x[i]), self.y[i]


def _resume_run(ckdir, crash_after=None, resume=False):
    x, y = _separable_data(n=16)
    loader = DataLoader(_NoisyData(x, y, crash_after), batch_size=4, shuffle=True)  # 4 steps/epoch
    net = _tiny_cnn(dropout=0.3, seed=1)
    stats = finetune(
        net, loader, {"max_steps": 10, "lr": 0.05, "lr_batch": 4, "warmup_steps": 2,
                      "device": "cpu", "checkpoint_every": 3, "log_every": 2},
        checkpoint_dir=ckdir, run=TrainRun(resume=resume, progress=False, seed=3))
    return net, stats


def test_resume_reproduces_uninterrupted_run(tmp_path):
    ref, ref_stats = _resume_run(tmp_path / "a")
    assert ref_stats["steps"] == 10

    # crash while fetching batch 7 (item 25): the last checkpoint is step 6, mid-epoch 1
    with pytest.raises(KeyboardInterrupt):
        _resume_run(tmp_path / "b", crash_after=24)
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (6, 1, 2)

    resumed, stats = _resume_run(tmp_path / "b", resume=True)
    assert stats["resumed_from_step"] == 6 and stats["steps"] == 10 and stats["images"] == 16
    ref_sd, res_sd = ref.state_dict(), resumed.state_dict()
    assert ref_sd.keys() == res_sd.keys()
    for k in ref_sd:
        assert torch.allclose(ref_sd[k].float(), res_sd[k].float(), atol=1e-6), k
    # the log has every step exactly once, with the same losses as the uninterrupted run
    a = _read_csv(tmp_path / "a" / "finetune_log.csv")
    b = _read_csv(tmp_path / "b" / "finetune_log.csv")
    assert [r["step"] for r in b] == [str(i) for i in range(1, 11)]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # resuming a finished run is a no-op
    _, again = _resume_run(tmp_path / "b", resume=True)
    assert again["steps"] == 10 and again["images"] == 0


def test_checkpoint_is_weights_only_and_complete(tmp_path):
    x, y = _separable_data(n=16)
    net = _tiny_cnn()
    finetune(net, DataLoader(TensorDataset(x, y), batch_size=8), {"device": "cpu"},
             checkpoint_dir=tmp_path, run=QUIET)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "rng"):
        assert key in ck
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (2, 1, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune_log.csv", "last.pt",
                                                          "last.pt.sha256"]


def test_corrupt_or_mismatched_checkpoint(tmp_path):
    x, y = _separable_data(n=16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    cfg, resume = {"epochs": 1, "device": "cpu"}, TrainRun(resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        finetune(_tiny_cnn(), loader, cfg, checkpoint_dir=tmp_path, run=resume)
    (tmp_path / "last.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=str(tmp_path / "last.pt")):
        finetune(_tiny_cnn(), loader, cfg, checkpoint_dir=tmp_path, run=resume)
    finetune(_tiny_cnn(), loader, cfg, checkpoint_dir=tmp_path, run=QUIET)  # a 3-class net's
    with pytest.raises(CheckpointError, match="does not match the model"):
        finetune(_tiny_cnn(classes=5), loader, cfg, checkpoint_dir=tmp_path, run=resume)
    with pytest.raises(CheckpointError, match="total_steps"):
        finetune(_tiny_cnn(), loader, {**cfg, "epochs": 2}, checkpoint_dir=tmp_path, run=resume)


def test_lr_schedule_shape():
    assert [round(lr_factor(s, 10, warmup_steps=2), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, 10, schedule="linear") == pytest.approx(0.1)
    assert lr_factor(5, 10, schedule="constant") == 1.0
    f = [lr_factor(s, 10) for s in range(10)]
    assert all(a >= b for a, b in zip(f, f[1:]))


def test_lr_scale_gives_named_modules_their_own_rate():
    """`lr_scale`: the parameters under the named modules start at lr times the multiplier
    (decay and no-decay groups kept apart); the schedule moves every group alike; `factor_lr`
    gives it to every factor chain."""
    from compresscnn.errors import CompressError
    from compresscnn.train.loop import build_optimizer, param_groups

    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, (3, 1)), nn.Conv2d(2, 4, (1, 3))),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, lr_scale={"0": 0.25})
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["0.0.weight"])]["lr"] == pytest.approx(0.025)
    assert by_id[id(named["0.1.bias"])]["lr"] == pytest.approx(0.025)
    assert by_id[id(named["0.1.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["0.1.weight"])]["weight_decay"] == 1e-4
    assert by_id[id(named["1.weight"])]["lr"] == pytest.approx(0.1)
    assert by_id[id(named["3.weight"])]["lr"] == pytest.approx(0.1)
    assert "lr_scale" not in opt.param_groups[0]  # the unscaled groups come first
    # a module name is a prefix of whole components only: "0" is not "00"
    assert len(param_groups(model, 0.0, {"00": 0.5})) == 2
    with pytest.raises(CompressError, match="lr scale of '0'"):
        param_groups(model, 0.0, {"0": 0.0})

    x, y = _separable_data(16, classes=3)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, (3, 1), padding=(1, 0)),
                                        nn.Conv2d(2, 4, (1, 3), padding=(0, 1))),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    stats = finetune(model, DataLoader(TensorDataset(x, y), batch_size=8),
                     {"max_steps": 2, "lr": 0.1, "lr_batch": 8, "device": "cpu", "amp": "off",
                      "memory_format": "contiguous", "factor_lr": 1e-9}, run=QUIET)
    assert stats["factor_lr"] == 1e-9 and stats["lr"] == 0.1
    moved = [not torch.allclose(b, p, atol=1e-6) for b, p in zip(before, model.parameters())]
    assert moved[:4] == [False] * 4  # a tiny rate leaves the factors (nearly) still
    assert all(moved[4:])            # BatchNorm and the classifier train at lr
