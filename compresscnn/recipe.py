"""Recipes: a closed YAML schema, validated with one-line messages that name the key.

A recipe says which model to load, which layers to factorize with which method and rank, and
how to fine-tune, evaluate, export and report. This module turns a recipe file (or a dict
from the Python API) into a *resolved* recipe: every key present, every default filled,
environment variables expanded and paths made absolute, in plain Python types only, so that
``yaml.safe_dump`` writes it back as the record of the run (timm's ``args.yaml``; DESIGN.md
example 6) and :func:`load_recipe` reads that record back unchanged.

Why a closed schema: NNCF sets ``additionalProperties: false`` on every object, so a
misspelled key is an error with its path instead of a silently ignored setting (the flaw of
timm's argparse-defaults YAML). Every mapping here rejects unknown keys, with a ``difflib``
suggestion; method options (``hooi``, ``squeeze_ratio``...) sit flat in a rule and are
checked against ``get_decomposer(method).options``, so the message names the rule.

Every problem is a :class:`~compresscnn.errors.RecipeError` whose message is one line:
``<source>: <key path>: <what is wrong>`` (e.g. ``recipes/x.yaml: rules[2].rank: expected
...``), followed by ``(line N)`` when the key is in the file, or by ``[from --set ...]`` when
an override put it there. Malformed YAML is ``<file>:<line>:<column>: invalid YAML: ...``.

The schema is declared once (:data:`SCHEMA`, :data:`RULE_FIELDS`) and drives validation,
defaults, ``--set`` overrides and the generated reference ``recipes/README.md``
(``python -m compresscnn.recipe --reference > recipes/README.md``).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from .errors import RecipeError
from .utils import atomic_write_text

__all__ = [
    "load_recipe", "validate", "validate_rules", "validate_target", "rule_options",
    "parse_override", "apply_overrides", "dump_resolved", "reference_markdown",
    "expand_env", "RULE_KEYS", "POLICY_KEYS", "TARGET_KEYS", "TOP_KEYS", "SCHEMA",
    "RULE_FIELDS", "MODEL_SOURCES", "load_yaml", "RESUME_FREE",
]

KeyPath = tuple  # of str (mapping keys) and int (list indices)


# --------------------------------------------------------------------------- messages

def _fmt_path(path: Sequence[Any]) -> str:
    """("rules", 2, "rank") -> "rules[2].rank"; () -> "top level"."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "top level"


def _show(v: Any, limit: int = 60) -> str:
    """A value as the user wrote it (YAML spelling for null/bools), short, on one line."""
    if v is None:
        s = "null"
    elif isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, dict):
        s = "a mapping " + repr(v) if v else "an empty mapping"
    elif isinstance(v, (list, tuple)):
        s = repr(list(v)) if v else "an empty list"
    else:
        s = repr(v)
    s = s.replace("\n", "\\n").replace("\r", "\\r")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _one_line(s: str) -> str:
    return s.replace("\r", "\\r").replace("\n", "\\n")


def _suggest(word: Any, choices: Iterable[str]) -> str | None:
    if not isinstance(word, str):
        return None
    m = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return m[0] if m else None


def _unknown_key(key: str, known: Sequence[str]) -> str:
    s = _suggest(key, known)
    if s is not None:
        return f"unknown key (did you mean {s!r}?)"
    return f"unknown key (known keys: {', '.join(known)})"


class _Bad(Exception):
    """Raised by checkers: what is wrong, and where below the checked value."""

    def __init__(self, msg: str, suffix: KeyPath = ()):
        super().__init__(msg)
        self.msg = msg
        self.suffix = tuple(suffix)


@dataclass
class _Ctx:
    """Where a recipe came from: for messages (source, lines, overrides) and paths."""

    source: str = "<recipe>"
    base_dir: Path | None = None          # recipe file's folder (relative paths, if they exist)
    cwd: Path = field(default_factory=Path.cwd)
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    default_name: str = "recipe"

    def fail(self, path: Sequence[Any], what: str) -> RecipeError:
        path = tuple(path)
        key = _fmt_path(path)
        suffix = ""
        for opath, text in self.overrides.items():
            n = min(len(opath), len(path))
            if n and opath[:n] == path[:n]:
                suffix = f" [from --set {text}]"
                break
        else:
            for n in range(len(path), 0, -1):
                if path[:n] in self.lines:
                    suffix = f" (line {self.lines[path[:n]]})"
                    break
        err = RecipeError(_one_line(f"{self.source}: {key}: {what}{suffix}"))
        err.source, err.key = self.source, key  # type: ignore[attr-defined]
        return err


# --------------------------------------------------------------------------- checkers

_NUM_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class Check:
    """A value checker: ``expected`` reads after "expected" in messages, ``doc`` in tables."""

    expected: str = "a value"
    doc: str = "any"

    def __call__(self, v: Any, ctx: _Ctx) -> Any:
        raise NotImplementedError

    def bad(self, v: Any) -> _Bad:
        return _Bad(f"expected {self.expected}, got {_show(v)}")


