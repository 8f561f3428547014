"""Where a run's compressed model disagrees with the original, and how firm the original's
decisions are there (:func:`compresscnn.agreement_margins`): the share of the
disagreements on which the original's two largest softmax probabilities are a near tie, and
the original's agreement with itself on the same images mirrored left-right and in bf16
autocast (how stable its own decisions are under a perturbation). Both models
and the images come from the run directory (``compresscnn.load_compressed``, the
recipe's model and weights, the recipe's ``data.eval`` source through ``compresscnn.io.data``,
exactly as ``compresscnn run`` scored them). The original is rebuilt from the recipe's
``model.spec`` and ``model.weights``: a run without a weights file, or one that replaced the
classifier head (``model.num_classes``), is refused (its original is not on file).

    python tools/agreement_margins.py runs/experiments/squeezenet1_1_auto_1.5x_b31 --json tools/results/squeezenet1_1_auto_1.5x_margins.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from compresscnn import (CompressError, agreement_margins, load_compressed, load_model,
                         load_recipe, make_loaders)

ROOT = Path(__file__).resolve().parents[1]


def measure(run_dir: Path, *, mirror: bool = True, bf16: bool = True) -> dict:
    """:func:`agreement_margins` of ``run_dir``'s compressed model against its original on
    the run's evaluation images."""
    if not (run_dir / "recipe.yaml").is_file():
        raise CompressError(f"{run_dir}: not a compresscnn run directory (recipe.yaml missing)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    if not recipe.get("data"):
        raise CompressError(f"{run_dir / 'recipe.yaml'}: the run has no data section to score on")
    if not recipe["model"].get("weights"):
        raise CompressError(f"{run_dir / 'recipe.yaml'}: model.weights is null: the run's "
                            "original is not on file (a weights file is needed to rebuild it)")
    if recipe["model"].get("num_classes"):
        raise CompressError(f"{run_dir / 'recipe.yaml'}: model.num_classes replaced the "
                            "original's head with a new one, which is not on file")
    compressed = load_compressed(run_dir)
    original = load_model(recipe["model"]["spec"], recipe["model"].get("weights")).eval()
    pcfg = dict(getattr(original, "pretrained_cfg", {}) or {})
    if recipe["model"].get("input_size"):
        pcfg["input_size"] = tuple(recipe["model"]["input_size"])
    _, loader = make_loaders(recipe["data"], pcfg, train=False, test=True)
    out = agreement_margins(compressed, original, loader, mirror=mirror, bf16=bf16)
    out["margin_below"] = {str(k): v for k, v in out["margin_below"].items()}
    out["margin_below_all"] = {str(k): v for k, v in out["margin_below_all"].items()}
    return {"run": str(run_dir), "model": recipe["model"]["spec"], **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a run directory of `compresscnn run`")
    ap.add_argument("--no-mirror", action="store_true",
                    help="skip the original's agreement with itself on mirrored images")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the original's agreement with itself under bf16 autocast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        r = measure(a.run_dir, mirror=not a.no_mirror, bf16=not a.no_bf16)
    except CompressError as e:
        print(f"error: {e}")
        return 2
    print(f"{r['run']}: agreement {r['agreement']:.1f}% on {r['n']} images "
          f"({r['disagreements']} disagreements)")
    for m, share in r["margin_below"].items():
        print(f"  original's top-2 probabilities within {m}: {share if share is None else round(share, 1)}% "
              f"of the disagreements, {r['margin_below_all'][m]:.1f}% of all images")
    if r["reference_mirror_agreement"] is not None:
        print(f"  original against itself on the mirrored images: "
              f"{r['reference_mirror_agreement']:.1f}% agreement")
    if r["reference_bf16_agreement"] is not None:
        print(f"  original against itself in bf16 autocast: "
              f"{r['reference_bf16_agreement']:.1f}% agreement")
    if a.json:
        r["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
