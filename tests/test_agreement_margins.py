"""`evaluation.agreement_margins` on models whose disagreements are known by construction,
and tools/agreement_margins.py end to end on a tiny run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tools import load_tool, write_fake_cifar
from torch import nn

from compresscnn.measure.evaluation import agreement_margins, evaluate


class _Logits(nn.Module):
    """Logits read from the input: channels ``c0:c0+3`` of pixel (0, 0), through a matrix
    product with the identity (which bf16 autocast rounds, as in a real layer)."""

    def __init__(self, c0: int) -> None:
        super().__init__()
        self.c0 = c0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.c0:self.c0 + 3, 0, 0] @ torch.eye(3, device=x.device)


def _batch() -> torch.Tensor:
    """Four images (6 channels, 1x2 pixels): channels 0-2 of pixel (0, 0) are the
    reference's logits, channels 3-5 the model's; pixel (0, 1) is what a mirror brings to
    (0, 0)."""
    ref = torch.tensor([[5.0, 0, 0], [1.0, 0.98, -10], [0, 3.0, 0], [0, 0, 4.0]])
    model = torch.tensor([[5.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0], [0, 0, 4.0]])
    x = torch.zeros(4, 6, 1, 2)
    x[:, :3, 0, 0], x[:, 3:, 0, 0] = ref, model
    x[:, :, 0, 1] = x[:, :, 0, 0]
    x[1, :3, 0, 1] = torch.tensor([0.0, 1.0, 0])  # mirrored, the near tie goes the other way
    return x


def test_margins_count_the_near_ties_among_the_disagreements() -> None:
    loader = [(_batch(), torch.zeros(4, dtype=torch.long))]
    r = agreement_margins(_Logits(3), _Logits(0), loader, thresholds=(0.05, 0.5))
    # images 1 (a near tie of the reference: probabilities 0.505 / 0.495) and 2 (a firm
    # decision, margin above 0.5) disagree
    assert r["n"] == 4 and r["disagreements"] == 2 and r["agreement"] == pytest.approx(50.0)
    assert r["margin_below"] == {0.05: pytest.approx(50.0), 0.5: pytest.approx(50.0)}
    assert r["margin_below_all"] == {0.05: pytest.approx(25.0), 0.5: pytest.approx(25.0)}
    assert r["reference_mirror_agreement"] == pytest.approx(75.0)
    assert r["reference_bf16_agreement"] is None
    # bf16 rounds the near tie 1.0 / 0.98 to 1.0 / 0.98046875: the decision stands; a tie
    # closer than bf16's resolution (1.0 / 1.001) becomes an exact tie, argmax to the first
    x = _batch()
    x[1, :3, 0, 0] = torch.tensor([1.0, 1.001, -10])
    rounded = agreement_margins(_Logits(3), _Logits(0), [(x, torch.zeros(4))], bf16=True,
                                mirror=False)
    assert rounded["reference_bf16_agreement"] == pytest.approx(75.0)
    same = agreement_margins(_Logits(0), _Logits(0), loader, mirror=False)
    assert same["agreement"] == 100.0 and same["disagreements"] == 0
    assert same["margin_below"][0.05] is None and same["reference_mirror_agreement"] is None
    assert r["agreement"] == pytest.approx(
        evaluate(_Logits(3), loader, reference=_Logits(0), topk=(1,), progress=False)["agreement"])


def test_tool_scores_a_run_directory_as_the_run_did(tmp_path: Path) -> None:
    from compresscnn.runs.pipeline import run
    from compresscnn.recipe.schema import validate

    from compresscnn.io.models import load_model

    data = write_fake_cifar(tmp_path / "cifar.zip", per_class=3)
    spec = "cifar:alexnet?hidden=16"
    torch.save(load_model(spec).state_dict(), tmp_path / "alex.pt")  # the original, on file
    out = tmp_path / "run"
    report = run(validate({"model": {"spec": spec, "weights": str(tmp_path / "alex.pt")},
                           "output": str(out),
                  "data": {"dataset": "cifar10", "root": str(data), "eval_batch_size": 7},
                  "rules": [{"match": "classifier.*", "method": "svd", "rank": 2}],
                  "finetune": {"enabled": False}, "export": {"onnx": False},
                  "report": {"latency": False, "plots": False}}), quiet=True)
    tool = load_tool("agreement_margins")
    threads = torch.get_num_threads()
    try:
        assert tool.main([str(out), "--json", str(tmp_path / "m.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["n"] == 30 and r["agreement"] == pytest.approx(report["compressed"]["agreement"])
    assert r["disagreements"] == round(30 * (100 - r["agreement"]) / 100)
    # the run's report says the same of its near ties (evaluate's disagreements_near_tie)
    near = report["compressed"]["disagreements_near_tie"]
    assert near == (pytest.approx(r["margin_below"]["0.05"]) if r["disagreements"] else None)
    assert 0 <= r["reference_bf16_agreement"] <= 100
    assert 0 <= r["reference_mirror_agreement"] <= 100 and set(r["margin_below"]) == {
        "0.05", "0.1", "0.2"}


def test_tool_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    tool = load_tool("agreement_margins")
    assert tool.main([str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: ") and "not a compresscnn run directory" in out
    assert "\n" not in out
    from compresscnn.recipe.schema import dump_resolved, validate

    base = {"model": {"spec": "cifar:alexnet?hidden=16"}, "rules": [
        {"match": "classifier.6", "method": "svd", "rank": 2}],
        "data": {"dataset": "cifar10", "root": str(tmp_path / "none.zip")}}
    for model, says in (({}, "model.weights is null"),
                        ({"weights": str(tmp_path / "w.pt"), "num_classes": 7},
                         "model.num_classes replaced the original's head")):
        run = tmp_path / f"run{len(model)}"
        run.mkdir()
        dump_resolved(validate({**base, "model": {**base["model"], **model},
                                "output": str(run)}), run / "recipe.yaml")
        assert tool.main([str(run)]) == 2
        out = capsys.readouterr().out.strip()
        assert out.startswith("error: ") and says in out and "\n" not in out