def _as_float(v: Any) -> float | None:
    """int/float/numeric string (PyYAML reads ``5e-4`` as a string) -> float; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):  # int, float, numpy scalars (Python API)
        f = float(v)
    elif isinstance(v, str) and _NUM_RE.match(v.strip()):
        f = float(v.strip())
    else:
        return None
    return f if math.isfinite(f) else None


class Int(Check):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        if lo == 1 and hi is None:
            bound = " > 0"
        elif lo is not None and hi is not None:
            bound = f" in [{lo}, {hi}]"
        elif lo is not None:
            bound = f" >= {lo}"
        else:
            bound = ""
        self.expected, self.doc = f"an int{bound}", f"int{bound}"

    def __call__(self, v: Any, ctx: _Ctx) -> int:
        if isinstance(v, bool):
            raise _Bad(f"expected {self.expected}, got {_show(v)} (a boolean)")
        if not isinstance(v, numbers.Integral):
            raise self.bad(v)
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            raise self.bad(v)
        return int(v)


class Float(Check):
    """A real number in a range; ints and numeric strings are accepted and become floats."""

    def __init__(self, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        if lo is not None and hi is not None:
            bound = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            bound = f" {'>' if lo_open else '>='} {lo:g}"
        else:
            bound = ""
        self.expected, self.doc = f"a number{bound}", f"float{bound}"

    def __call__(self, v: Any, ctx: _Ctx) -> float:
        f = _as_float(v)
        if f is None:
            raise self.bad(v)
        if self.lo is not None and (f < self.lo or (self.lo_open and f == self.lo)):
            raise self.bad(v)
        if self.hi is not None and (f > self.hi or (self.hi_open and f == self.hi)):
            raise self.bad(v)
        return f


FRACTION = Float(0.0, 1.0, lo_open=True)


class Bool(Check):
    expected, doc = "true or false", "bool"

    def __call__(self, v: Any, ctx: _Ctx) -> bool:
        if not isinstance(v, bool):
            raise self.bad(v)
        return v


class Str(Check):
    def __init__(self, pattern: str | None = None, what: str = "a string", doc: str = "str"):
        self.pattern = re.compile(pattern) if pattern else None
        self.expected, self.doc = what, doc

    def __call__(self, v: Any, ctx: _Ctx) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.bad(v)
        if self.pattern is not None and not self.pattern.match(v):
            raise self.bad(v)
        return v


class Enum(Check):
    def __init__(self, *choices: str, aliases: Mapping[Any, str] | None = None):
        self.choices = choices
        self.aliases = dict(aliases or {})
        self.expected = "one of " + ", ".join(repr(c) for c in choices)
        self.doc = " or ".join(f"`{c}`" for c in choices)

    def __call__(self, v: Any, ctx: _Ctx) -> str:
        for a, target in self.aliases.items():
            if v is a or (type(v) is type(a) and v == a):
                return target
        if isinstance(v, str) and v in self.choices:
            return v
        s = _suggest(v, self.choices)
        hint = f" (did you mean {s!r}?)" if s else ""
        raise _Bad(f"expected {self.expected}, got {_show(v)}{hint}")


class Nullable(Check):
    def __init__(self, inner: Check):
        self.inner = inner
        self.expected = f"{inner.expected} or null"
        self.doc = f"{inner.doc} or null"

    def __call__(self, v: Any, ctx: _Ctx) -> Any:
        return None if v is None else self.inner(v, ctx)


class ListOf(Check):
    def __init__(self, inner: Check, min_len: int = 0, length: int | None = None,
                 what: str | None = None):
        self.inner, self.min_len, self.length = inner, min_len, length
        n = f"{length} " if length else ("non-empty " if min_len else "")
        self.expected = what or f"a {n}list of {inner.doc}"
        self.doc = f"list of {length} {inner.doc}" if length else f"list of {inner.doc}"

    def __call__(self, v: Any, ctx: _Ctx) -> list:
        if not isinstance(v, (list, tuple)):
            raise self.bad(v)
        if len(v) < self.min_len or (self.length is not None and len(v) != self.length):
            raise self.bad(v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(self.inner(x, ctx))
            except _Bad as e:
                raise _Bad(e.msg, (i,) + e.suffix) from None
        return out


class AnyOf(Check):
    """The first alternative that accepts the value; else one message naming them all."""

    def __init__(self, *alts: Check, expected: str, doc: str):
        self.alts, self.expected, self.doc = alts, expected, doc

    def __call__(self, v: Any, ctx: _Ctx) -> Any:
        for alt in self.alts:
            try:
                return alt(v, ctx)
            except _Bad:
                continue
        raise self.bad(v)


class Const(Check):
    def __init__(self, value: Any):
        self.value = value
        self.expected = self.doc = _show(value)

    def __call__(self, v: Any, ctx: _Ctx) -> Any:
        if isinstance(v, type(self.value)) and v == self.value:
            return v
        raise self.bad(v)


class Patterns(Check):
    """A glob or a list of globs (``fnmatch`` over dotted module names) -> list of str."""

    def __init__(self, allow_empty: bool):
        self.allow_empty = allow_empty
        self.expected = ("a glob string or a list of them" if allow_empty
                         else "a glob string or a non-empty list of them")
        self.doc = "str or list of str"

    def __call__(self, v: Any, ctx: _Ctx) -> list[str]:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or (not v and not self.allow_empty):
            raise self.bad(v)
        for i, p in enumerate(v):
            if not isinstance(p, str) or not p:
                raise _Bad(f"expected a non-empty glob string, got {_show(p)}", (i,))
        return list(v)


# ---- environment variables and paths

_ENV_RE = re.compile(r"\$\{([^}]*)\}")
_ENV_BODY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.S)


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (default when VAR is unset or empty).

    Nothing else is interpreted (no ``$VAR``, no nesting, no command substitution): a
    recipe is data, never code. An unset ``${VAR}`` without a default is an error.
    """
    env = os.environ if env is None else env

    def sub(m: re.Match) -> str:
        body = _ENV_BODY.match(m.group(1))
        if body is None:
            raise _Bad(f"unsupported interpolation {m.group(0)!r} "
                       "(only ${VAR} and ${VAR:-default} are expanded)")
        name, default = body.group(1), body.group(2)
        val = env.get(name)
        if val:
            return val
        if default is not None:
            return default
        if val is None:
            raise _Bad(f"environment variable {name!r} is not set "
                       f"(write ${{{name}:-default}} to give a default)")
        return val

    if "${" in _ENV_RE.sub("", text):
        raise _Bad(f"unterminated interpolation in {_show(text)} "
                   "(only ${VAR} and ${VAR:-default} are expanded)")
    return _ENV_RE.sub(sub, text)


def _resolve_path(text: str, ctx: _Ctx, recipe_relative: bool) -> str:
    """Expand env vars and ``~``; make absolute. A relative path is taken relative to the
    recipe's folder when ``recipe_relative`` and it exists there, else to the cwd."""
    p = Path(os.path.expanduser(expand_env(text, ctx.env)))
    if not p.is_absolute():
        if recipe_relative and ctx.base_dir is not None and (ctx.base_dir / p).exists():
            p = ctx.base_dir / p
        else:
            p = ctx.cwd / p
    return os.path.abspath(p)


class PathStr(Check):
    def __init__(self, recipe_relative: bool):
        self.recipe_relative = recipe_relative
        self.expected = "a path string"
        self.doc = "path"

    def __call__(self, v: Any, ctx: _Ctx) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.bad(v)
        return _resolve_path(v, ctx, self.recipe_relative)


_WEIGHT_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".npz", ".onnx")


class Weights(Check):
    """A weights enum name (``DEFAULT``, ``IMAGENET1K_V2``...) kept as is, or a path."""

    expected = "a weights name like 'DEFAULT' or a path to a weights file"
    doc = "str (name or path)"

    def __call__(self, v: Any, ctx: _Ctx) -> str:
        if not isinstance(v, str) or not v.strip():
            raise self.bad(v)
        text = expand_env(v, ctx.env)
        looks_like_path = (
            "/" in text or "\\" in text or text.startswith((".", "~"))
            or text.lower().endswith(_WEIGHT_EXTS)
            or (ctx.base_dir is not None and (ctx.base_dir / text).is_file())
            or (ctx.cwd / text).is_file()
        )
        return _resolve_path(text, ctx, recipe_relative=True) if looks_like_path else text


MODEL_SOURCES = ("cifar", "file", "fmnist", "timm", "torchvision")


class ModelSpec(Check):
    expected = "a model spec '<source>:<name>' like 'torchvision:resnet18'"
    doc = "str (`torchvision:<n>`, `timm:<n>`, `cifar:<n>`, `fmnist:cnn`, `file:<path>`)"

    def __call__(self, v: Any, ctx: _Ctx) -> str:
        if not isinstance(v, str) or ":" not in v:
            raise self.bad(v)
        src, _, name = v.partition(":")
        if not name.strip():
            raise self.bad(v)
        if src not in MODEL_SOURCES:
            s = _suggest(src, MODEL_SOURCES)
            hint = f"; did you mean {s!r}?" if s else ""
            raise _Bad(f"unknown model source {src!r} in {v!r} "
                       f"(known: {', '.join(MODEL_SOURCES)}){hint}")
        if src == "file":
            return "file:" + _resolve_path(name, ctx, recipe_relative=True)
        return v


class Rank(Check):
    expected = "int, list of int, float in (0, 1], 'full' or 'evbmf'"
    doc = "int > 0, list of int > 0, float in (0, 1], `full` or `evbmf`"

    def __call__(self, v: Any, ctx: _Ctx) -> Any:
        if isinstance(v, bool):
            raise self.bad(v)
        if isinstance(v, str) and v in ("full", "evbmf"):
            return v
        if isinstance(v, numbers.Integral):
            if v < 1:
                raise _Bad(f"expected {self.expected}, got {v} (an int rank must be >= 1)")
            return int(v)
        if isinstance(v, (list, tuple)):
            if not v:
                raise self.bad(v)
            for i, r in enumerate(v):
                if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
                    raise _Bad(f"expected an int >= 1 in a rank list, got {_show(r)}", (i,))
            return [int(r) for r in v]
        f = _as_float(v)
        if f is not None and not (isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v)):
            if 0.0 < f <= 1.0:
                return f
            raise _Bad(f"expected {self.expected}, got {_show(v)} "
                       "(a fraction must be in (0, 1])")
        raise self.bad(v)


