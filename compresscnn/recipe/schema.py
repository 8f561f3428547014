"""Recipes: a closed YAML schema, validated with one-line messages that name the key.

A recipe says which model to load, which layers to factorize with which method and rank, and
how to fine-tune, evaluate, export and report. This module turns a recipe file (or a dict
from the Python API) into a *resolved* recipe: every key present, every default filled,
environment variables expanded and paths made absolute, in plain Python types only, so that
``yaml.safe_dump`` writes it back as the record of the run (timm's ``args.yaml``; DESIGN.md
example 6) and :func:`load_recipe` reads that record back unchanged.

Why a closed schema: NNCF sets ``additionalProperties: false`` on every object, so a
misspelled key is an error with its path instead of a silently ignored setting (the flaw of
timm's argparse-defaults YAML). The schema is the pydantic models of
the stages (:mod:`compresscnn.core.rules`: rules, target, allocation;
:mod:`compresscnn.fit.config`: calibration; :mod:`compresscnn.train.config`: finetune,
train; :mod:`compresscnn.io.data.config`: data; :mod:`compresscnn.measure.latency_config`:
latency; :mod:`compresscnn.io.export_config`: export; :mod:`compresscnn.recipe.sections`:
model, evaluate, report) and :class:`Recipe` here, which
composes them; a rule is a discriminated
union on ``method`` over the registered decomposers, each rule model carrying its method's
``Options`` flat beside the rule keys, so a method option is checked by the model its
decomposer declares and the message names the rule. Recipes, ``--set`` overrides, the
Python API (``compress``, ``validate_rules``) and compare recipes all validate through them.

Every problem is a :class:`~compresscnn.errors.RecipeError` whose message is one line:
``<source>: <key path>: <what is wrong>`` (e.g. ``recipes/x.yaml: rules[2].rank: expected
...``), followed by ``(line N)`` when the key is in the file, or by ``[from --set ...]`` when
an override put it there. Malformed YAML is ``<file>:<line>:<column>: invalid YAML: ...``.
The reference ``recipes/README.md`` is generated from the models by
:mod:`compresscnn.recipe.reference` (``python -m compresscnn.recipe --reference >
recipes/README.md``).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from pydantic import ValidationError, ValidationInfo, model_validator

from compresscnn.config import (MODEL_SOURCES, SOLVERS, Closed, Int, KeyPath, Nullable, PathStr,
                                Str, Where, bad, doc, expand_env, field_type, fmt_path,
                                one_line, resolve_path, same_field, section, section_of, show,
                                unknown_key, where_of)
from compresscnn.core.rules import (ALLOCATIONS, CALIBRATED_ALLOCATIONS, POLICY_KEYS, RULE_KEYS,
                                    TARGET_KEYS, PlanConfig, Target, _parse_rules, rule_model,
                                    rule_options, validate_compress, validate_rules,
                                    validate_target)
from compresscnn.fit.config import FIT_THROUGH, MIXES, Calibration
from compresscnn.train.config import SCHEDULES, Finetune, Train
from compresscnn.errors import RecipeError
from compresscnn.io.data.config import LEGACY_DATA_KEYS, Data
from compresscnn.io.export_config import Export
from compresscnn.measure.latency_config import Latency
from compresscnn.recipe.sections import Evaluate, ModelSection, Report
from compresscnn.util.common import atomic_write_text

__all__ = [
    "load_recipe", "validate", "validate_rules", "validate_target", "validate_compress",
    "rule_options", "parse_recipe", "rule_model", "Recipe", "parse_override", "apply_overrides",
    "dump_resolved", "expand_env", "RULE_KEYS", "POLICY_KEYS",
    "TARGET_KEYS", "TOP_KEYS", "MODEL_SOURCES", "SCHEDULES", "FIT_THROUGH", "SOLVERS", "MIXES",
    "LEGACY_DATA_KEYS", "load_yaml", "yaml_lines", "RESUME_FREE", "ALLOCATIONS",
    "CALIBRATED_ALLOCATIONS",
]

_fmt_path = fmt_path   # the key-path spelling other modules print
_show, _one_line = show, one_line


# --------------------------------------------------------------------------- the recipe

_NAME = Str(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$", what="a name of letters, digits, '.', '_' and '-'",
            doc="str")


class Recipe(Closed):
    """The recipe."""

    name: Nullable(_NAME) = doc(
        "Run name (letters, digits, `.`, `_`, `-`); names the default output folder.", None,
        default_doc="the recipe file's stem")
    seed: Int(0, 2**32 - 1) = doc("Seed for Python, NumPy and torch (calibration batches, data "
                                  "order, fine-tuning).", 0)
    output: Nullable(PathStr(recipe_relative=False)) = doc(
        "Run directory (report, checkpoints, ONNX, resolved recipe). A relative path is taken "
        "relative to the current working directory.", None, default_doc="`runs/<name>`")
    model: ModelSection = doc(ModelSection.__doc__)
    data: Optional[Data] = doc(Data.__doc__, None)
    calibration: Optional[Calibration] = doc(Calibration.__doc__, None)
    rules: Any = doc("Which layers get which method and rank; see below.")
    target: Optional[Target] = doc(
        "Global budget: null, or a mapping with exactly one of `macs`, `params`, `latency` set "
        "to the fraction (in (0, 1]) of the whole model's cost to keep (`latency`: measured on "
        "the `latency` section's runtime). Rules without a rank policy get their ranks from "
        "this budget.", None, default_doc="null")
    allocation: field_type(PlanConfig, "allocation") = same_field(PlanConfig, "allocation")
    latency: Latency = section()
    finetune: Finetune = section()
    train: Optional[Train] = doc(Train.__doc__, None)
    evaluate: Evaluate = section()
    export: Export = section()
    report: Report = section()

    @classmethod
    def not_mapping(cls, v: Any) -> str:
        what = "an empty file" if v is None else show(v)
        return f"expected a mapping of recipe keys ({', '.join(cls.model_fields)}), got {what}"

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> "Recipe":
        where = where_of(info)
        if not (self.rules == [] and self._dense_job()):
            # a Cuttlefish switch chooses the ranks itself, like a target
            ranked = self.target is not None or (self.train is not None
                                                 and self.train.switch is not None)
            self.rules = _parse_rules(self.rules, ranked, where)
        if self.train is not None:
            self._check_train_job()
        if self.name is None:
            self.name = where.default_name
        if self.output is None:
            self.output = resolve_path(f"runs/{self.name}", where, recipe_relative=False)
        if self.data is None:  # everything that reads images needs a data section
            for key in (("finetune", "enabled"), ("evaluate", "baseline"),
                        ("evaluate", "zero_shot"), ("calibration",)):
                sec = getattr(self, key[0])
                if sec is not None if len(key) == 1 else getattr(sec, key[1]):
                    how = ("remove it" if key == ("calibration",)
                           else f"set {fmt_path(key)}: false")
                    raise bad(f"required because {fmt_path(key)} is on (add a data section, "
                              f"or {how})", ("data",))
        return self

    def _dense_job(self) -> bool:
        """``rules: []``: a train job training the dense model, the dense model fine-tuned
        the same way as a compressed one would be (the reference for "after fine-tuning"), or
        the dense model quantized (the reference for low-rank + int8)."""
        if self.train is not None:
            return True
        return ((self.finetune.enabled or self.export.quantize is not None)
                and self.target is None and self.calibration is None)

    def _check_train_job(self) -> None:
        """A ``train`` job starts from random weights and has no teacher or calibration."""
        if self.model.weights is not None:
            raise bad("must be null with a train section (training starts from random "
                      "weights; to start from these weights, compress and fine-tune instead)",
                      ("model", "weights"))
        for key in ("finetune", "calibration"):
            if key in self.model_fields_set and getattr(self, key) is not None:
                raise bad("not used with a train section (a train job trains from random "
                          f"weights): remove {key} or train", (key,))
        if self.data is None:
            raise bad("required because train is set", ("data",))


TOP_KEYS: tuple[str, ...] = tuple(Recipe.model_fields)


def _sanitize_name(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return s or "recipe"


def parse_recipe(data: Any, where: Where) -> Recipe:
    """The typed recipe; a problem is one :class:`RecipeError` placed by ``where``."""
    try:
        return Recipe.model_validate(data, context={"where": where})
    except ValidationError as e:
        raise where.error(e) from None


def _validate(data: Any, where: Where) -> dict:
    return parse_recipe(data, where).model_dump()


def validate(data: dict, source: str = "<recipe>", *, base_dir: str | os.PathLike | None = None,
             name: str | None = None) -> dict:
    """Validate a recipe given as a dict and return it resolved (see :func:`load_recipe`).

    ``base_dir``: the folder relative ``weights``/``root`` paths are looked up in first (the
    cwd otherwise). ``name``: the default run name (else the stem of ``source`` when it is
    a file name, else ``"recipe"``).
    """
    if name is None:
        name = "recipe" if source.startswith("<") else _sanitize_name(Path(source).stem)
    where = Where(source=source, base_dir=Path(base_dir) if base_dir is not None else None,
                  default_name=name)
    return _validate(data, where)

# --------------------------------------------------------------------------- overrides



def _parse_key(key: str) -> KeyPath:
    """``rules.0.rank`` or ``rules[0].rank`` -> ("rules", 0, "rank")."""
    out: list[Any] = []
    parts = key.split(".")
    for part in parts:
        m = re.fullmatch(r"([^.\[\]]*)((?:\[\d+\])*)", part)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ValueError(key)
        if m.group(1):
            out.append(int(m.group(1)) if m.group(1).isdigit() else m.group(1))
        elif not out:
            raise ValueError(key)
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return tuple(out)


def parse_override(text: str, source: str = "<override>") -> tuple[KeyPath, Any]:
    """``"finetune.epochs=3"`` -> ``(("finetune", "epochs"), 3)``.

    The value is read with ``yaml.safe_load`` (``3``, ``0.5``, ``[8, 8]``, ``null``,
    ``true``; an empty value is null); list indices may be written ``rules.0.rank`` or
    ``rules[0].rank``.
    """
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(one_line(f"{source}: --set {show(text)}: expected key.path=value "
                                    "(e.g. finetune.epochs=3)"))
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        path = _parse_key(key)
    except ValueError:
        raise RecipeError(one_line(f"{source}: --set {show(text)}: malformed key path "
                                    f"{key!r} (write e.g. rules.0.rank or rules[0].rank)"))
    try:
        _, value = load_yaml(raw, f"{source}: --set {show(text)}")
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RecipeError(one_line(f"{source}: {fmt_path(path)}: value {raw!r} is not valid "
                                    f"YAML ({problem}) [from --set {text}]")) from None
    return path, value


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "<recipe>",
                    *, _ctx: Where | None = None) -> dict:
    """Return a deep copy of ``data`` with each ``key.path=value`` applied.

    Paths are checked against the schema (a misspelled key is an error naming it); missing
    sections are created (``data.root=...`` adds a ``data`` section); a list index must
    exist. The result still needs :func:`validate`.
    """
    ctx = _ctx or Where(source)
    out = copy.deepcopy(data)
    if not isinstance(out, dict):
        raise ctx.fail((), "cannot apply --set to a recipe that is not a mapping")
    for text in overrides:
        path, value = parse_override(text, ctx.source)
        ctx.overrides[path] = text
        _apply_one(out, path, value, text, ctx)
    return out


def _apply_one(root: dict, path: KeyPath, value: Any, text: str, ctx: Where) -> None:
    """Set ``path`` to ``value`` in ``root``, walking the models alongside the data.

    Schema nodes: a :class:`Closed` model (a section, the target), ``"rules"`` (the list),
    ``"rule"`` (one rule: any key may be set, since method options depend on the method;
    validation names a bad one), or None (a value: nothing below it can be set).
    """
    node: Any = root
    schema: Any = Recipe
    for i, tok in enumerate(path):
        here = path[: i + 1]
        last = i == len(path) - 1

        def fail(what: str) -> RecipeError:
            err = RecipeError(one_line(f"{ctx.source}: {fmt_path(here)}: {what} "
                                       f"[from --set {text}]"))
            err.source, err.key = ctx.source, fmt_path(here)  # type: ignore[attr-defined]
            return err

        if schema == "rules":
            if not isinstance(tok, int):
                raise fail("expected a rule index (rules.0.rank or rules[0].rank)")
            if tok >= len(node):
                raise fail(f"index out of range (the recipe has {len(node)} rule(s))")
            if last:
                node[tok] = value
                return
            if not isinstance(node[tok], dict):
                raise fail(f"expected a mapping, got {show(node[tok])}")
            node, schema = node[tok], "rule"
            continue
        if schema is None:
            raise fail(f"{fmt_path(path[:i])} is a value, not a section; "
                       f"write {fmt_path(path[:i])}=...")
        if not isinstance(tok, str):
            raise fail("expected a key name, got a list index")
        known = [] if schema == "rule" else list(schema.model_fields)
        if known and tok not in known:
            raise fail(unknown_key(tok, known))
        if last:
            node[tok] = value
            return
        if schema == "rule":
            raise fail(f"cannot set a part of a rule value; write {fmt_path(here)}=...")
        child_schema: Any = ("rules" if here == ("rules",)
                             else section_of(schema.model_fields[tok].annotation))
        if child_schema is None:
            raise fail(f"{tok!r} is a value, not a section; write {fmt_path(here)}=...")
        child = node.get(tok)
        if child is None:
            child = node[tok] = [] if child_schema == "rules" else {}
        if child_schema == "rules" and not isinstance(child, list):
            raise fail(f"expected a list of rules, got {show(child)}")
        if child_schema != "rules" and not isinstance(child, dict):
            raise fail(f"expected a mapping, got {show(child)}; cannot set "
                       f"{fmt_path(path[i + 1:])} in it")
        node, schema = child, child_schema


# --------------------------------------------------------------------------- files

#: Recipe keys that cannot change the fine-tuned weights: ``--resume`` may change them (every
#: other key, and the plan's ranks, must be what the interrupted run was started with).
RESUME_FREE: tuple[str, ...] = (
    "name", "output", "evaluate", "export", "report", "finetune.log_every",
    "finetune.checkpoint_every", "data.eval_batch_size", "data.test_subset", "data.test_split",
    "data.max_image_pixels")

#: Limits on a YAML document (a recipe file, a run's recipe.yaml, a compare recipe, a --set
#: value), checked before anything walks it: recipes are a few kB, nest a handful of levels
#: and hold hundreds of values; aliases may not expand a document past these.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 100
MAX_YAML_VALUES = 100_000


def load_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """``yaml.safe_load`` with limits: the text's size, the nesting depth (checked on the
    parser's event stream, before the recursive composer runs) and the number of values
    and depth once aliases are expanded (on the node graph, each shared node measured once),
    so a small alias bomb or a deeply nested file is one :class:`RecipeError` instead of
    minutes and gigabytes. Returns the node graph (for line numbers) and the data.
    YAML syntax errors propagate as :class:`yaml.YAMLError`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise RecipeError(one_line(f"{source}: {size:,} bytes, more than the "
                                    f"{MAX_YAML_BYTES:,} a recipe may have"))
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RecipeError(one_line(
                    f"{source}:{event.start_mark.line + 1}: nested more than "
                    f"{MAX_YAML_DEPTH} levels deep"))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _expanded_size(node, source)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Values in ``root`` with every alias expanded; each shared node is measured once."""
    done: dict[int, tuple[int, int]] = {}  # id -> (values, height)
    active: set[int] = set()

    def fail(node: yaml.Node, what: str) -> RecipeError:
        return RecipeError(one_line(f"{source}:{node.start_mark.line + 1}: {what}"))

    def walk(node: yaml.Node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in done:
            values, height = done[key]
        else:
            if key in active:
                raise fail(node, "an alias refers to a node that contains it (a recursive "
                                 "structure)")
            if level > MAX_YAML_DEPTH:
                raise fail(node, f"aliases nest the document more than {MAX_YAML_DEPTH} "
                                 "levels deep")
            active.add(key)
            kids: list = []
            if isinstance(node, yaml.SequenceNode):
                kids = node.value
            elif isinstance(node, yaml.MappingNode):
                kids = [n for pair in node.value for n in pair]
            values, height = 1, 0
            for kid in kids:
                v, h = walk(kid, level + 1)
                values, height = values + v, max(height, h + 1)
                if values > MAX_YAML_VALUES:
                    raise fail(node, f"aliases expand the document to more than "
                                     f"{MAX_YAML_VALUES:,} values")
            active.discard(key)
            done[key] = (values, height)
        if level + height > MAX_YAML_DEPTH:
            raise fail(node, f"aliases nest the document more than {MAX_YAML_DEPTH} levels "
                             "deep")
        return values, height

    return walk(root, 0)[0]


def _line_map(node: Any, path: KeyPath, out: dict[KeyPath, int],
              dups: list[tuple[KeyPath, int, int]], walked: set[int] | None = None) -> None:
    """Key path -> line, and duplicate keys. A node reached again through an alias is not
    walked again (its keys were checked at the anchor)."""
    walked = set() if walked is None else walked
    if id(node) in walked:
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.value == "<<":
                continue
            key: Any = k.value
            line = k.start_mark.line + 1
            if key in seen:
                dups.append((path + (key,), seen[key], line))
            seen[key] = line
            out[path + (key,)] = line
            _line_map(v, path + (key,), out, dups, walked)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _line_map(v, path + (i,), out, dups, walked)


def yaml_lines(node: yaml.Node | None) -> dict[KeyPath, int]:
    """Key path -> line of a YAML node graph (for messages)."""
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _line_map(node, (), lines, [])
    return lines


def _yaml_error(source: str, e: yaml.YAMLError) -> RecipeError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = f"{context}, {problem}" if context else problem
    if "\\t" in problem or "\t" in problem:
        what += " (indent with spaces, not tabs)"
    return RecipeError(one_line(f"{where}: invalid YAML: {what}"))


def _read_text(path: Path, label: str) -> str:
    if not path.exists():
        raise RecipeError(one_line(f"recipe {label}: file not found"))
    if path.is_dir():
        raise RecipeError(one_line(f"recipe {label}: is a directory, not a recipe file"))
    if not path.is_file():
        raise RecipeError(one_line(f"recipe {label}: not a regular file"))
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise RecipeError(one_line(f"recipe {label}: {size:,} bytes, more than the "
                                        f"{MAX_YAML_BYTES:,} a recipe may have"))
        raw = path.read_bytes()
    except PermissionError:
        raise RecipeError(one_line(f"recipe {label}: cannot read (permission denied)")) from None
    except OSError as e:
        raise RecipeError(one_line(f"recipe {label}: cannot read ({e.strerror or e})")) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(one_line(f"recipe {label}: not UTF-8 text (byte {e.start})")) from None


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                base_dir: str | os.PathLike | None = None) -> dict:
    """Read, validate and resolve a recipe file.

    The file is checked to exist and be a readable regular file before anything is parsed;
    it is read with ``yaml.safe_load`` (duplicate keys are an error); ``overrides``
    (``"key.path=value"``, as given to ``--set``) are applied; then the result is validated
    against the schema, every default is filled, ``${VAR}``/``${VAR:-default}`` are expanded
    and paths are made absolute (relative ``weights``/``root`` paths are looked up in
    ``base_dir``, by default the recipe's folder, then in the cwd; ``output`` and
    ``download_dir`` are relative to the cwd). Returns plain dicts/lists/scalars.
    """
    label = os.fspath(path)
    p = Path(label)
    text = _read_text(p, label)
    try:
        node, data = load_yaml(text, label)
    except yaml.YAMLError as e:
        raise _yaml_error(label, e) from None
    ctx = Where(source=label,
                base_dir=Path(base_dir) if base_dir is not None else Path(os.path.abspath(p)).parent,
                default_name=_sanitize_name(p.stem))
    dups: list[tuple[KeyPath, int, int]] = []
    if node is not None:
        _line_map(node, (), ctx.lines, dups)
    if dups:
        key, first, again = dups[0]
        ctx.lines = {}
        raise ctx.fail(key, f"duplicate key (first at line {first}, again at line {again})")
    if overrides:
        if not isinstance(data, dict):
            _validate(data, ctx)  # reports the top-level problem
        data = apply_overrides(data, overrides, _ctx=ctx)
    return _validate(data, ctx)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def dump_resolved(recipe: dict, path: str | os.PathLike) -> None:
    """Write a resolved recipe as YAML, atomically (temp file in the same folder, fsync,
    ``os.replace``): a reader sees the old file or the whole new one, never half of it."""
    text = ("# resolved recipe: every default filled in; "
            "load with compresscnn.recipe.schema.load_recipe\n"
            + yaml.safe_dump(_plain(recipe), sort_keys=False, default_flow_style=False,
                             allow_unicode=True))
    atomic_write_text(path, text)
