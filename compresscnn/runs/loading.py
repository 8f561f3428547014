"""A finished run read back: its files checked against the manifest, the compressed model
rebuilt from ``recipe.yaml`` (the exact ranks) and ``model.safetensors``."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

# data, evaluation and report are called through their modules, so that a test (or a
# wrapper such as the DDP test's) can replace one of their functions for the whole run
from compresscnn.errors import CompressError, CheckpointError
from compresscnn.train.scratch import factorize
from compresscnn.io.models import load_architecture, replace_head
from compresscnn.io.models.checkpoints import load_weights
from compresscnn.recipe.schema import load_recipe
from compresscnn.runs.rundir import MARKER, check_file, read_manifest
from compresscnn.core.surgery import Plan, apply, plan
from compresscnn.runs.run_training import _check_switch
from compresscnn.runs.run_inputs import _input_size

log = logging.getLogger(__name__)


def exact_rules(p: Plan) -> list[dict[str, Any]]:
    """One rule per replaced layer with its exact rank: what rebuilds the architecture."""
    rules = []
    for r in p.replacements:
        if r.applied:
            rules.append({"match": r.name, "method": r.method, "rank": list(r.rank),
                          **r.options})
    return rules


def _build_untrained(recipe: dict[str, Any], model: nn.Module,
                     input_size: tuple[int, ...]) -> tuple[nn.Module, Plan | None]:
    """The model a ``train`` job trains: the dense architecture, or (with rules) its layers
    factorized before training (``compresscnn.train.scratch.factorize``)."""
    student = copy.deepcopy(model)
    if recipe["train"].get("switch"):
        _check_switch(recipe)
        return student, None  # dense until the switch (_switch_train)
    if not recipe["rules"]:
        return student, None
    tr = recipe["train"]
    return factorize(student, recipe["rules"], input_size, target=recipe.get("target"),
                     init=tr["init"], seed=int(recipe.get("seed", 0)))


def recipe_digest(recipe: dict[str, Any]) -> str:
    """The sha256 of a loaded recipe's content (not of its text: comments, layout and key
    order do not change it)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _checked_run_files(run_dir: Path) -> dict[str, Any]:
    """A run folder's recipe, once its manifest (``.compresscnn-run``), ``recipe.yaml`` and
    ``model.safetensors`` are checked against the sha256 the run recorded: a file edited by
    hand is a :class:`CheckpointError` naming it, except a recipe edited only in comments,
    layout or key order (the recipe it holds is unchanged: loaded with a warning). A folder
    without recorded hashes (written by an older version) is loaded with a warning."""
    manifest = read_manifest(run_dir)
    recipe_path, weights = run_dir / "recipe.yaml", run_dir / "model.safetensors"
    recipe = load_recipe(recipe_path)
    if check_file(run_dir, "recipe.yaml", manifest) is False:
        rec = manifest["files"]["recipe.yaml"]  # type: ignore[index]
        if rec.get("content_sha256") != recipe_digest(recipe):
            raise CheckpointError(f"{recipe_path}: edited after the run wrote it (its sha256 "
                                  f"and the recipe it holds differ from those recorded in "
                                  f"{MARKER}); the weights fit the recipe the run wrote: "
                                  f"restore it, or run the edited recipe")
        log.warning("%s: edited after the run wrote it, but only in comments, layout or key "
                    "order (the recipe it holds is the one recorded in %s); loaded",
                    recipe_path, MARKER)
    if check_file(run_dir, "model.safetensors", manifest) is False:
        raise CheckpointError(f"{weights}: its content does not match the sha256 recorded in "
                              f"{MARKER} when the run wrote it: the file is corrupt or was "
                              f"replaced")
    if not (manifest or {}).get("files"):
        log.warning("%s: no file hashes recorded (no %s manifest: a run folder of an older "
                    "version, or copied without it); recipe.yaml and model.safetensors are "
                    "loaded unchecked", run_dir, MARKER)
    return recipe


def load_compressed(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's compressed model from its ``recipe.yaml`` and load its weights.

    The architecture is rebuilt by applying the recorded exact ranks to the model spec (with
    randomly initialised weights, so nothing is downloaded or read; the kind of weights may
    shape it, as a ``.tflite`` file's padding does: ``models.load_architecture``), then the
    saved tensors are checked (names, shapes, dtypes, finite values: a recipe.yaml whose
    ranks were edited is a one-line error) and loaded strictly. No module is unpickled. First
    the folder's files are checked against the sha256 the run recorded in its manifest
    (:func:`_checked_run_files`): a recipe, weights file or manifest edited by hand is refused,
    naming the file; a recipe edited only in comments or layout is loaded with a warning.
    """
    run_dir = Path(run_dir)
    for f in ("recipe.yaml", "model.safetensors"):
        if not (run_dir / f).is_file():
            raise CompressError(f"{run_dir}: not a compresscnn run directory ({f} missing)")
    recipe = _checked_run_files(run_dir)
    model = load_architecture(recipe["model"]["spec"], recipe["model"].get("weights"))
    if recipe["model"].get("num_classes"):
        replace_head(model, recipe["model"]["num_classes"])
    input_size = _input_size(recipe, model)
    p = plan(model, recipe["rules"], input_size) if recipe["rules"] else None
    if p is not None:
        apply(model, p)
    load_weights(model, run_dir / "model.safetensors", spec=f"{run_dir / 'recipe.yaml'}")
    return model.eval()