# --------------------------------------------------------------------------- schema

_REQUIRED = object()   # no default: the key must be given
_COMPUTED = object()   # default computed from other keys (name, output)


@dataclass
class Field:
    check: Check
    default: Any
    doc: str
    default_doc: str | None = None   # how the default reads in the reference


@dataclass
class Section:
    doc: str
    fields: dict[str, "Field | Section"]
    presence: str = "defaults"       # "required" | "defaults" (absent: all defaults) | "optional"


_NAME = Str(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$",
            what="a name of letters, digits, '.', '_' and '-'", doc="str")
_AUTO_OR_INT = AnyOf(Const("auto"), Nullable(Int(1)),
                     expected="'auto', null or an int > 0", doc="`auto`, int > 0 or null")

#: the rule keys that are not method options, in the order a resolved rule lists them
RULE_FIELDS: dict[str, Field] = {
    "match": Field(Patterns(allow_empty=False), _REQUIRED,
                   "Layers to factorize: `fnmatch` glob(s) over dotted module names "
                   "(`layer*.*.conv2`, `features.*`)."),
    "exclude": Field(Patterns(allow_empty=True), [],
                     "Glob(s) of module names this rule leaves alone."),
    "method": Field(Str(), _REQUIRED,
                    "A registered decomposition method: `tucker2`, `cp`, `spatial`, `svd` "
                    "(Linear), `fire`."),
    "rank": Field(Nullable(Rank()), None,
                  "An int: the same rank for every component; a list: one int per component "
                  "(as many as the method has, in its order, e.g. `[r_in, r_out]` for tucker2); a float: "
                  "the fraction of the layer's parameters kept (`1` is rank 1, `1.0` keeps "
                  "everything); `full`: exact; `evbmf`: chosen by EVBMF."),
    "energy": Field(Nullable(FRACTION), None,
                    "Keep the smallest rank whose singular values hold this fraction of the "
                    "squared spectrum."),
    "macs": Field(Nullable(FRACTION), None, "Fraction of this layer's MACs to keep."),
    "params": Field(Nullable(FRACTION), None,
                    "Fraction of this layer's parameters to keep (same as a float `rank`)."),
    "round_to": Field(Int(1), 8,
                      "Round ranks to multiples of this where it costs little "
                      "(hardware-friendly channel counts); 1 turns rounding off."),
    "objective": Field(Nullable(Enum("macs", "latency")), None,
                       "`latency`: time this rule's layers and candidate ranks on the "
                       "`latency` section's runtime and keep only decompositions measurably "
                       "faster than the dense layer (a layer where none is stays dense); "
                       "null/`macs`: plan on MAC counts. A `latency` target implies it."),
}
RULE_KEYS: tuple[str, ...] = tuple(RULE_FIELDS)
#: at most one of these per rule (none only when a global ``target`` is set)
POLICY_KEYS: tuple[str, ...] = ("rank", "energy", "macs", "params")
#: what data-aware reconstruction matches (``calibration.following_ops``)
FIT_THROUGH: tuple[str, ...] = ("layer", "bn", "activation")
#: how data-aware reconstruction fits each layer (``compresscnn.response``)
SOLVERS: tuple[str, ...] = ("closed_form", "adam")
TARGET_KEYS: tuple[str, ...] = ("macs", "params", "latency")

def _training_fields(*, lr: float, epochs: int, what: str) -> dict[str, Field]:
    """The optimisation keys ``finetune`` and ``train`` share (the same training loop)."""
    return {
        "epochs": Field(Int(0), epochs, "Epochs over the training split."),
        "max_steps": Field(Nullable(Int(1)), None,
                           "Stop after this many optimizer steps (short runs, tests)."),
        "optimizer": Field(Enum("sgd", "adamw"), "sgd", "Optimizer."),
        "lr": Field(Float(0.0, lo_open=True), lr,
                    f"Peak learning rate of {what} at `lr_batch` images per step; scaled "
                    "linearly to the real (global) batch size."),
        "lr_batch": Field(Int(1), 128, "The batch size `lr` is given for."),
        "momentum": Field(Float(0.0), 0.9, "SGD momentum (AdamW: beta1)."),
        "weight_decay": Field(Float(0.0), 5.0e-4, "Weight decay (not on biases and norms)."),
        "schedule": Field(Enum("cosine", "onecycle", "linear", "constant", "step"), "cosine",
                          "Learning-rate schedule after warm-up (`onecycle`: linear up to the "
                          "peak at 30% of the steps, then down to 0)."),
        "warmup_steps": Field(Int(0), 0, "Linear warm-up steps."),
        "label_smoothing": Field(Float(0.0, 1.0), 0.0, "Label smoothing of the cross-entropy."),
        "mixup": Field(Float(0.0), 0.0, "mixup Beta(a, a) parameter; 0: off."),
        "cutout": Field(Int(0), 0, "Cutout square side in pixels; 0: off."),
        "clip_grad_norm": Field(Nullable(Float(0.0, lo_open=True)), None,
                                "Clip the gradients' global L2 norm to this; null: off."),
        "keep": Field(Enum("last", "best"), "last",
                      "Weights to keep: `last`, or `best` by top-1 on `holdout` training "
                      "images scored after every epoch (never on the test split)."),
        "holdout": Field(Int(0), 0,
                         "Training images held out of training to score epochs (`keep: "
                         "best`); 0: none."),
        "device": Field(Enum("auto", "cpu", "cuda"), "auto",
                        "`auto`: CUDA when available, else CPU."),
        "amp": Field(Enum("auto", "off", "bf16", "fp16", aliases={False: "off"}), "auto",
                     "Mixed precision; `auto`: bf16 on GPUs that support it and on CPUs that "
                     "compute bf16 in hardware (AVX512-BF16 or AMX, as torch reports), fp16 on "
                     "older GPUs, off elsewhere. YAML reads a bare `off` as false, which is "
                     "accepted as `off`."),
        "memory_format": Field(Enum("auto", "channels_last", "contiguous"), "auto",
                               "`auto`: channels_last for conv nets."),
        "compile": Field(Bool(), False, "Run the forward pass through `torch.compile`."),
        "checkpoint_every": Field(Nullable(Int(1)), None,
                                  "Also checkpoint every this many steps (a checkpoint is "
                                  "always written at the end of each epoch)."),
        "log_every": Field(Int(1), 50, "Log the loss every this many steps."),
    }


#: old flat ``data`` keys -> (source, key) of the new spelling; read and folded into it
LEGACY_DATA_KEYS: dict[str, tuple[str, str]] = {
    "train_root": ("train", "root"), "test_root": ("eval", "root"),
    "train_split": ("train", "split"), "test_split": ("eval", "split"),
    "train_subset": ("train", "subset"), "test_subset": ("eval", "subset"),
}


def _source_section(doc: str, split: str) -> Section:
    """A ``data`` source with its own root, split and subset (``train``, ``eval``)."""
    return Section(doc, {
        "root": Field(Nullable(PathStr(recipe_relative=True)), None,
                      "Folder or archive (a *path*); null: `data.root`."),
        "split": Field(Str(), split, "Split sub-folder to read (a root without split folders "
                                     "is read whole)."),
        "subset": Field(Nullable(Int(1)), None,
                        "Use only this many images (class-stratified, seeded)."),
    })


