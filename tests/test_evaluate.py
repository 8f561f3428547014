"""Accuracy / agreement on constructed examples with known answers; latency sanity."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compresscnn.errors import DataError
from compresscnn.measure.evaluation import evaluate, evaluate_predictions, measure_latency


class FixedLogits(nn.Module):
    """Returns the logits stored for each sample; the "image" is just the sample index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits.clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx.long().view(-1)]


def _known_case():
    # 6 classes, 4 samples. Rankings (best first) and labels chosen by hand:
    #   s0: ranks [0,1,2,3,4,5], label 0 -> top1 hit, top5 hit
    #   s1: ranks [1,2,3,4,5,0], label 5 -> top1 miss, top5 hit (rank 5)
    #   s2: ranks [2,...],       label 2 -> top1 hit
    #   s3: ranks [3,4,5,1,2,0], label 0 -> rank 6: top1 miss, top5 miss
    orders = [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0], [2, 0, 1, 3, 4, 5], [3, 4, 5, 1, 2, 0]]
    logits = torch.zeros(4, 6)
    for i, order in enumerate(orders):
        for rank, c in enumerate(order):
            logits[i, c] = 10.0 - rank
    labels = torch.tensor([0, 5, 2, 0])
    # reference agrees on argmax for s0, s1 (same logits) and differs for s2, s3
    ref = logits.clone()
    ref[2] = torch.tensor([0, 0, 0, 0, 9.0, 0])
    ref[3] = torch.tensor([9.0, 0, 0, 0, 0, 0])
    return logits, labels, ref


def test_evaluate_predictions_known_answers():
    logits, labels, ref = _known_case()
    res = evaluate_predictions(logits, labels, reference_logits=ref)
    assert res["n"] == 4
    assert res["top1"] == pytest.approx(50.0)
    assert res["top5"] == pytest.approx(75.0)
    assert res["agreement"] == pytest.approx(50.0)
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert res["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_disagreements_near_tie_counts_the_references_close_calls():
    logits, labels, ref = _known_case()
    # s2 and s3 disagree; the reference decides s2 firmly (9 against 0) and s3 by a hair
    ref[3] = torch.tensor([1.0, 0.99, 0, 0, 0, 0])
    res = evaluate_predictions(logits, labels, reference_logits=ref)
    assert res["agreement"] == pytest.approx(50.0)
    assert res["disagreements_near_tie"] == pytest.approx(50.0)
    ref[2] = torch.tensor([0, 0, 0, 0, 2.0, 2.01])  # now both are near ties
    assert evaluate_predictions(logits, labels, reference_logits=ref)[
        "disagreements_near_tie"] == pytest.approx(100.0)
    same = evaluate_predictions(logits, labels, reference_logits=logits)
    assert same["agreement"] == 100.0 and same["disagreements_near_tie"] is None
    assert "disagreements_near_tie" not in evaluate_predictions(logits, labels)


def test_evaluate_loader_matches_and_restores_mode():
    logits, labels, ref = _known_case()
    model, reference = FixedLogits(logits), FixedLogits(ref)
    model.train()
    reference.eval()
    loader = DataLoader(TensorDataset(torch.arange(4), labels), batch_size=3)  # uneven batches
    res = evaluate(model, loader, reference=reference, device="cpu", progress=False)
    assert (res["top1"], res["top5"], res["agreement"], res["n"]) == pytest.approx((50.0, 75.0, 50.0, 4))
    assert model.training and not reference.training
    # max_batches stops early: only the first 3 samples (2 top1 hits of 3)
    res = evaluate(model, loader, max_batches=1, device="cpu", progress=False)
    assert res["n"] == 3 and res["top1"] == pytest.approx(200 / 3)
    assert "agreement" not in res


def test_few_classes_and_wide_heads():
    # 3 classes: top5 is undefined -> None
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    res = evaluate_predictions(logits, torch.tensor([0, 1]))
    assert res["top1"] == 50.0 and res["top5"] is None
    # a 1000-class head evaluated on labels 0..9
    head = torch.randn(20, 1000)
    y = head[:, :10].argmax(1)
    head[:, :10] += 100  # the best class is always in 0..9 and equals the label
    res = evaluate_predictions(head, y)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["num_classes"] == 1000
    # labels the model cannot output are a user error
    with pytest.raises(DataError, match="outside"):
        evaluate_predictions(torch.randn(2, 3), torch.tensor([0, 7]))


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_latency_sane(runtime, tmp_path):
    net = _tiny_cnn()
    old_threads = torch.get_num_threads()
    target = net
    if runtime == "onnxruntime":
        from compresscnn.io.export import export_onnx

        target = export_onnx(net, tmp_path / "m.onnx", (3, 8, 8))["path"]
    res = measure_latency(target, (3, 8, 8), runtime=runtime, threads=1, warmup=1, repeats=5, batch=2)
    assert torch.get_num_threads() == old_threads
    assert res["runtime"] == runtime and res["threads"] == 1 and res["repeats"] == 5
    assert 0 < res["min_ms"] <= res["p10_ms"] <= res["median_ms"] <= res["p90_ms"]
    assert res["mean_ms"] > 0 and res["median_ms"] < 1000


def test_latency_full_shape_and_caller_model_untouched():
    net = _tiny_cnn().train()
    res = measure_latency(net, (4, 3, 8, 8), warmup=0, repeats=2)
    assert res["batch"] == 4 and res["input_shape"] == [3, 8, 8] and res["device"] == "cpu"
    assert net.training
    with pytest.raises(ValueError):
        measure_latency(net, (4, 3, 8, 8), batch=2)

