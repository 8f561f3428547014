import torch
from torch import nn

from compresscnn.calibration import recalibrate_bn


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