def _legacy_data_field(old: str) -> Field:
    role, key = LEGACY_DATA_KEYS[old]
    check = {"root": PathStr(recipe_relative=True), "split": Str(), "subset": Int(1)}[key]
    return Field(Nullable(check), None,
                 f"Old spelling of `data.{role}.{key}`: still read, written back as the new key.")


SCHEMA = Section("The recipe.", {
    "name": Field(Nullable(_NAME), _COMPUTED,
                  "Run name (letters, digits, `.`, `_`, `-`); names the default output folder.",
                  "the recipe file's stem"),
    "seed": Field(Int(0, 2**32 - 1), 0,
                  "Seed for Python, NumPy and torch (calibration batches, data order, "
                  "fine-tuning)."),
    "output": Field(Nullable(PathStr(recipe_relative=False)), _COMPUTED,
                    "Run directory (report, checkpoints, ONNX, resolved recipe). A relative "
                    "path is taken relative to the current working directory.",
                    "`runs/<name>`"),
    "model": Section("The pretrained model to compress.", {
        "spec": Field(ModelSpec(), _REQUIRED, "Which model: `<source>:<name>`."),
        "weights": Field(Nullable(Weights()), None,
                         "Pretrained weights: an enum name such as `DEFAULT` or "
                         "`IMAGENET1K_V2` (the source's published weights), or a path to a "
                         "weights file (a *path*). null: random initialisation (no weights; "
                         "what a `train` job starts from)."),
        "input_size": Field(Nullable(ListOf(Int(1), length=3,
                                            what="[C, H, W], three ints > 0")), None,
                            "`[C, H, W]` of one input; null: from the model's "
                            "`pretrained_cfg` / dataset. The data is fed at this size."),
        "num_classes": Field(Nullable(Int(1)), None,
                             "Replace the model's classifier head by a new, randomly "
                             "initialised one with this many classes when the model has "
                             "another number (e.g. 10 to fine-tune an ImageNet model on "
                             "CIFAR-10; then `finetune.distill.enabled: false`, as the "
                             "original's new head is untrained). A model whose classes differ "
                             "from the data's is refused without it."),
    }, presence="required"),
    "data": Section("Where the images come from and how they reach the model. Three sources: "
                    "`train` (fine-tuning), `calibration` (data-aware decomposition; by "
                    "default the `train` source) and `eval` (every accuracy in the report). "
                    "A run never trains or calibrates on the images it evaluates on: when a "
                    "source shares images with `eval` (e.g. one archive without split folders "
                    "serves both), fine-tuning and calibration are refused unless "
                    "`allow_eval_overlap` is true. Required when `finetune.enabled`, "
                    "`evaluate.baseline` or `evaluate.zero_shot` is true or `calibration` is "
                    "set.", {
        "dataset": Field(Enum("cifar10", "imagenet", "fashion_mnist"), _REQUIRED,
                         "Which dataset format (and label space: 10, 1000 and 10 classes)."),
        "root": Field(Nullable(PathStr(recipe_relative=True)), None,
                      "Folder (or archive) of every source that names no root of its own (a "
                      "*path*): a source reads its split's sub-folder when the root has split "
                      "folders, else the whole root. null: `download_dir`."),
        "train": _source_section("The fine-tuning source.", "train"),
        "calibration": Section("The source of the calibration batches (the top-level "
                               "`calibration` section).", {
            "root": Field(Nullable(PathStr(recipe_relative=True)), None,
                          "Folder or archive (a *path*); null: the `train` source's."),
            "split": Field(Nullable(Str()), None, "Split sub-folder; null: the `train` "
                                                  "source's."),
        }),
        "eval": _source_section("The evaluation source (baseline, zero-shot and fine-tuned "
                                "accuracy).", "test"),
        "allow_eval_overlap": Field(Bool(), False,
                                    "Let fine-tuning and calibration use images of the `eval` "
                                    "source. The report then says so in its first lines: its "
                                    "accuracies are not held-out measurements."),
        "download": Field(Bool(), False, "Download the dataset if it is missing "
                                         "(CIFAR-10 and Fashion-MNIST only)."),
        "download_dir": Field(PathStr(recipe_relative=False), "~/.cache/compresscnn",
                              "Where downloads go; `~` and `${VAR}` are expanded, a relative "
                              "path is relative to the current working directory."),
        "batch_size": Field(Int(1), 128, "Training batch size."),
        "eval_batch_size": Field(Int(1), 256, "Evaluation batch size."),
        "workers": Field(Int(0), 0, "DataLoader worker processes (0: load in the main "
                                    "process)."),
        "augment": Field(Bool(), True, "Random crop/flip augmentation while fine-tuning."),
        "resize": Field(_AUTO_OR_INT, "auto",
                        "`auto`: an image already at the model's input size is fed as it is; "
                        "a larger one is scaled to cover the input size times the model's "
                        "resize/crop ratio (256/224 for torchvision's ImageNet models), then "
                        "cropped; a smaller one is refused (give an int to upsample). An int: "
                        "resize the shorter side to it. null: no resize."),
        "crop": Field(_AUTO_OR_INT, "auto",
                      "Center (eval) / random (train) crop size; `auto`: the model's input "
                      "size (`model.input_size`, else the model's own); null: no crop. "
                      "Whatever resize and crop say, an image that would reach the model at "
                      "another size than its input size is refused."),
        **{old: _legacy_data_field(old) for old in LEGACY_DATA_KEYS},
    }, presence="optional"),
    "calibration": Section("Data-aware decomposition: calibration batches from the "
                           "`data.calibration` source (no augmentation) on which each "
                           "replaced layer is fitted to the original layer's output (and, "
                           "optionally, BatchNorm "
                           "statistics are re-estimated). null or absent: off (data-free); "
                           "`{}`: on with the defaults.", {
        "batches": Field(Int(1), 8, "Number of calibration batches."),
        "batch_size": Field(Int(1), 64, "Calibration batch size."),
        "reconstruct": Field(Bool(), True,
                             "Fit each replacement to the original layer's output on the "
                             "compressed model's own input (asymmetric response "
                             "reconstruction, Zhang et al. 2015), layer by layer."),
        "solver": Field(Enum(*SOLVERS), "closed_form",
                        "How `reconstruct` fits a layer. `closed_form`: from the second "
                        "moments of the layer's input patches, accumulated in one pass: the "
                        "last factor of each decomposition (a dense layer or an SVD pair as "
                        "a whole) by least squares, then all its factors jointly on the same "
                        "quadratic form (L-BFGS, no further passes over the data), and where "
                        "a ReLU follows, Zhang et al. 2015's alternation on a sample of "
                        "positions; each stops once its loss changes by less than 0.1%. "
                        "`adam`: `steps` Adam steps per layer on all its factors, one batch "
                        "per step (the earlier fit). Fire modules use `adam` either way."),
        "steps": Field(Int(1), 300, "Adam steps per layer for `reconstruct` with "
                                    "`solver: adam`."),
        "lr": Field(Float(0.0, lo_open=True), 3e-3,
                    "Adam learning rate for `reconstruct` with `solver: adam`."),
        "fit_through": Field(Enum(*FIT_THROUGH), "activation",
                             "What `reconstruct` matches: `layer`: the layer's own output; "
                             "`bn`: the output after the BatchNorm that alone consumes it; "
                             "`activation`: after that BatchNorm and/or ReLU (Zhang et al. "
                             "2015's nonlinear reconstruction). Found on a torch.fx trace; a "
                             "layer followed by anything else is fitted on its own output."),
        "refit_dense": Field(Bool(), False,
                             "Also fit the Conv/Linear layers left dense that run after a "
                             "replaced one (same objective, in execution order): they see the "
                             "compressed model's inputs and absorb part of the error."),
        "bn_recalibrate": Field(Bool(), False,
                                "Re-estimate BatchNorm running statistics on the calibration "
                                "batches after the layers are replaced. Off by default: after "
                                "`reconstruct` the layers already reproduce the outputs the "
                                "original statistics were estimated on, and re-estimating them "
                                "from a few batches cost ResNet-20 1.7 points (BENCHMARKS.md); "
                                "useful with `reconstruct: false`."),
    }, presence="optional"),
    "rules": Field(Check(), _REQUIRED, "Which layers get which method and rank; see below."),
    "target": Field(Check(), None,
                    "Global budget: null, or a mapping with exactly one of `macs`, `params`, "
                    "`latency` set to the fraction (in (0, 1]) of the whole model's cost to "
                    "keep (`latency`: measured on the `latency` section's runtime). Rules "
                    "without a rank policy get their ranks from this budget.",
                    "null"),
    "allocation": Field(Enum("spectral", "energy", "sensitivity"), "spectral",
                        "How a global `target` spreads over layers: `spectral` minimises the "
                        "summed squared relative weight errors; `energy` maximises the product "
                        "of the energies the layers keep (Zhang et al. 2015: no layer is cut "
                        "to nothing); `sensitivity` (needs `calibration`) weighs each layer's "
                        "error by the measured change of the model's output when that layer "
                        "alone is decomposed (first 4 calibration batches)."),
    "latency": Section("How latency-aware planning (`objective: latency` rules, a `latency` "
                       "target) times layers, and the runtime the result must not be slower "
                       "on.", {
        "runtime": Field(Enum("onnxruntime", "torch"), "onnxruntime",
                         "Runtime to plan for: onnxruntime CPU, or PyTorch eager."),
        "threads": Field(Int(1), 1, "Intra-op threads while timing."),
        "batch": Field(Int(1), 1, "Batch size the model will serve."),
        "rounds": Field(Int(1), 5, "Interleaved timing rounds per layer."),
        "margin": Field(Float(0.0, 1.0), 0.03,
                        "A candidate must be at least this fraction faster than the dense "
                        "layer to be used."),
        "max_candidates": Field(Int(1), 8, "Candidate ranks timed per layer."),
    }),
    "finetune": Section("Fine-tuning of the compressed model, distilled from the original.", {
        "enabled": Field(Bool(), True, "Fine-tune after decomposition."),
        **_training_fields(lr=0.01, epochs=1, what="fine-tuning"),
        "distill": Section("Knowledge distillation from the original model.", {
            "enabled": Field(Bool(), True, "Distil from the uncompressed model."),
            "temperature": Field(Float(0.0, lo_open=True), 4.0, "Softmax temperature."),
            "alpha": Field(Float(0.0, 1.0), 0.9,
                           "Weight of the KD term; `1 - alpha` weighs cross-entropy."),
        }),
    }),
    "train": Section("Training from random initialisation instead of compressing pretrained "
                     "weights (`model.weights` must be null). With `rules`, the matched layers "
                     "are factorized *before* training (ranks from the rules / `target`, module "
                     "structures of the decomposers); `rules: []` trains the dense model. "
                     "null or absent: compress a pretrained model.", {
        **_training_fields(lr=0.1, epochs=30, what="training"),
        "init": Field(Enum("kaiming", "spectral"), "kaiming",
                      "Initialisation of factorized layers: `kaiming`: every factor "
                      "Kaiming-normal, scaled so the chain's output variance matches a dense "
                      "Kaiming layer; `spectral`: the best low-rank approximation of a dense "
                      "Kaiming init (Khodak et al. 2021)."),
        "semi_orthogonal": Field(Nullable(Int(1)), None,
                                 "Every this many steps, pull one factor of each factorized "
                                 "layer towards a scaled semi-orthogonal matrix (Povey et al. "
                                 "2018); null: off."),
        "frobenius_decay": Field(Float(0.0), 0.0,
                                 "Weight of the Frobenius norm of each factorized layer's "
                                 "product (Khodak et al. 2021) added to the loss; 0: off."),
        "switch": Section(
            "Cuttlefish (Wang et al. 2023): train the model *dense*, measure the stable rank "
            "of every layer the `rules` take after each epoch, and once they have all settled "
            "(or at the end of `max_epochs`) factorize the trained weights at the scaled "
            "stable ranks and train the factorized model for the rest of `epochs`. The rules "
            "choose layers, methods and options; their rank policies and `target` are not "
            "used. The dense phase follows the schedule of the whole `epochs` budget up to the "
            "switch; the factorized phase restarts the schedule (warm-up included) over the "
            "remaining epochs, with the same optimizer settings. Needs `epochs` >= 2; not "
            "with `max_steps` or `init: spectral`. null or absent: off.", {
                "window": Field(Int(2), 15,
                                "A layer has settled when the slope of its smoothed stable-rank "
                                "trace, averaged over the last `window` epochs, is at most "
                                "`tol` (never before `window` + 1 epochs)."),
                "tol": Field(Float(0.0, lo_open=True), 0.1,
                             "Largest mean slope (rank units per epoch) of a settled layer."),
                "max_epochs": Field(Nullable(Int(1)), None,
                                    "Switch at the end of this epoch at the latest, settled or "
                                    "not (short budgets); null: `epochs` - 1."),
                "min_fraction": Field(Float(0.0, 1.0), 0.0,
                                      "Lower bound of each rank as a fraction of the layer's "
                                      "full rank (Cuttlefish's ImageNet runs: 0.2)."),
            }, presence="optional"),
    }, presence="optional"),
    "evaluate": Section("Accuracy (and agreement with the original model) on the test split. "
                        "Evaluation is on when `baseline` or `zero_shot` is true; the "
                        "fine-tuned model is evaluated whenever it is fine-tuned.", {
        "baseline": Field(Bool(), True, "Evaluate the original model."),
        "zero_shot": Field(Bool(), True, "Evaluate right after decomposition, before "
                                         "fine-tuning."),
        "max_batches": Field(Nullable(Int(1)), None,
                             "Evaluate on at most this many batches."),
    }),
    "export": Section("ONNX export of the compressed model.", {
        "onnx": Field(Bool(), True, "Export to ONNX and check it in onnxruntime."),
        "opset": Field(Int(18), 18, "ONNX opset (the dynamo exporter needs >= 18)."),
        "dynamic_batch": Field(Bool(), True, "Make the batch dimension dynamic."),
        "atol": Field(Float(0.0, lo_open=True), 1.0e-3,
                      "Largest allowed max-abs difference between onnxruntime and PyTorch "
                      "outputs."),
        "verify": Field(ListOf(Enum("onnxruntime", "openvino", "opencv"), min_len=1),
                        ["onnxruntime"],
                        "Runtimes that run the exported file (CPU, float32) on the same "
                        "random inputs as PyTorch; each must agree within `atol`, and each "
                        "one's max abs difference goes into the report. onnxruntime always "
                        "runs; `openvino` and `opencv` (OpenCV DNN) need the `runtimes` "
                        "extra (`pip install 'compresscnn[runtimes]'`)."),
    }),
    "report": Section("report.json / report.md / plots.", {
        "latency": Field(Bool(), True, "Measure latency (PyTorch and onnxruntime)."),
        "latency_batch": Field(ListOf(Int(1), min_len=1), [1, 8],
                               "Batch sizes to time."),
        "threads": Field(Int(1), 1, "CPU threads while timing."),
        "plots": Field(Bool(), True, "Write plots (matplotlib)."),
    }),
}, presence="required")
TOP_KEYS: tuple[str, ...] = tuple(SCHEMA.fields)


