"""tools/bench_cifar_resnet.py: which stored rows a new run replaces (no data needed)."""

from __future__ import annotations

from _tools import load_tool


BASE = {"config": "cp", "model": "resnet20", "target_macs": 0.5, "uniform": False,
        "epochs": 0, "alpha": 0.9}


def test_rows_from_before_an_option_count_as_measured_with_its_old_value():
    b = load_tool("bench_cifar_resnet")
    legacy = {**BASE, "calibrate": 8}                 # written before the data-aware options
    old_way = {**BASE, "calibrate": 8, "allocation": "spectral", "steps": 300,
               "fit_through": "layer", "refit_dense": False, "bn_recalibrate": True}
    assert b._same_settings(legacy, old_way)
    for key, value in (("fit_through", "activation"), ("bn_recalibrate", False),
                       ("steps", 600), ("refit_dense", True), ("allocation", "energy")):
        assert not b._same_settings(legacy, {**old_way, key: value})
    free = {**BASE, "calibrate": 0, "allocation": "spectral",
            **dict.fromkeys(b._CALIBRATED)}                 # data-free: no data-aware keys
    assert b._same_settings({**BASE}, free)
    assert not b._same_settings(legacy, free)
