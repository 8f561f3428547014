"""Sweep files: named jobs, each a recipe and the overrides that make it.

A sweep keeps a series of measured experiments as data rather than as command lines::

    jobs:
      resnet20_dense_3ep:
        recipe: recipes/resnet20_cifar10_2x.yaml
        set: {rules: [], target: null, calibration: null, finetune.epochs: 3}

``set`` maps the same dotted keys as ``--set`` to YAML values. :func:`load_sweep` reads the
file with the recipe's limits (``yaml.safe_load``, size and alias caps, duplicate keys refused)
and validates every job's recipe with its overrides through the recipe schema, so a typo in
the 90th job is reported before the first one runs. Each job runs as
``compresscnn run RECIPE --set KEY=VALUE ...`` (:meth:`SweepJob.command`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compresscnn.config import one_line
from compresscnn.errors import RecipeError
from compresscnn.recipe.schema import _line_map, _read_text, _yaml_error, load_recipe, load_yaml

__all__ = ["Sweep", "SweepJob", "load_sweep"]

#: job names become folder and file names
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _flow(value: Any) -> str:
    """A YAML value on one line, as ``--set`` reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.strip().removesuffix("...").strip()


class SweepJob(BaseModel):
    """One job: a recipe file (relative to the sweep's ``root``) and its overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)

    def overrides(self) -> list[str]:
        """The ``--set`` arguments, ``key=value`` with the value as one-line YAML."""
        return [f"{key}={_flow(value)}" for key, value in self.set.items()]

    def command(self, out: str | os.PathLike | None = None) -> list[str]:
        """``compresscnn run RECIPE [--out OUT] --set ...``, as a user would type it."""
        cmd = ["compresscnn", "run", self.recipe]
        if out is not None:
            cmd += ["--out", os.fspath(out)]
        for text in self.overrides():
            cmd += ["--set", text]
        return cmd


class Sweep(BaseModel):
    """Named jobs, in the order the file lists them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs: dict[str, SweepJob] = Field(min_length=1)


def _check_names(sweep: Sweep, label: str) -> None:
    import re

    for name in sweep.jobs:
        if not re.match(_NAME, name):
            raise RecipeError(one_line(
                f"sweep {label}: job {name!r}: a name of letters, digits, '_', '.' and '-' "
                "(it names the job's run folder and results file)"))


def load_sweep(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
               validate: bool = True) -> Sweep:
    """Read a sweep file and (``validate``) check every job's recipe with its overrides.

    ``root``: the folder the jobs' recipe paths are relative to (default: the current
    directory, as for ``compresscnn run``). Raises :class:`RecipeError` with a one-line
    message naming the file and the job.
    """
    label = os.fspath(path)
    text = _read_text(Path(label), label)
    try:
        node, data = load_yaml(text, label)
    except yaml.YAMLError as e:
        raise _yaml_error(label, e) from None
    dups: list = []
    if node is not None:
        _line_map(node, (), {}, dups)
    if dups:
        key, first, again = dups[0]
        raise RecipeError(one_line(f"sweep {label}: {'.'.join(map(str, key))}: duplicate key "
                                   f"(first at line {first}, again at line {again})"))
    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise RecipeError(one_line(f"sweep {label}: {where}: {err['msg']}")) from None
    _check_names(sweep, label)
    if validate:
        base = Path(root) if root is not None else Path.cwd()
        for name, job in sweep.jobs.items():
            try:
                load_recipe(base / job.recipe, job.overrides())
            except RecipeError as e:
                raise RecipeError(one_line(f"sweep {label}: job {name}: {e}")) from None
    return sweep