# --------------------------------------------------------------------------- registry

def _ensure_registry() -> None:
    """Import the decomposer package so the built-in methods register themselves."""
    importlib.import_module("compresscnn.decomposers")


def _registry() -> dict[str, Any]:
    _ensure_registry()
    from .decomposers import base
    return base._REGISTRY


# --------------------------------------------------------------------------- validation

def _check_field(f: Field, v: Any, path: KeyPath, ctx: _Ctx) -> Any:
    try:
        return f.check(v, ctx)
    except _Bad as e:
        raise ctx.fail(path + e.suffix, e.msg) from None


def _check_keys(value: dict, known: Sequence[str], path: KeyPath, ctx: _Ctx) -> None:
    for k in value:
        if not isinstance(k, str):
            raise ctx.fail(path, f"key {_show(k)}: keys must be strings")
        if k not in known:
            raise ctx.fail(path + (k,), _unknown_key(k, known))


def _validate_section(value: Any, sec: Section, path: KeyPath, ctx: _Ctx) -> dict | None:
    if value is None and sec.presence == "optional":
        return None
    if not isinstance(value, dict):
        keys = ", ".join(sec.fields)
        hint = (" (to turn it off, set its 'enabled: false')"
                if value is None and "enabled" in sec.fields else "")
        raise ctx.fail(path, f"expected a mapping with keys {keys}, got {_show(value)}{hint}")
    _check_keys(value, list(sec.fields), path, ctx)
    out: dict[str, Any] = {}
    for key, f in sec.fields.items():
        p = path + (key,)
        if isinstance(f, Section):
            if key in value:
                out[key] = _validate_section(value[key], f, p, ctx)
            elif f.presence == "required":
                raise ctx.fail(p, f"required section missing (it needs {_required(f)})")
            elif f.presence == "optional":
                out[key] = None
            else:
                out[key] = _validate_section({}, f, p, ctx)
        elif key in value:
            out[key] = _check_field(f, value[key], p, ctx) if not _special(p) else value[key]
        elif f.default is _REQUIRED:
            raise ctx.fail(p, "required key missing")
        elif f.default is _COMPUTED or _special(p):
            out[key] = None if f.default is _COMPUTED else copy.deepcopy(f.default)
        else:  # defaults go through the checker too (it expands '~' in download_dir)
            out[key] = _check_field(f, copy.deepcopy(f.default), p, ctx)
    return out


