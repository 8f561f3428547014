import copy

import pytest
import torch
from torch import nn

from compresscnn.fit.calibration import recalibrate_bn


def test_recalibrate_bn_matches_batch_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    m.eval()
    assert recalibrate_bn(m, [x[:32], x[32:]]) == 1
    assert not m.training
    with torch.no_grad():
        y = m[0](x)
    torch.testing.assert_close(m[1].running_mean, y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert m[1].momentum == 0.1


def test_no_bn_is_a_no_op():
    assert recalibrate_bn(nn.Linear(2, 2), [torch.randn(1, 2)]) == 0


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_reconstruct_lowers_output_error_and_keeps_input_model():
    from compresscnn import compress
    from compresscnn.fit.calibration import _capture

    m = _net()
    x = [torch.randn(32, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "3", "method": "tucker2", "rank": [3, 3]},
             {"match": "7", "method": "svd", "rank": 2}]
    free, _ = compress(m, rules, (3, 12, 12))
    aware, p = compress(m, rules, (3, 12, 12), calibration=x, config={"fit": {"steps": 100}})
    for row in p.replacements:
        assert row.fit["output_error"] <= row.fit["output_error_data_free"]
    assert p.replacements[0].fit["output_error"] < 0.9 * p.replacements[0].fit[
        "output_error_data_free"]
    with torch.no_grad():
        y, yf, ya = m(x[0]), free(x[0]), aware(x[0])
    assert (ya - y).norm() < (yf - y).norm()
    assert len(_capture(m, "3", x, "in")) == 3 and not aware.training


class _TwoBranch(nn.Module):
    """logits = fc(pool(relu(a(x)))) + 1e-3 * fc(pool(relu(b(x)))): b hardly matters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        f = lambda t: torch.relu(t).mean((2, 3))  # noqa: E731
        return self.fc(f(self.a(x))) + 1e-3 * self.fc(f(self.b(x)))


def test_layer_sensitivity_weighs_what_the_output_feels():
    from compresscnn.fit.calibration import layer_sensitivity
    from compresscnn.core.planning import plan

    torch.manual_seed(0)
    m = _TwoBranch().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    xs = [torch.randn(16, 3, 10, 10) for _ in range(2)]
    probe = plan(m, [{"match": ["a", "b"], "method": "tucker2"}], (3, 10, 10),
                 target={"macs": 1.0})
    w = layer_sensitivity(m, probe, xs)
    assert set(w) == {"a", "b"} and all(v >= 0 for v in w.values())
    assert w["b"] < 1e-3 * w["a"]
    assert isinstance(m.a, nn.Conv2d) and isinstance(m.b, nn.Conv2d)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_compress_with_sensitivity_allocation_meets_the_target():
    from compresscnn import compress

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    rules = [{"match": ["0", "3"], "method": "tucker2", "round_to": 1}]
    new, p = compress(m, rules, (3, 12, 12), target={"macs": 0.6}, calibration=x, config={"allocation": "sensitivity", "fit": {"steps": 10}})
    assert p.macs_after <= 0.6 * p.total_macs * 1.02
    import pytest

    from compresscnn.errors import RecipeError
    with pytest.raises(RecipeError, match="needs calibration"):
        compress(m, rules, (3, 12, 12), target={"macs": 0.6}, config={"allocation": "sensitivity"})


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)   # output also feeds the shortcut
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(y) + y


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:             # fx cannot trace this
            return self.bn(self.conv(x))
        return x


def test_following_ops_only_where_the_chain_alone_consumes_the_output():
    from compresscnn.fit.calibration import following_ops

    m = _Residual().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-1, 1)
        m.bn1.running_var.uniform_(0.5, 2)
        m.bn1.weight.uniform_(-2, 2)
    assert following_ops(m, "layer") == {}
    for through in ("bn", "activation"):
        assert list(following_ops(m, through)) == ["conv1"]   # conv2 also feeds the sum
    t = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(following_ops(m, "bn")["conv1"](t), m.bn1(t))
        torch.testing.assert_close(following_ops(m, "activation")["conv1"](t),
                                   torch.relu(m.bn1(t)))
    seq = _net()
    assert list(following_ops(seq, "bn")) == ["0"]
    assert list(following_ops(seq, "activation")) == ["0", "3"]   # conv -> ReLU
    assert following_ops(_DataDependent(), "activation") == {}


def test_fit_through_activation_fits_what_follows_the_relu():
    """Fitting through the ReLU gets the post-ReLU output closer than fitting the raw
    output does, and the reported error is the post-ReLU one."""
    from compresscnn import compress
    from compresscnn.fit.calibration import _capture, following_ops, reconstruct_outputs

    m = _net()
    x = [torch.randn(32, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "3", "method": "tucker2", "rank": [2, 2]}]
    errs = {}
    for through in ("layer", "activation"):
        c, _ = compress(m, rules, (3, 12, 12))
        fit = reconstruct_outputs(m, c, ["3"], x, steps=200, lr=3e-3,
                                  tails=following_ops(m, through))
        xs, ys = _capture(c, "3", x, "in"), _capture(m, "3", x, "out")
        with torch.no_grad():
            num = sum(float((torch.relu(c[3](a)) - torch.relu(b)).square().sum())
                      for a, b in zip(xs, ys))
            den = sum(float(torch.relu(b).square().sum()) for b in ys)
        errs[through] = (num / den) ** 0.5
        if through == "activation":
            assert fit.layers["3"]["after"] == pytest.approx(errs[through], rel=1e-5)
    assert errs["activation"] < errs["layer"]


def test_execution_order_and_refit_dense_layers_after_a_replaced_one():
    from compresscnn.fit.calibration import execution_order
    from compresscnn.core.applying import apply, refine
    from compresscnn.core.planning import plan

    m = _net()
    x = [torch.randn(32, 3, 12, 12) for _ in range(3)]
    assert execution_order(m, x[0][:1], (nn.Conv2d, nn.Linear)) == ["0", "3", "7"]
    rules = [{"match": "0", "method": "tucker2", "rank": [1, 2]}]
    p = plan(m, rules, (3, 12, 12))
    outs = {}
    for refit in (False, True):
        c = apply(copy.deepcopy(m), p)
        dense_before = c[7].weight.detach().clone()
        refine(m, c, p, x, {"steps": 150, "bn_recalibrate": False, "refit_dense": refit})
        assert torch.equal(c[7].weight, dense_before) is (not refit)
        with torch.no_grad():
            outs[refit] = float((c(x[0]) - m(x[0])).norm())
    assert outs[True] < outs[False]


def _count_calls(model: nn.Module, name: str) -> list[int]:
    calls = [0]
    model.get_submodule(name).register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_forward_pass_of_each_model():
    """The fit walks both models over the batches once: the first layer of each runs once
    per batch, whatever the number of layers fitted."""
    from compresscnn.fit.calibration import reconstruct_outputs
    from compresscnn.core.applying import apply
    from compresscnn.core.planning import plan

    m = _net()
    x = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    p = plan(m, [{"match": ["0", "3"], "method": "tucker2", "rank": [2, 2]},
                 {"match": "7", "method": "svd", "rank": 2}], (3, 12, 12))
    c = apply(copy.deepcopy(m), p)
    first_o, first_c, last_o = _count_calls(m, "0"), _count_calls(c, "0.0"), _count_calls(m, "7")
    rec = reconstruct_outputs(m, c, ["0", "3", "7"], x)
    assert rec.walk == "lockstep" and rec.forward_passes == 2
    assert first_o == [3] and first_c == [3] and last_o == [3]
    assert set(rec.layers) == {"0", "3", "7"}
    assert all(f["after"] <= f["before"] and f["seconds"] >= 0 for f in rec.layers.values())


class _TwoConvsUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > -1e9:          # fx cannot trace this
            return self.b(torch.relu(self.a(x)))
        return x


def test_untraceable_model_is_run_up_to_each_layer():
    from compresscnn.fit.calibration import reconstruct_outputs
    from compresscnn.core.applying import apply
    from compresscnn.core.planning import plan

    torch.manual_seed(0)
    m = _TwoConvsUntraceable().eval()
    x = [torch.randn(4, 3, 10, 10) for _ in range(2)]
    p = plan(m, [{"match": "*", "method": "tucker2", "rank": [2, 2]}], (3, 10, 10))
    c = apply(copy.deepcopy(m), p)
    rec = reconstruct_outputs(m, c, ["a", "b"], x)
    assert rec.walk == "per layer" and rec.forward_passes == 4
    assert all(f["after"] < f["before"] for f in rec.layers.values())


def test_closed_form_is_never_worse_than_data_free_on_a_small_net():
    from compresscnn import compress

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "0", "method": "cp", "rank": 3},
             {"match": "3", "method": "spatial", "rank": 3},
             {"match": "7", "method": "svd", "rank": 2}]
    free, _ = compress(m, rules, (3, 12, 12))
    for through in ("layer", "bn", "activation"):
        aware, p = compress(m, rules, (3, 12, 12), calibration=x, config={"fit": {"fit_through": through}})
        assert p.calibration["solver"] == "closed_form" and p.calibration["forward_passes"] == 2
        for row in p.replacements:
            assert row.fit["fit_solver"] == "closed_form"
            assert row.fit["output_error"] <= row.fit["output_error_data_free"]
        with torch.no_grad():
            assert (aware(x[0]) - m(x[0])).norm() < (free(x[0]) - m(x[0])).norm()


def test_non_finite_calibration_batch_is_a_one_line_error():
    from compresscnn import compress
    from compresscnn.errors import DataError

    m = _net()
    x = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    x[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=r"^calibration batch 1: holds NaN or Inf values$"):
        compress(m, [{"match": "3", "method": "tucker2", "rank": [2, 2]}], (3, 12, 12),
                 calibration=x)


def test_solver_adam_is_the_iterative_fit():
    from compresscnn.core.applying import apply, refine
    from compresscnn.core.planning import plan

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    p = plan(m, [{"match": "3", "method": "tucker2", "rank": [2, 2]}], (3, 12, 12))
    c = apply(copy.deepcopy(m), p)
    fitted = refine(m, c, p, x, {"steps": 15, "solver": "adam"})
    assert p.calibration is None and p.replacements[0].fit == {}  # p is not edited
    fit = fitted.replacements[0].fit
    assert fit["fit_solver"] == "adam" and fit["fit_iters"] == 15
    assert fit["output_error"] <= fit["output_error_data_free"]
    assert fitted.calibration["solver"] == "adam"
    from compresscnn.errors import RecipeError
    with pytest.raises(RecipeError, match=r"refine\(\): solver: expected one of 'closed_form', 'adam', got 'sgd'"):
        refine(m, c, p, x, {"solver": "sgd"})


def _damaged(n: int, batch: int = 32) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """:func:`_net`, a copy of it with one layer damaged (which the others cannot see), and
    ``n`` random batches."""
    m = _net()
    x = [torch.randn(batch, 3, 12, 12) for _ in range(n)]
    student = copy.deepcopy(m)
    with torch.no_grad():
        student[3].weight.mul_(0.3)
    return m, student, x


def test_distill_outputs_moves_the_compressed_model_towards_the_original():
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill

    m, student, x = _damaged(4)
    bn_mean = student[1].running_mean.clone()
    out = distill_outputs(m, student, x, CalibrationDistill(epochs=20, lr=3e-3, amp=False))
    assert out["steps"] == 80 and out["amp"] == "off"
    assert out["loss_after"] < 0.5 * out["loss_before"]
    assert out["agreement_after"] >= out["agreement_before"]
    assert not student.training
    torch.testing.assert_close(student[1].running_mean, bn_mean)  # statistics kept


def test_distill_outputs_says_where_it_is(monkeypatch):
    """The original's outputs on the batches (a minute on ImageNet-size batches) and the
    passes are loops that report their progress."""
    from compresscnn.fit import calibration
    from compresscnn.fit.config import CalibrationDistill

    loops = []

    def spy(items, what, **kw):
        items = list(items)
        loops.append((what, len(items)))
        return iter(items)

    monkeypatch.setattr(calibration, "track", spy)
    m, student, x = _damaged(3)
    calibration.distill_outputs(m, student, x, CalibrationDistill(epochs=2, amp=False))
    gap = ("agreement with the original, batch", 3)
    assert loops == [("original's outputs, batch", 3),
                     ("original's outputs, mirrored batch", 3), gap, ("distill epoch", 2), gap]


def test_distill_holdout_keeps_the_pass_that_scores_best_on_the_held_out_batches():
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill

    m, student, x = _damaged(5)
    good = distill_outputs(m, student, x, CalibrationDistill(epochs=6, lr=3e-3, amp=False,
                                                          holdout=1))
    assert good["steps"] == 24 and good["holdout"] == 1  # 4 batches train, 1 scores
    assert len(good["holdout_loss"]) == len(good["holdout_agreement"]) == 7
    assert good["kept_pass"] > 0
    assert good["holdout_loss"][good["kept_pass"]] == min(good["holdout_loss"])
    assert good["holdout_loss"][good["kept_pass"]] < 0.5 * good["holdout_loss"][0]
    # a rate that wrecks the model: every pass scores worse than none, the fit is kept as is
    start = copy.deepcopy(student.state_dict())
    bad = distill_outputs(m, student, x, CalibrationDistill(epochs=3, lr=5.0, amp=False,
                                                         holdout=2))
    assert bad["kept_pass"] == 0 and bad["steps"] == 9
    assert min(bad["holdout_loss"][1:]) > bad["holdout_loss"][0]
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, start[k])
    with pytest.raises(ValueError, match="holdout: 5 leaves none of the 5"):
        distill_outputs(m, student, x, CalibrationDistill(holdout=5))


def test_distill_outputs_with_layer_outputs_matches_the_replaced_layers():
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill

    m = _net()
    m[4] = nn.ReLU(inplace=True)  # the hooked output is overwritten right after the layer
    x = [torch.randn(32, 3, 12, 12) for _ in range(4)]
    xs = torch.cat(x)

    def damaged():
        s = copy.deepcopy(m)
        with torch.no_grad():
            s[3].weight.mul_(0.3)
        return s

    def layer_error(s):
        with torch.no_grad():
            a, b = s[:4](xs), m[:4](xs)
        return float((a - b).norm() / b.norm())

    plain, feat = damaged(), damaged()
    start = layer_error(plain)
    kw = dict(epochs=10, lr=3e-3, amp=False)
    p = distill_outputs(m, plain, x, CalibrationDistill(**kw), layers=["3"])
    f = distill_outputs(m, feat, x, CalibrationDistill(**kw, features=1.0), layers=["3"])
    assert (p["features"], p["feature_layers"]) == (0.0, 0)
    assert (f["features"], f["feature_layers"]) == (1.0, 1)
    assert layer_error(feat) < 0.5 * start and layer_error(feat) < layer_error(plain)
    assert f["loss_after"] < f["loss_before"]
    with pytest.raises(ValueError, match="names of the replaced layers"):
        distill_outputs(m, damaged(), x, CalibrationDistill(features=1.0))
    with pytest.raises(ValueError, match="expected a number >= 0"):
        distill_outputs(m, damaged(), x, CalibrationDistill(features=-1.0), layers=["3"])


def test_distill_outputs_needs_batches():
    from compresscnn.fit.calibration import distill_outputs

    with pytest.raises(ValueError, match="at least one"):
        distill_outputs(_net(), _net(), [])


def test_compress_with_distill_records_it_in_the_plan():
    from compresscnn import compress

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "3", "method": "tucker2", "rank": [2, 2]}]
    plain, p0 = compress(m, rules, (3, 12, 12), calibration=x)
    kd, p1 = compress(m, rules, (3, 12, 12), calibration=x, config={"fit": {"distill": {"epochs": 10, "lr": 3e-3, "flip": False}}})
    d = p1.calibration["distill"]
    assert d["steps"] == 30 and d["flip"] is False
    assert "distill" not in p0.calibration
    assert d["loss_after"] < d["loss_before"]
    _, p2 = compress(m, rules, (3, 12, 12), calibration=x, config={"fit": {"distill": {"epochs": 2, "features": 0.5}}})  # the plan's layers matched
    assert (p2.calibration["distill"]["features"], p2.calibration["distill"]["feature_layers"]) \
        == (0.5, 1)
    with torch.no_grad():
        y = m(torch.cat(x))
        assert (kd(torch.cat(x)) - y).norm() < (plain(torch.cat(x)) - y).norm()


def test_compress_seed_draws_the_distillation():
    from compresscnn import compress

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "3", "method": "tucker2", "rank": [2, 2]}]
    fit = {"distill": {"epochs": 3, "lr": 3e-3}}
    a, _ = compress(m, rules, (3, 12, 12), config={"seed": 0, "fit": fit}, calibration=x)
    b, _ = compress(m, rules, (3, 12, 12), config={"seed": 0, "fit": fit}, calibration=x)
    c, _ = compress(m, rules, (3, 12, 12), config={"seed": 1, "fit": fit}, calibration=x)
    with torch.no_grad():
        ya, yb, yc = (net(torch.cat(x)) for net in (a, b, c))
    torch.testing.assert_close(ya, yb)  # the same seed: the same model
    assert not torch.allclose(ya, yc)  # another order of batches and flips


def test_distill_settings_are_validated_like_the_recipe():
    from compresscnn import compress
    from compresscnn.errors import RecipeError

    with pytest.raises(RecipeError, match="distill.epochs"):
        compress(_net(), [{"match": "3", "method": "svd", "rank": 2}], (3, 12, 12), calibration=[torch.randn(4, 3, 12, 12)], config={"fit": {"distill": {"epochs": 0}}})


def test_distill_precision_from_the_recipe_spelling():
    from compresscnn import compress
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill
    from compresscnn.util.common import cpu_bf16_native

    m, student, x = _damaged(2, batch=8)
    kw = dict(epochs=1, lr=1e-4)
    assert distill_outputs(m, student, x, CalibrationDistill(**kw, amp="off"))["amp"] == "off"
    assert distill_outputs(m, student, x, CalibrationDistill(**kw, amp="bf16"))["amp"] == "bf16"
    auto = distill_outputs(m, student, x, CalibrationDistill(**kw, amp="auto"))["amp"]
    assert auto == ("bf16" if cpu_bf16_native() else "off")
    with pytest.raises(ValueError, match=r"amp\n  expected one of 'auto', 'off', 'bf16', got 'fp16'"):
        distill_outputs(m, student, x, CalibrationDistill(**kw, amp="fp16"))
    _, p = compress(_net(), [{"match": "3", "method": "svd", "rank": 2}], (3, 12, 12), calibration=x, config={"fit": {"distill": {"epochs": 1, "amp": "off"}}})
    assert p.calibration["distill"]["amp"] == "off"


def test_held_out_batches_are_kept_out_of_the_layer_wise_fit_too():
    from compresscnn import compress
    from compresscnn.errors import RecipeError

    m = _net()
    x = [torch.randn(16, 3, 12, 12) for _ in range(3)]
    rules = [{"match": "3", "method": "svd", "rank": 2}]
    fit_only, _ = compress(copy.deepcopy(m), rules, (3, 12, 12), calibration=x[:2])
    # a rate that wrecks every pass: the holdout keeps pass 0, the fit on the first 2 batches
    held, p = compress(copy.deepcopy(m), rules, (3, 12, 12), calibration=x, config={"fit": {"distill": {"epochs": 2, "lr": 5.0, "holdout": 1, "amp": "off"}}})
    assert p.calibration["distill"]["kept_pass"] == 0
    for k, v in fit_only.state_dict().items():
        torch.testing.assert_close(held.state_dict()[k], v)
    with pytest.raises(RecipeError, match="distill.holdout: 3 leaves none of the 3"):
        compress(copy.deepcopy(m), rules, (3, 12, 12), calibration=x, config={"fit": {"distill": {"epochs": 1, "holdout": 3}}})


#: the smallest valid recipe the calibration keys are checked against
_RECIPE_BASE = {"model": {"spec": "cifar:resnet20"},
                "rules": [{"match": "layer1.*", "method": "cp", "rank": 4}],
                "data": {"dataset": "cifar10", "root": "x.zip"}}


def test_distill_holdout_must_leave_batches_to_train_on():
    from compresscnn.errors import RecipeError
    from compresscnn.recipe.schema import validate

    base = _RECIPE_BASE
    with pytest.raises(RecipeError, match=r"calibration\.distill\.holdout: holdout 4 leaves "
                                          "none of the 4 calibration batches"):
        validate({**base, "calibration": {"batches": 4, "distill": {"holdout": 4}}})
    ok = validate({**base, "calibration": {"batches": 4, "distill": {"holdout": 1}}})
    assert ok["calibration"]["distill"]["holdout"] == 1


def test_mix_batch_mixes_within_the_batch_reproducibly():
    from compresscnn.fit.calibration import mix_batch

    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    assert mix_batch(x, "none", 1.0, torch.Generator()) is x
    a = mix_batch(x, "mixup", 1.0, torch.Generator().manual_seed(1))
    b = mix_batch(x, "mixup", 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    # each mixup image is a convex blend of two images of the batch: constant, within range
    assert torch.all(a.amax((1, 2, 3)) == a.amin((1, 2, 3))) and not torch.equal(a, x)
    assert a.min() >= 0 and a.max() <= 5
    c = mix_batch(x, "cutmix", 1.0, torch.Generator().manual_seed(3))
    # cutmix pastes a box: every pixel comes from some image of the batch, unchanged
    assert set(c.unique().tolist()) <= set(range(6))
    assert c.shape == x.shape and (c != x).any()


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_distill_outputs_with_mixed_inputs(mix):
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill

    m, student, x = _damaged(3, batch=16)
    out = distill_outputs(m, student, x, CalibrationDistill(epochs=10, lr=3e-3, amp=False,
                                                         mix=mix))
    assert out["mix"] == mix and out["steps"] == 30
    assert out["loss_after"] < out["loss_before"]
    with pytest.raises(ValueError, match="mix"):
        distill_outputs(m, student, x, CalibrationDistill(mix="blend"))


def test_crop_batch_crops_each_image_to_its_own_box_reproducibly():
    from compresscnn.fit.calibration import crop_batch

    # every image a horizontal ramp 0..1: a crop resized back is a ramp over a sub-range
    ramp = torch.linspace(0.0, 1.0, 32).expand(4, 3, 32, 32).contiguous()
    assert crop_batch(ramp, 1.0, torch.Generator()) is ramp
    a = crop_batch(ramp, 0.25, torch.Generator().manual_seed(0))
    b = crop_batch(ramp, 0.25, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == ramp.shape and not torch.allclose(a, ramp)
    assert a.min() >= 0.0 and a.max() <= 1.0  # the box lies inside the image
    assert bool((a.diff(dim=-1) >= -1e-6).all())  # still increasing along the width
    spans = a[:, 0, 0, -1] - a[:, 0, 0, 0]  # the share of the width each box covers
    assert bool((spans < 0.999).all()) and bool((spans > 0.25 * 0.75 - 0.05).all())
    assert len(set(spans.round(decimals=4).tolist())) == 4  # a box per image


def test_distill_outputs_with_crops_and_warmup():
    from compresscnn.fit.calibration import distill_outputs
    from compresscnn.fit.config import CalibrationDistill

    m, student, x = _damaged(3, batch=16)
    out = distill_outputs(m, student, x, CalibrationDistill(epochs=10, lr=3e-3, amp=False,
                                                         crop=0.3, warmup=0.2))
    assert out["crop"] == 0.3 and out["warmup"] == 0.2 and out["steps"] == 30
    assert out["loss_after"] < out["loss_before"]
    for bad in ({"crop": 0.0}, {"crop": 1.5}, {"warmup": 1.0}, {"warmup": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            distill_outputs(m, student, x, CalibrationDistill(**bad))


def test_recipe_refuses_a_crop_or_warmup_out_of_range():
    from compresscnn.errors import RecipeError
    from compresscnn.recipe.schema import validate

    base = _RECIPE_BASE
    for key, value in (("crop", 0), ("crop", 1.2), ("warmup", 1.0)):
        with pytest.raises(RecipeError, match=rf"calibration\.distill\.{key}"):
            validate({**base, "calibration": {"distill": {key: value}}})
    ok = validate({**base, "calibration": {"distill": {"crop": 0.35, "warmup": 0.1}}})
    assert ok["calibration"]["distill"]["crop"] == 0.35
