"""The recipe-looping benchmarks (tools/bench_cifar_resnet.py, bench_squeezenet_methods.py):
every row they would run is a valid ``compresscnn run RECIPE --set ...`` of a shipped recipe,
with the options turned into the recipe keys they name (no data or training needed)."""

from __future__ import annotations

import json

import pytest
from _tools import load_tool

from compresscnn.recipe.schema import load_recipe


def _rows(tool: str, argv: list[str], tmp_path) -> list[tuple[str, str, list[str]]]:
    mod = load_tool(tool)
    calls = []

    def fake_run(job, recipe, sets, out_root, threads):
        calls.append((job, recipe, sets))
        return {"zero_shot_top1": 80.0, "zero_shot_agreement": 90.0, "top1": 81.0}

    mod.run_recipe = fake_run
    mod.main([*argv, "--json", str(tmp_path / "rows.json")])
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(calls)
    return calls


def test_cifar_resnet_rows_are_recipe_overrides(tmp_path):
    calls = _rows("bench_cifar_resnet", ["--model", "resnet56", "--configs", "cp", "fire",
                                         "--macs", "0.333", "--epochs", "1", "--distill",
                                         "--solver", "adam", "--refit-dense"], tmp_path)
    assert [c[1] for c in calls] == ["recipes/resnet56_cifar10_2x.yaml"] * 2
    for (job, recipe, sets), method in zip(calls, ("cp", "fire")):
        r = load_recipe(recipe, sets)
        assert r["rules"][0]["method"] == method and r["target"] == {"macs": 0.333}
        assert r["calibration"]["solver"] == "adam" and r["calibration"]["refit_dense"]
        assert r["finetune"]["epochs"] == 1 and r["finetune"]["distill"]["enabled"]
        assert method in job


def test_cifar_resnet_zero_shot_data_free_uniform(tmp_path):
    (job, recipe, sets), = _rows("bench_cifar_resnet", ["--configs", "spatial", "--uniform",
                                                        "--calibrate", "0"], tmp_path)
    r = load_recipe(recipe, sets)
    assert r["calibration"] is None and r["target"] is None
    assert r["rules"][0]["macs"] == 0.5 and not r["finetune"]["enabled"]


@pytest.mark.parametrize("svd_1x1", [False, True])
def test_squeezenet_rows_are_recipe_overrides(tmp_path, svd_1x1):
    argv = ["--methods", "spatial", "--fit-through", "layer"] + (["--svd-1x1"] if svd_1x1 else [])
    (job, recipe, sets), = _rows("bench_squeezenet_methods", argv, tmp_path)
    r = load_recipe(recipe, sets)
    assert [x["method"] for x in r["rules"]] == ["spatial", "svd"][: 1 + svd_1x1]
    assert r["calibration"]["fit_through"] == "layer" and r["target"] == {"macs": 0.667}