def _special(path: KeyPath) -> bool:
    return path in (("rules",), ("target",))


def _required(sec: Section) -> str:
    req = [k for k, f in sec.fields.items() if isinstance(f, Field) and f.default is _REQUIRED]
    return ", ".join(repr(k) for k in req) or "a mapping"


def validate_target(target: Any, source: str = "target", *, _ctx: _Ctx | None = None,
                    _path: KeyPath = ("target",)) -> dict | None:
    """``None`` or ``{macs|params|latency: fraction}`` with exactly one key."""
    ctx = _ctx or _Ctx(source)
    if target is None:
        return None
    if not isinstance(target, dict):
        raise ctx.fail(_path, "expected null or a mapping with one of macs, params, "
                              f"latency (e.g. {{macs: 0.5}}), got {_show(target)}")
    _check_keys(target, TARGET_KEYS, _path, ctx)
    if len(target) != 1:
        got = " and ".join(target) if target else "none"
        raise ctx.fail(_path, f"give exactly one of macs, params, latency (got {got})")
    (key, v), = target.items()
    return {key: _check_field(Field(FRACTION, None, ""), v, _path + (key,), ctx)}


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping", type(None): "null"}
    seen: list[str] = []
    if float in types:  # an int is accepted where a float is: "a number" says it all
        types = tuple(t for t in types if t is not int)
    for t in types:
        n = names.get(t, t.__name__)
        if n not in seen:
            seen.append(n)
    return seen[0] if len(seen) == 1 else ", ".join(seen[:-1]) + " or " + seen[-1]


def _check_option(v: Any, types: type | tuple[type, ...]) -> Any:
    """A method option against the python type(s) its decomposer declares. A bool is never
    an int; an int or a numeric string is accepted (and converted) where a float is."""
    ts = types if isinstance(types, tuple) else (types,)
    if isinstance(v, bool):
        if bool in ts:
            return v
    elif v is None:
        if type(None) in ts:
            return v
    elif isinstance(v, int):
        if int in ts:
            return v
        if float in ts:
            return float(v)
    elif isinstance(v, float):
        if float in ts and math.isfinite(v):
            return v
    elif isinstance(v, str):
        if str in ts:
            return v
        if float in ts and _as_float(v) is not None:
            return _as_float(v)
    elif isinstance(v, (list, tuple)):
        if list in ts or tuple in ts:
            return list(v)
    elif isinstance(v, dict):
        if dict in ts:
            return v
    raise _Bad(f"expected {_type_names(ts)}, got {_show(v)}")


def _validate_rule(rule: Any, path: KeyPath, ctx: _Ctx, has_target: bool,
                   registry: Mapping[str, Any]) -> dict:
    if not isinstance(rule, dict):
        raise ctx.fail(path, "expected a mapping with match, method and a rank policy "
                             f"(rank, energy, macs or params), got {_show(rule)}")
    for k in rule:
        if not isinstance(k, str):
            raise ctx.fail(path, f"key {_show(k)}: keys must be strings")
    # a near-miss of a rule key is a typo, whatever the method
    for k in rule:
        if k not in RULE_FIELDS and _suggest(k, RULE_KEYS) is not None:
            m = rule.get("method")
            opts = getattr(registry.get(m) if isinstance(m, str) else None, "options", {}) or {}
            if k not in opts:
                raise ctx.fail(path + (k,), _unknown_key(k, RULE_KEYS))
    if "method" not in rule:
        raise ctx.fail(path + ("method",), "required key missing (known methods: "
                                           f"{', '.join(sorted(registry))})")
    method = _check_field(RULE_FIELDS["method"], rule["method"], path + ("method",), ctx)
    if method not in registry:
        s = _suggest(method, registry)
        hint = f"; did you mean {s!r}?" if s else ""
        raise ctx.fail(path + ("method",), f"unknown method {method!r} "
                                           f"(known: {', '.join(sorted(registry))}){hint}")
    dec = registry[method]
    options: dict[str, Any] = dict(getattr(dec, "options", {}) or {})
    for k in rule:
        if k in RULE_FIELDS or k in options:
            continue
        listed = ", ".join(sorted(options)) or "none"
        what = f"not an option of method {method} (options: {listed})"
        s = _suggest(k, options)
        if s is not None:
            what += f"; did you mean {s!r}?"
        owners = sorted(n for n, d in registry.items()
                        if k in (getattr(d, "options", {}) or {}))
        if owners:
            what += f"; it is an option of {', '.join(owners)}"
        raise ctx.fail(path + (k,), what)

    out: dict[str, Any] = {}
    for key, f in RULE_FIELDS.items():
        p = path + (key,)
        if key == "method":
            out[key] = method
        elif key in rule:
            out[key] = _check_field(f, rule[key], p, ctx)
        elif f.default is _REQUIRED:
            raise ctx.fail(p, "required key missing")
        else:
            out[key] = _check_field(f, copy.deepcopy(f.default), p, ctx)
    given = [k for k in POLICY_KEYS if out[k] is not None]
    if len(given) > 1:
        raise ctx.fail(path, f"give at most one of {', '.join(POLICY_KEYS)} "
                             f"(got {' and '.join(given)})")
    if not given and not has_target:
        raise ctx.fail(path, f"give one of {', '.join(POLICY_KEYS)} "
                             "(or a global 'target' to let the budget choose)")
    rank = out["rank"]
    names = tuple(getattr(dec, "rank_names", ()) or ())
    if isinstance(rank, list) and names and len(rank) != len(names):
        raise ctx.fail(path + ("rank",), f"method {method} takes {len(names)} rank(s) "
                                         f"({', '.join(names)}), got {len(rank)}: {rank}")
    for k in rule:
        if k in options:
            try:
                out[k] = _check_option(rule[k], options[k])
            except _Bad as e:
                raise ctx.fail(path + (k,), e.msg) from None
    return out


