"""The recipe reference (``recipes/README.md``), generated from the config models, and
``python -m compresscnn.recipe``: the reference, the registered methods, or a recipe checked
and printed resolved.

``python -m compresscnn.recipe --reference > recipes/README.md`` regenerates the reference;
a test checks that the committed file is what this module writes.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import yaml

from compresscnn.config import Closed, section_of, spec_of
from compresscnn.core.rules import RuleBase, Target, _options, _registry
from compresscnn.errors import RecipeError
from compresscnn.recipe.schema import (MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES,
                                       RESUME_FREE, Recipe, load_recipe)

__all__ = ["reference_markdown", "main"]


def _text(s: str | None) -> str:
    return " ".join((s or "").split())


def _type_doc(f: Any) -> str:
    s = spec_of(f.annotation, f.metadata)
    return s.doc if s is not None else "any"


def _inner_doc(f: Any) -> str:
    """The type of a nullable field without its "or null"."""
    for t in getattr(f.annotation, "__args__", ()):
        s = spec_of(t)
        if s is not None:
            return s.doc
    return _type_doc(f)


def _md_default(f: Any) -> str:
    extra = f.json_schema_extra or {}
    if isinstance(extra, dict) and extra.get("default_doc") is not None:
        return str(extra["default_doc"])
    if f.is_required():
        return "**required**"
    d = f.get_default(call_default_factory=True)
    if d is None:
        s = "null"
    elif isinstance(d, bool):
        s = "true" if d else "false"
    elif isinstance(d, list):
        s = "[" + ", ".join(str(x) for x in d) + "]"
    else:
        s = str(d)
    return f"`{s}`"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _section_rows(model: type[Closed], prefix: str) -> tuple[list, list[tuple[str, type]]]:
    rows, subs = [], []
    for key, f in model.model_fields.items():
        full = f"{prefix}{key}"
        sub = section_of(f.annotation)
        if full == "rules":
            rows.append((f"`{full}`", "list of rules", _md_default(f), f.description or ""))
        elif full == "target":
            rows.append((f"`{full}`", "mapping or null", _md_default(f), f.description or ""))
        elif sub is not None:
            presence = ("**required**" if f.is_required() else "null (off)"
                        if type(None) in getattr(f.annotation, "__args__", ()) else
                        "(all defaults)")
            rows.append((f"`{full}`", "section", presence, _text(sub.__doc__)))
            subs.append((full, sub))
        else:
            rows.append((f"`{full}`", _type_doc(f), _md_default(f), f.description or ""))
    return rows, subs


def reference_markdown() -> str:
    """The recipe reference (recipes/README.md), generated from the models."""
    L = (_reference_intro() + _reference_sections() + _reference_rules()
         + _reference_target() + list(_REFERENCE_TAIL))
    return "\n".join(L)


def _reference_intro() -> list[str]:
    """Title, how recipes are read, and the conventions every key follows."""
    return [
        "# Recipe reference",
        "",
        "<!-- Generated from the config models (compresscnn/config.py, core/rules.py,",
        "     fit/config.py, train/config.py) and compresscnn/recipe/schema.py; do not edit by",
        "     hand. Regenerate with",
        "     python -m compresscnn.recipe --reference > recipes/README.md -->",
        "",
        "A recipe is a YAML file run with `compresscnn run recipes/X.yaml`. The schema is",
        "**closed**: every mapping rejects keys it does not know (with a suggestion for a",
        "misspelling), so a typo is an error, never a silently ignored setting. Problems are",
        "reported on one line as `<file>: <key path>: <what is wrong> (line N)`, e.g.",
        "`recipes/x.yaml: rules[2].rank: expected int, ..., got 'half' (line 7)`.",
        "",
        "The run directory holds the recipe as run (the *resolved* recipe): every default",
        "filled in, environment variables expanded and paths made absolute; loading that",
        "file again gives the same recipe.",
        "",
        "## Conventions",
        "",
        "- **Numbers.** YAML 1.1 (PyYAML) reads `5e-4` as a *string*; every float field",
        "  also accepts a string that reads as a number (`5e-4`, `1.0e-3`) and ints (`1`).",
        "  Non-finite numbers (`.inf`, `.nan`) are rejected. Int fields never accept a",
        "  boolean (`yes`, `true`) or a float (`3.0`).",
        "- **Fractions** are in (0, 1] and mean the part *kept* (0.5 keeps half).",
        "- **Paths** (`model.weights` when it looks like a path, `data.root`, each data",
        "  source's `root`): `~` and environment variables are expanded,",
        "  then a relative path is taken relative to the recipe file's folder if it exists",
        "  there, else relative to the current working directory. `output` and",
        "  `data.download_dir` are relative to the current working directory.",
        "- **Environment variables**: only `${VAR}` and `${VAR:-default}` (the default is used",
        "  when VAR is unset or empty) are expanded; `${VAR}` with VAR unset is an error.",
        "  Nothing else is interpolated and nothing is executed, e.g.",
        "  `root: ${COMPRESSCNN_SHARED_DATA:-../shared/data}/cifar10`.",
        "- **Overrides**: `compresscnn run recipe.yaml --set finetune.epochs=3 --set",
        "  rules.0.rank=16` (or `rules[0].rank=16`). The value is read as YAML (`3`, `0.5`,",
        "  `[8, 8]`, `null`, `true`; an empty value is null). A key the schema does not know",
        "  is an error; a missing section is created.",
        "- A section that is absent gets all its defaults; `data` and `calibration` are off",
        "  when absent or null.",
        f"- **Limits**: a recipe (or a `--set` value) may have at most {MAX_YAML_BYTES:,}",
        f"  bytes, nest {MAX_YAML_DEPTH} levels and hold {MAX_YAML_VALUES:,} values once YAML",
        "  aliases are expanded; YAML tags that build Python objects are refused.",
        "- **`--resume`** continues an interrupted run only with the recipe it was started",
        "  with (and the same planned ranks); a changed key is named and refused. These may",
        "  change: " + ", ".join(f"`{k}`" for k in RESUME_FREE) + ".",
        "",
    ]


def _reference_sections() -> list[str]:
    """The top level and every nested section, one table each, in schema order."""
    L: list[str] = []
    rows, subs = _section_rows(Recipe, "")
    L += ["## Top level", ""] + _md_table(rows) + [""]
    queue = list(subs)
    while queue:
        name, sec = queue.pop(0)
        rows, more = _section_rows(sec, name + ".")
        L += [f"## `{name}`", "", _text(sec.__doc__), ""] + _md_table(rows) + [""]
        queue = more + queue
    return L


def _reference_rules() -> list[str]:
    """The ``rules`` section: the keys every rule has, rank policies, method options."""
    L = [
        "## `rules`",
        "",
        "A non-empty list. Each rule is a mapping:",
        "",
    ]
    L += _md_table([(f"`{k}`", _type_doc(f), _md_default(f), f.description or "")
                    for k, f in RuleBase.model_fields.items()])
    L += [
        "",
        "- **Rank policy**: at most one of `rank`, `energy`, `macs`, `params` per rule. A rule",
        "  may give none only when a global `target` is set; the budget then chooses its ranks.",
        "- **Method options** are written flat in the rule (e.g. `hooi: 6` for tucker2,",
        "  `squeeze_ratio`, `pct3x3`, `relu` for fire) and checked against the options the",
        "  method declares (`Decomposer.Options`): an option of another method is an error.",
        "  `python -m compresscnn.recipe --methods` lists the registered methods, their",
        "  rank components and options.",
        "",
    ]
    return L


def _reference_target() -> list[str]:
    """The ``target`` section: one row per budget kind."""
    L = [
        "## `target`",
        "",
        "`null`, or a mapping with exactly one key, the fraction of the whole model kept:",
        "",
        "| key | type | meaning |",
        "|---|---|---|",
    ]
    L += [f"| `{k}` | {_md_cell(_inner_doc(f))} | {_md_cell(f.description or '')} |"
          for k, f in Target.model_fields.items()]
    return L


#: the end of the recipe reference: the cross-checks between sections, and an example
_REFERENCE_TAIL = (
        "",
        "## Cross-checks",
        "",
        "- `data` is required when `finetune.enabled`, `evaluate.baseline` or",
        "  `evaluate.zero_shot` is true, or `calibration` is set.",
        "- Checked when a run starts (also by `--dry-run`): fine-tuning and calibration are",
        "  refused when their source shares images with `data.eval` (one archive without",
        "  split folders serving both), unless `data.allow_eval_overlap: true`; a model whose",
        "  number of classes differs from the dataset's (10 for `cifar10` and",
        "  `fashion_mnist`, 1000 for `imagenet`) is refused unless `model.num_classes` gives",
        "  it a new head.",
        "- Images reach the model at `model.input_size` (else the model's own): one that",
        "  `resize`/`crop` would bring to another size is refused, never silently resampled.",
        "- A list `rank` has one int per rank component of its method.",
        "",
        "## Example",
        "",
        "```yaml",
        "model:",
        "  spec: cifar:resnet20",
        "  weights: ${COMPRESSCNN_SHARED_DATA:-../shared/data}/weights/resnet20.pt",
        "data:",
        "  dataset: cifar10",
        "  root: ${COMPRESSCNN_SHARED_DATA:-../shared/data}/cifar10",
        "rules:",
        "  - match: \"layer*.*.conv2\"",
        "    method: tucker2",
        "    rank: 0.5",
        "finetune:",
        "  epochs: 1",
        "  lr: 1e-2",
        "```",
        "",
)


def _methods_text() -> str:
    reg = _registry()
    lines = []
    for name in sorted(reg):
        d = reg[name]
        o = ", ".join(f"{k}: {_type_doc(f)} (default {_md_default(f).strip('`')})"
                      for k, f in _options(d).model_fields.items()) or "no options"
        names = ", ".join(getattr(d, "rank_names", ()))
        ranks = f"ranks ({names})" if names else "method and ranks chosen per layer"
        lines.append(f"{name}: {ranks}; {o}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m compresscnn.recipe --reference | --methods | RECIPE [--set k=v ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m compresscnn.recipe",
                                 description="Print the recipe reference, or validate a "
                                             "recipe and print it resolved.")
    ap.add_argument("recipe", nargs="?")
    ap.add_argument("--reference", action="store_true", help="print recipes/README.md")
    ap.add_argument("--methods", action="store_true", help="list methods and their options")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.reference:
        sys.stdout.write(reference_markdown())
        return 0
    if args.methods:
        print(_methods_text())
        return 0
    if not args.recipe:
        ap.error("give a recipe, --reference or --methods")
    try:
        r = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    sys.stdout.write(yaml.safe_dump(r, sort_keys=False))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
