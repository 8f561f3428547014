"""The compare recipe (``compresscnn compare --recipe FILE``): a small YAML whose schema is
:class:`CompareRecipe`, the compare settings plus the entries, a title and an output folder::

    title: SqueezeNet vs AlexNet (ImageNet)
    compare: [torchvision:alexnet, {model: torchvision:squeezenet1_1, weights: ...}, ...]
    data: {imagenet: {root: ..., resize: null, crop: null}}   # or a data section, or null
    latency_batches: [1, 32]
    threads: 2
    output: runs/compare_squeezenet_alexnet_imagenet
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping

from pydantic import BeforeValidator, ValidationError

from compresscnn.config import Nullable, Str, Where, bad, doc, expand_env, show
from compresscnn.recipe.schema import load_yaml, yaml_lines
from compresscnn.runs.compare import (CompareError, CompareSettings, _data_map, _looks_like_path,
                                      _normalize, compare)
from compresscnn.runs.compare_output import compare_outputs, write_compare

__all__ = ["CompareRecipe", "RECIPE_KEYS", "load_compare_recipe", "run_compare_recipe"]


def _entries(v: Any) -> list:
    if not isinstance(v, list) or not v:
        raise bad(f"expected a non-empty list of entries (model specs, run directories or "
                  f"mappings), got {show(v)}")
    return v


class CompareRecipe(CompareSettings):
    """A compare recipe (``compresscnn compare --recipe FILE``): the entries, a title, an
    output folder and the compare settings."""

    title: Nullable(Str()) = doc("Title of the table and plot (default: the file's stem).", None)
    compare: Annotated[list[Any], BeforeValidator(_entries)] = doc(
        "Entries: model specs, run directories, {model, weights, label, data, input_size}, "
        "{run, label} or {recipe, weights, label}.")
    output: Nullable(Str()) = doc("Output folder (default runs/<file stem>), relative to the "
                                  "cwd.", None)

    @classmethod
    def not_mapping(cls, v: Any) -> str:
        return f"expected a mapping with keys {', '.join(cls.model_fields)}, got {show(v)}"


RECIPE_KEYS: tuple[str, ...] = tuple(CompareRecipe.model_fields)


def _expand(text: str, base: Path | None) -> str:
    """``${VAR}``/``${VAR:-default}`` expanded (compresscnn.recipe.schema's rules), ``~`` expanded; a
    relative path is taken in the recipe's folder if it exists there, else in the cwd."""
    s = os.path.expanduser(expand_env(text))
    if base is not None and not os.path.isabs(s) and (base / s).exists():
        return str((base / s).resolve())
    return os.path.abspath(s) if os.path.exists(s) else s


def load_compare_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a compare recipe; returns every key with defaults filled and paths
    resolved. A problem is a one-line :class:`CompareError` naming the file and key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CompareError(f"compare recipe not found: {p}")
    try:
        node, data = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except yaml.YAMLError as exc:
        raise CompareError(f"{p}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareError(f"{p}: cannot read ({exc})") from None

    where = Where(source=str(p), lines=yaml_lines(node), kind=CompareError)
    try:
        out = CompareRecipe.model_validate(data, context={"where": where}).model_dump()
    except ValidationError as exc:
        raise where.error(exc) from None
    base = p.resolve().parent
    entries: list[Any] = []
    for i, e in enumerate(out["compare"]):
        if isinstance(e, str):
            e = e.strip()
            entries.append(_expand(e, base) if (":" not in e or _looks_like_path(e)) else e)
        elif isinstance(e, dict):
            e = dict(e)
            for key in ("run", "recipe", "weights"):
                if isinstance(e.get(key), str) and (key != "weights" or _looks_like_path(e[key])):
                    e[key] = _expand(e[key], base)
            if isinstance(e.get("data"), dict) and isinstance(e["data"].get("root"), str):
                e["data"] = {**e["data"], "root": _expand(e["data"]["root"], base)}
            entries.append(e)
        else:
            raise where.fail(("compare", i), "expected a spec, a path or a mapping, got "
                                             f"{show(e)}")
        try:
            _normalize(entries[-1], i)
        except CompareError as exc:
            raise CompareError(f"{p}: {exc}") from None
    out["compare"] = entries
    try:
        dmap = _data_map(out["data"])
    except CompareError as exc:
        raise CompareError(f"{p}: {exc}") from None
    for name, sec in dmap.items():
        if isinstance(sec.get("root"), str):
            sec["root"] = _expand(sec["root"], base)
    out["data"] = dmap or None
    out["title"] = out["title"] or p.stem
    out["output"] = os.path.expanduser(out["output"] or f"runs/{p.stem}")
    return out


def run_compare_recipe(path: str | os.PathLike, *, out: str | os.PathLike | None = None,
                       extra_entries: Iterable[Any] = (), json_path: str | os.PathLike | None = None,
                       log: Any = None, overrides: Mapping[str, Any] | None = None
                       ) -> list[dict[str, Any]]:
    """Load a compare recipe, run :func:`~compresscnn.runs.compare.compare` and
    :func:`~compresscnn.runs.compare_output.write_compare`. ``overrides``: compare settings
    (``data``, ``threads``, ``onnx``, ...) that replace the recipe's values when not None."""
    cfg = load_compare_recipe(path)
    settings = {k: cfg[k] for k in CompareSettings.model_fields}
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    out_dir = Path(out if out is not None else cfg["output"])
    rows = compare(list(cfg["compare"]) + list(extra_entries), settings,
                   workdir=out_dir / "onnx", log=log,
                   out_files=compare_outputs(out_dir, json_path), reads=[("recipe", path)])
    write_compare(rows, out_dir, title=cfg["title"], json_path=json_path)
    return rows