def validate_rules(rules: list, source: str = "rules", *, target: Any = None,
                   _ctx: _Ctx | None = None) -> list[dict]:
    """Validate a list of rules (recipe or Python API) and return them with defaults filled.

    Each returned rule has every key of :data:`RULE_KEYS` (``match``/``exclude`` as lists of
    globs, unused policies as ``None``) followed by the method options that were given
    (:func:`rule_options` picks those out). ``target``: the global budget, if any; without
    one every rule needs exactly one of :data:`POLICY_KEYS`.
    """
    ctx = _ctx or _Ctx(source)
    path: KeyPath = ("rules",)
    if not isinstance(rules, (list, tuple)):
        raise ctx.fail(path, f"expected a list of rules, got {_show(rules)}")
    if not rules:
        raise ctx.fail(path, "expected at least one rule, got an empty list")
    registry = _registry()
    return [_validate_rule(r, path + (i,), ctx, target is not None, registry)
            for i, r in enumerate(rules)]


def rule_options(rule: Mapping[str, Any]) -> dict[str, Any]:
    """The method options of a (validated) rule: its keys that are not :data:`RULE_KEYS`."""
    return {k: v for k, v in rule.items() if k not in RULE_FIELDS}


def _sanitize_name(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return s or "recipe"


def _validate(data: Any, ctx: _Ctx) -> dict:
    if not isinstance(data, dict):
        what = "an empty file" if data is None else _show(data)
        raise ctx.fail((), f"expected a mapping of recipe keys ({', '.join(TOP_KEYS)}), "
                           f"got {what}")
    out = _validate_section(data, SCHEMA, (), ctx)
    assert out is not None
    out["target"] = validate_target(data.get("target"), _ctx=ctx)
    if out["train"] is not None and data["rules"] == []:
        out["rules"] = []  # a train job with no rules trains the dense model
    else:
        out["rules"] = validate_rules(data["rules"], target=out["target"], _ctx=ctx)
    if out["train"] is not None:
        _check_train_job(data, out, ctx)
    if out["name"] is None:
        out["name"] = ctx.default_name
    if out["output"] is None:
        out["output"] = _resolve_path(f"runs/{out['name']}", ctx, recipe_relative=False)
    _fold_legacy_data(out["data"], data.get("data"), ctx)

    # cross-constraints: everything that reads images needs a data section
    if out["data"] is None:
        for key in (("finetune", "enabled"), ("evaluate", "baseline"),
                    ("evaluate", "zero_shot"), ("calibration",)):
            on = out[key[0]] is not None if len(key) == 1 else out[key[0]][key[1]]
            if on:
                how = ("remove it" if key == ("calibration",)
                       else f"set {_fmt_path(key)}: false")
                raise ctx.fail(("data",), f"required because {_fmt_path(key)} is on "
                                          f"(add a data section, or {how})")
    return out


def _check_train_job(data: dict, out: dict, ctx: _Ctx) -> None:
    """A ``train`` job starts from random weights and has no teacher or calibration."""
    if out["model"]["weights"] is not None:
        raise ctx.fail(("model", "weights"), "must be null with a train section (training "
                                             "starts from random weights; to start from "
                                             "these weights, compress and fine-tune instead)")
    for key in ("finetune", "calibration"):
        if data.get(key) is not None:
            raise ctx.fail((key,), "not used with a train section (a train job trains from "
                                   f"random weights): remove {key} or train")
    if out["data"] is None:
        raise ctx.fail(("data",), "required because train is set")


def _fold_legacy_data(out: dict | None, raw: Any, ctx: _Ctx) -> None:
    """Move the old flat ``data`` keys (``test_split``...) into their source sections, so the
    resolved recipe has one spelling; giving both spellings of one key is an error."""
    if out is None:
        return
    for old, (role, key) in LEGACY_DATA_KEYS.items():
        value = out.pop(old)
        if value is None:
            continue
        if key in ((raw or {}).get(role) or {}):
            raise ctx.fail(("data", old), f"give data.{role}.{key} or its old spelling "
                                          f"data.{old}, not both")
        out[role][key] = value


def validate(data: dict, source: str = "<recipe>", *, base_dir: str | os.PathLike | None = None,
             name: str | None = None) -> dict:
    """Validate a recipe given as a dict and return it resolved (see :func:`load_recipe`).

    ``base_dir``: the folder relative ``weights``/``root`` paths are looked up in first (the
    cwd otherwise). ``name``: the default run name (else the stem of ``source`` when it is
    a file name, else ``"recipe"``).
    """
    if name is None:
        name = "recipe" if source.startswith("<") else _sanitize_name(Path(source).stem)
    ctx = _Ctx(source=source, base_dir=Path(base_dir) if base_dir is not None else None,
               default_name=name)
    return _validate(data, ctx)


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
        raise RecipeError(_one_line(f"{source}: --set {_show(text)}: expected key.path=value "
                                    "(e.g. finetune.epochs=3)"))
    key, _, raw = text.partition("=")
    key = key.strip()
    try:
        path = _parse_key(key)
    except ValueError:
        raise RecipeError(_one_line(f"{source}: --set {_show(text)}: malformed key path "
                                    f"{key!r} (write e.g. rules.0.rank or rules[0].rank)"))
    try:
        _, value = load_yaml(raw, f"{source}: --set {_show(text)}")
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RecipeError(_one_line(f"{source}: {_fmt_path(path)}: value {raw!r} is not valid "
                                    f"YAML ({problem}) [from --set {text}]")) from None
    return path, value


def apply_overrides(data: dict, overrides: Sequence[str], source: str = "<recipe>",
                    *, _ctx: _Ctx | None = None) -> dict:
    """Return a deep copy of ``data`` with each ``key.path=value`` applied.

    Paths are checked against the schema (a misspelled key is an error naming it); missing
    sections are created (``data.root=...`` adds a ``data`` section); a list index must
    exist. The result still needs :func:`validate`.
    """
    ctx = _ctx or _Ctx(source)
    out = copy.deepcopy(data)
    if not isinstance(out, dict):
        raise ctx.fail((), "cannot apply --set to a recipe that is not a mapping")
    for text in overrides:
        path, value = parse_override(text, ctx.source)
        ctx.overrides[path] = text
        _apply_one(out, path, value, text, ctx)
    return out


def _apply_one(root: dict, path: KeyPath, value: Any, text: str, ctx: _Ctx) -> None:
    """Set ``path`` to ``value`` in ``root``, walking the schema alongside the data.

    Schema nodes: a :class:`Section`, ``"rules"`` (the list), ``"rule"`` (one rule: any key
    may be set, since method options depend on the method; validation names a bad one),
    ``"target"``, or a plain :class:`Field` (a value: nothing below it can be set).
    """
    node: Any = root
    schema: Any = SCHEMA
    for i, tok in enumerate(path):
        here = path[: i + 1]
        last = i == len(path) - 1

        def fail(what: str) -> RecipeError:
            err = RecipeError(_one_line(f"{ctx.source}: {_fmt_path(here)}: {what} "
                                        f"[from --set {text}]"))
            err.source, err.key = ctx.source, _fmt_path(here)  # type: ignore[attr-defined]
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
                raise fail(f"expected a mapping, got {_show(node[tok])}")
            node, schema = node[tok], "rule"
            continue
        if not isinstance(schema, Section) and schema not in ("rule", "target"):
            raise fail(f"{_fmt_path(path[:i])} is a value, not a section; "
                       f"write {_fmt_path(path[:i])}=...")
        if not isinstance(tok, str):
            raise fail("expected a key name, got a list index")
        if isinstance(schema, Section):
            known = list(schema.fields)
        elif schema == "target":
            known = list(TARGET_KEYS)
        else:
            known = []  # "rule"
        if known and tok not in known:
            raise fail(_unknown_key(tok, known))
        if last:
            node[tok] = value
            return
        if schema == "rule":
            raise fail(f"cannot set a part of a rule value; write {_fmt_path(here)}=...")
        child_schema: Any = schema.fields[tok] if isinstance(schema, Section) else None
        if here == ("rules",):
            child_schema = "rules"
        elif here == ("target",):
            child_schema = "target"
        elif not isinstance(child_schema, Section):
            child_schema = None
        if child_schema is None:
            raise fail(f"{tok!r} is a value, not a section; write {_fmt_path(here)}=...")
        child = node.get(tok)
        if child is None:
            child = node[tok] = [] if child_schema == "rules" else {}
        if child_schema == "rules" and not isinstance(child, list):
            raise fail(f"expected a list of rules, got {_show(child)}")
        if child_schema != "rules" and not isinstance(child, dict):
            raise fail(f"expected a mapping, got {_show(child)}; cannot set "
                       f"{_fmt_path(path[i + 1:])} in it")
        node, schema = child, child_schema


# --------------------------------------------------------------------------- files

#: Recipe keys that cannot change the fine-tuned weights: ``--resume`` may change them (every
#: other key, and the plan's ranks, must be what the interrupted run was started with).
RESUME_FREE: tuple[str, ...] = (
    "name", "output", "evaluate", "export", "report", "finetune.log_every",
    "finetune.checkpoint_every", "data.eval_batch_size", "data.test_subset", "data.test_split")

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
        raise RecipeError(_one_line(f"{source}: {size:,} bytes, more than the "
                                    f"{MAX_YAML_BYTES:,} a recipe may have"))
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise RecipeError(_one_line(
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
        return RecipeError(_one_line(f"{source}:{node.start_mark.line + 1}: {what}"))

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


def _yaml_error(source: str, e: yaml.YAMLError) -> RecipeError:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    what = f"{context}, {problem}" if context else problem
    if "\\t" in problem or "\t" in problem:
        what += " (indent with spaces, not tabs)"
    return RecipeError(_one_line(f"{where}: invalid YAML: {what}"))


def _read_text(path: Path, label: str) -> str:
    if not path.exists():
        raise RecipeError(_one_line(f"recipe {label}: file not found"))
    if path.is_dir():
        raise RecipeError(_one_line(f"recipe {label}: is a directory, not a recipe file"))
    if not path.is_file():
        raise RecipeError(_one_line(f"recipe {label}: not a regular file"))
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise RecipeError(_one_line(f"recipe {label}: {size:,} bytes, more than the "
                                        f"{MAX_YAML_BYTES:,} a recipe may have"))
        raw = path.read_bytes()
    except PermissionError:
        raise RecipeError(_one_line(f"recipe {label}: cannot read (permission denied)")) from None
    except OSError as e:
        raise RecipeError(_one_line(f"recipe {label}: cannot read ({e.strerror or e})")) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(_one_line(f"recipe {label}: not UTF-8 text (byte {e.start})")) from None


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
    ctx = _Ctx(source=label,
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
            "load with compresscnn.recipe.load_recipe\n"
            + yaml.safe_dump(_plain(recipe), sort_keys=False, default_flow_style=False,
                             allow_unicode=True))
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- reference

def _md_default(f: Field) -> str:
    if f.default_doc is not None:
        return f.default_doc
    if f.default is _REQUIRED:
        return "**required**"
    d = f.default
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


def _section_rows(sec: Section, prefix: str) -> tuple[list, list[tuple[str, Section]]]:
    rows, subs = [], []
    for key, f in sec.fields.items():
        full = f"{prefix}{key}"
        if isinstance(f, Section):
            presence = {"required": "**required**", "defaults": "(all defaults)",
                        "optional": "null (off)"}[f.presence]
            rows.append((f"`{full}`", "section", presence, f.doc))
            subs.append((full, f))
        else:
            rows.append((f"`{full}`", f.check.doc if full not in ("rules", "target")
                         else ("list of rules" if full == "rules" else "mapping or null"),
                         _md_default(f), f.doc))
    return rows, subs


def reference_markdown() -> str:
    """The recipe reference (recipes/README.md), generated from :data:`SCHEMA`."""
    L: list[str] = [
        "# Recipe reference",
        "",
        "<!-- Generated from compresscnn/recipe.py; do not edit by hand. Regenerate with",
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
        "  source's `root`, a `file:` model spec): `~` and environment variables are expanded,",
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
    rows, subs = _section_rows(SCHEMA, "")
    L += ["## Top level", ""] + _md_table(rows) + [""]
    queue = list(subs)
    while queue:
        name, sec = queue.pop(0)
        rows, more = _section_rows(sec, name + ".")
        L += [f"## `{name}`", "", sec.doc, ""] + _md_table(rows) + [""]
        queue = more + queue
    L += [
        "## `rules`",
        "",
        "A non-empty list. Each rule is a mapping:",
        "",
    ]
    L += _md_table([(f"`{k}`", f.check.doc, _md_default(f), f.doc)
                    for k, f in RULE_FIELDS.items()])
    L += [
        "",
        "- **Rank policy**: at most one of `rank`, `energy`, `macs`, `params` per rule. A rule",
        "  may give none only when a global `target` is set; the budget then chooses its ranks.",
        "- **Method options** are written flat in the rule (e.g. `hooi: 6` for tucker2,",
        "  `squeeze_ratio`, `pct3x3`, `relu` for fire) and checked against the options the",
        "  method declares (`Decomposer.options`): an option of another method is an error.",
        "  `python -m compresscnn.recipe --methods` lists the registered methods, their",
        "  rank components and options.",
        "",
        "## `target`",
        "",
        "`null`, or a mapping with exactly one key, the fraction of the whole model kept:",
        "",
        "| key | type | meaning |",
        "|---|---|---|",
        "| `macs` | float in (0, 1] | multiply-accumulates of one forward pass |",
        "| `params` | float in (0, 1] | parameters |",
        "| `latency` | float in (0, 1] | measured latency on the `latency` section's runtime |",
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
    ]
    return "\n".join(L)


def _methods_text() -> str:
    reg = _registry()
    lines = []
    for name in sorted(reg):
        d = reg[name]
        opts = getattr(d, "options", {}) or {}
        o = ", ".join(f"{k}: {_type_names(v if isinstance(v, tuple) else (v,))}"
                      for k, v in opts.items()) or "no options"
        lines.append(f"{name}: ranks ({', '.join(getattr(d, 'rank_names', ()))}); {o}")
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
