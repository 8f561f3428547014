"""The typed-config language: closed pydantic v2 models and the value types they are built of.

One validator for recipes, ``--set`` overrides, the Python API (``compress``, ``finetune``,
``decompose``) and compare recipes. Each stage declares its own settings next to the code
that reads them, in this language: the rules and target in :mod:`compresscnn.core.rules`
(with ``PlanConfig``/``CompressConfig``), the data-aware fit in :mod:`compresscnn.fit.config`,
the training loop in :mod:`compresscnn.train.config`, latency-aware planning in
:mod:`compresscnn.measure.latency_config`, the export in :mod:`compresscnn.io.export_config`,
the data in :mod:`compresscnn.io.data.config`, and the sections the run itself reads (model,
evaluation, report) in :mod:`compresscnn.recipe.sections`. This module keeps the language
and the shared constants. Each model declares its keys' types, defaults and documentation
(``recipes/README.md`` is generated from them), and every mapping is closed
(``extra="forbid"``; an unknown key is an error with a ``difflib`` suggestion).

Values are checked by the small annotated types of this module (:func:`Int`, :func:`Float`,
:func:`Enum`...). They keep the recipe's conventions (a bool is never an int; a float field
also reads the numeric strings PyYAML makes of ``5e-4``; non-finite numbers are refused) and
raise one :class:`pydantic_core.PydanticCustomError` whose message reads after the key path
(``expected an int > 0, got 0``); :func:`first_error` turns a ``ValidationError`` back into
``(key path, message)`` for :class:`Where` to place in the file (``(line N)``).

Paths and ``${VAR}`` are resolved while validating, relative to the :class:`Where` passed
as the validation context (``Model.model_validate(data, context={"where": where})``).
"""

import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional, Sequence

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator,
                      ValidationError, ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

from compresscnn.errors import CompressError, RecipeError

#: the ``model.spec`` sources ``compresscnn.io.models`` loads (``<source>:<name>``)
MODEL_SOURCES = ("torchvision", "timm", "cifar", "fmnist")

KeyPath = tuple  # of str (mapping keys) and int (list indices)


# --------------------------------------------------------------------------- messages

def fmt_path(path: Sequence[Any]) -> str:
    """("rules", 2, "rank") -> "rules[2].rank"; () -> "top level"."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "top level"


def show(v: Any, limit: int = 60) -> str:
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


def one_line(s: str) -> str:
    return s.replace("\r", "\\r").replace("\n", "\\n")


def suggest(word: Any, choices: Iterable[str]) -> str | None:
    if not isinstance(word, str):
        return None
    m = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return m[0] if m else None


def unknown_key(key: str, known: Sequence[str]) -> str:
    s = suggest(key, known)
    if s is not None:
        return f"unknown key (did you mean {s!r}?)"
    return f"unknown key (known keys: {', '.join(known)})"


class Bad(Exception):
    """Raised by value checks: what is wrong, and where below the checked value."""

    def __init__(self, msg: str, suffix: KeyPath = ()):
        super().__init__(msg)
        self.msg = msg
        self.suffix = tuple(suffix)


def bad(msg: str, suffix: KeyPath = ()) -> PydanticCustomError:
    """The one error type of these models: ``msg`` at the validated value's path + suffix."""
    return PydanticCustomError("compresscnn", "{msg}", {"msg": msg, "suffix": tuple(suffix)})


@dataclass
class Where:
    """Where a configuration came from: for messages (source, lines, overrides) and paths."""

    source: str = "<recipe>"
    base_dir: Path | None = None          # recipe file's folder (relative paths, if they exist)
    cwd: Path = field(default_factory=Path.cwd)
    lines: dict[KeyPath, int] = field(default_factory=dict)
    overrides: dict[KeyPath, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    default_name: str = "recipe"
    kind: type[CompressError] = RecipeError   # the error class a problem is reported as

    def fail(self, path: Sequence[Any], what: str) -> CompressError:
        path = tuple(path)
        key = fmt_path(path)
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
        err = self.kind(one_line(f"{self.source}: {key}: {what}{suffix}"))
        err.source, err.key = self.source, key  # type: ignore[attr-defined]
        return err

    def error(self, exc: ValidationError, prefix: KeyPath = ()) -> CompressError:
        """The first problem of a pydantic ``ValidationError`` as one :class:`RecipeError`."""
        return self.fail(*first_error(exc, prefix))


def where_of(info: ValidationInfo | None) -> Where:
    ctx = getattr(info, "context", None) or {}
    return ctx.get("where") or Where()


_PYDANTIC_WORDS = {"int_type": "an int", "bool_type": "true or false", "float_type": "a number",
                   "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
                   "model_type": "a mapping", "model_attributes_type": "a mapping"}


def first_error(exc: ValidationError, prefix: KeyPath = ()) -> tuple[KeyPath, str]:
    """``(key path, message)`` of the first error, below ``prefix``. The tag pydantic inserts
    into the path of a discriminated union member (``rules[0].tucker2.rank``) is dropped."""
    e = exc.errors(include_url=False)[0]
    loc = list(prefix) + list(e["loc"])
    if len(loc) >= 3 and loc[0] == "rules" and isinstance(loc[1], int):
        del loc[2]
    ctx = e.get("ctx") or {}
    if e["type"] == "compresscnn":
        return tuple(loc) + tuple(ctx.get("suffix", ())), ctx["msg"]
    if e["type"] == "missing":
        return tuple(loc), "required key missing"
    if e["type"] == "extra_forbidden":
        return tuple(loc), "unknown key"
    word = _PYDANTIC_WORDS.get(e["type"])
    what = f"expected {word}, got {show(e.get('input'))}" if word else e["msg"]
    return tuple(loc), what


# --------------------------------------------------------------------------- value types

@dataclass(frozen=True)
class Spec:
    """How a value type reads: ``expected`` after "expected" in messages, ``doc`` in tables."""

    expected: str
    doc: str


def spec_of(annotation: Any, metadata: Sequence[Any] = ()) -> Spec | None:
    for m in list(metadata) + list(getattr(annotation, "__metadata__", ())):
        if isinstance(m, Spec):
            return m
    return None


def _value(py_type: Any, check: Callable[[Any, Where], Any], expected: str, doc: str) -> Any:
    """An annotated type validated by ``check(value, where)``, which raises :class:`Bad`."""

    def validate(v: Any, info: ValidationInfo) -> Any:
        try:
            return check(v, where_of(info))
        except Bad as e:
            raise bad(e.msg, e.suffix) from None

    return Annotated[py_type, PlainValidator(validate), Spec(expected, doc)]


def _expect(expected: str, v: Any) -> Bad:
    return Bad(f"expected {expected}, got {show(v)}")


_NUM_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def as_float(v: Any) -> float | None:
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


def _bound(lo: float | None, hi: float | None, lo_open: bool = False,
           hi_open: bool = False) -> str:
    """" in [0, 1)", " > 0", " >= 18" or ""."""
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {num(lo)}"
    return ""


def Int(lo: int | None = None, hi: int | None = None) -> Any:
    """An int (never a bool) in [lo, hi]."""
    bound = " > 0" if lo == 1 and hi is None else _bound(lo, hi)
    expected = f"an int{bound}"

    def check(v: Any, where: Where) -> int:
        if isinstance(v, bool):
            raise Bad(f"expected {expected}, got {show(v)} (a boolean)")
        if not isinstance(v, numbers.Integral) or (lo is not None and v < lo) or (
                hi is not None and v > hi):
            raise _expect(expected, v)
        return int(v)

    return _value(int, check, expected, f"int{bound}")


def Float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          hi_open: bool = False) -> Any:
    """A finite real number in a range; ints and numeric strings become floats."""
    bound = _bound(lo, hi, lo_open, hi_open)
    expected = f"a number{bound}"

    def check(v: Any, where: Where) -> float:
        f = as_float(v)
        if f is None or (lo is not None and (f < lo or (lo_open and f == lo))) or (
                hi is not None and (f > hi or (hi_open and f == hi))):
            raise _expect(expected, v)
        return f

    return _value(float, check, expected, f"float{bound}")


def _bool(v: Any, where: Where) -> bool:
    if not isinstance(v, bool):
        raise _expect("true or false", v)
    return v


Bool = _value(bool, _bool, "true or false", "bool")
FRACTION = Float(0.0, 1.0, lo_open=True)


def Str(pattern: str | None = None, what: str = "a string", doc: str = "str") -> Any:
    """A non-blank string, optionally matching ``pattern``."""
    rx = re.compile(pattern) if pattern else None

    def check(v: Any, where: Where) -> str:
        if not isinstance(v, str) or not v.strip() or (rx is not None and not rx.match(v)):
            raise _expect(what, v)
        return v

    return _value(str, check, what, doc)


def Enum(*choices: str, aliases: Mapping[Any, str] | None = None) -> Any:
    """One of ``choices`` (a near miss is suggested); ``aliases`` map other values to one."""
    expected = "one of " + ", ".join(repr(c) for c in choices)
    alias = dict(aliases or {})

    def check(v: Any, where: Where) -> str:
        for a, target in alias.items():
            if v is a or (type(v) is type(a) and v == a):
                return target
        if isinstance(v, str) and v in choices:
            return v
        s = suggest(v, choices)
        raise Bad(f"expected {expected}, got {show(v)}" + (f" (did you mean {s!r}?)" if s else ""))

    return _value(str, check, expected, " or ".join(f"`{c}`" for c in choices))


def Nullable(inner: Any) -> Any:
    """``inner`` or null (messages are the inner type's)."""
    s = spec_of(inner)
    assert s is not None
    return Annotated[Optional[inner], Spec(f"{s.expected} or null", f"{s.doc} or null")]


def ListOf(inner: Any, min_len: int = 0, length: int | None = None,
           what: str | None = None) -> Any:
    """A list (a tuple is read as one) of ``inner`` values; an element's error names its index."""
    s = spec_of(inner)
    assert s is not None
    n = f"{length} " if length else ("non-empty " if min_len else "")
    expected = what or f"a {n}list of {s.doc}"

    def shape(v: Any) -> list:
        if not isinstance(v, (list, tuple)) or len(v) < min_len or (
                length is not None and len(v) != length):
            raise bad(f"expected {expected}, got {show(v)}")
        return list(v)

    doc = f"list of {length} {s.doc}" if length else f"list of {s.doc}"
    return Annotated[list[inner], BeforeValidator(shape), Spec(expected, doc)]


def _auto_or_int(v: Any, where: Where) -> Any:
    if v is None or (isinstance(v, str) and v == "auto"):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise _expect("'auto', null or an int > 0", v)
    return int(v)


AutoOrInt = _value(Any, _auto_or_int, "'auto', null or an int > 0", "`auto`, int > 0 or null")


def Patterns(allow_empty: bool) -> Any:
    """A glob or a list of globs (``fnmatch`` over dotted module names) -> list of str."""
    expected = ("a glob string or a list of them" if allow_empty
                else "a glob string or a non-empty list of them")

    def check(v: Any, where: Where) -> list[str]:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or (not v and not allow_empty):
            raise _expect(expected, v)
        for i, p in enumerate(v):
            if not isinstance(p, str) or not p:
                raise Bad(f"expected a non-empty glob string, got {show(p)}", (i,))
        return list(v)

    return _value(list[str], check, expected, "str or list of str")


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
            raise Bad(f"unsupported interpolation {m.group(0)!r} "
                      "(only ${VAR} and ${VAR:-default} are expanded)")
        name, default = body.group(1), body.group(2)
        val = env.get(name)
        if val:
            return val
        if default is not None:
            return default
        if val is None:
            raise Bad(f"environment variable {name!r} is not set "
                      f"(write ${{{name}:-default}} to give a default)")
        return val

    if "${" in _ENV_RE.sub("", text):
        raise Bad(f"unterminated interpolation in {show(text)} "
                  "(only ${VAR} and ${VAR:-default} are expanded)")
    return _ENV_RE.sub(sub, text)


def resolve_path(text: str, where: Where, recipe_relative: bool) -> str:
    """Expand env vars and ``~``; make absolute. A relative path is taken relative to the
    recipe's folder when ``recipe_relative`` and it exists there, else to the cwd."""
    p = Path(os.path.expanduser(expand_env(text, where.env)))
    if not p.is_absolute():
        if recipe_relative and where.base_dir is not None and (where.base_dir / p).exists():
            p = where.base_dir / p
        else:
            p = where.cwd / p
    return os.path.abspath(p)


def PathStr(recipe_relative: bool) -> Any:
    def check(v: Any, where: Where) -> str:
        if not isinstance(v, str) or not v.strip():
            raise _expect("a path string", v)
        return resolve_path(v, where, recipe_relative)

    return _value(str, check, "a path string", "path")


_WEIGHT_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar", ".npz", ".onnx",
                ".tflite")
_WEIGHTS_EXPECTED = "a weights name like 'DEFAULT' or a path to a weights file"


def _weights(v: Any, where: Where) -> str:
    """A weights enum name (``DEFAULT``, ``IMAGENET1K_V2``...) kept as is, or a path."""
    if not isinstance(v, str) or not v.strip():
        raise _expect(_WEIGHTS_EXPECTED, v)
    text = expand_env(v, where.env)
    looks_like_path = (
        "/" in text or "\\" in text or text.startswith((".", "~"))
        or text.lower().endswith(_WEIGHT_EXTS)
        or (where.base_dir is not None and (where.base_dir / text).is_file())
        or (where.cwd / text).is_file()
    )
    return resolve_path(text, where, recipe_relative=True) if looks_like_path else text


Weights = _value(str, _weights, _WEIGHTS_EXPECTED, "str (name or path)")
_SPEC_EXPECTED = "a model spec '<source>:<name>' like 'torchvision:resnet18'"


def _model_spec(v: Any, where: Where) -> str:
    """``<source>:<name>`` with a source the model loader has (``compresscnn.io.models``)."""
    if not isinstance(v, str) or ":" not in v:
        raise _expect(_SPEC_EXPECTED, v)
    src, _, name = v.partition(":")
    if not name.strip():
        raise _expect(_SPEC_EXPECTED, v)
    if src not in MODEL_SOURCES:
        s = suggest(src, MODEL_SOURCES)
        hint = f"; did you mean {s!r}?" if s else ""
        raise Bad(f"unknown model source {src!r} in {v!r} "
                  f"(known: {', '.join(MODEL_SOURCES)}){hint}")
    return v


ModelSpec = _value(str, _model_spec, _SPEC_EXPECTED,
                   "str (" + ", ".join(f"`{s}:<n>`" for s in MODEL_SOURCES) + ")")
_RANK_EXPECTED = "int, list of int, float in (0, 1], 'full' or 'evbmf'"


def _rank(v: Any, where: Where) -> Any:
    if isinstance(v, bool):
        raise _expect(_RANK_EXPECTED, v)
    if isinstance(v, str) and v in ("full", "evbmf"):
        return v
    if isinstance(v, numbers.Integral):
        if v < 1:
            raise Bad(f"expected {_RANK_EXPECTED}, got {v} (an int rank must be >= 1)")
        return int(v)
    if isinstance(v, (list, tuple)):
        if not v:
            raise _expect(_RANK_EXPECTED, v)
        for i, r in enumerate(v):
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
                raise Bad(f"expected an int >= 1 in a rank list, got {show(r)}", (i,))
        return [int(r) for r in v]
    f = as_float(v)
    if f is not None and not (isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v)):
        if 0.0 < f <= 1.0:
            return f
        raise Bad(f"expected {_RANK_EXPECTED}, got {show(v)} (a fraction must be in (0, 1])")
    raise _expect(_RANK_EXPECTED, v)


Rank = _value(Any, _rank, _RANK_EXPECTED,
              "int > 0, list of int > 0, float in (0, 1], `full` or `evbmf`")


# --------------------------------------------------------------------------- closed mappings

def doc(text: str, default: Any = ..., default_doc: str | None = None, **kw: Any) -> Any:
    """A field with its reference text (and how its default reads there, if not plainly)."""
    extra = {"default_doc": default_doc} if default_doc is not None else None
    return Field(default, description=" ".join(text.split()), json_schema_extra=extra, **kw)


def field_type(model: type[BaseModel], key: str) -> Any:
    """The type (with its checks) of ``model``'s field ``key``: to give another model the
    same key without declaring its type again."""
    f = model.model_fields[key]
    return Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation


def same_field(model: type[BaseModel], key: str, default: Any = ...) -> Any:
    """``model``'s field ``key`` (its text, and its default unless another is given), for a
    model that holds the same setting: a subclass that starts elsewhere (``train.lr`` is
    fine-tuning's ``lr`` at 0.1), or the recipe's top level holding a stage's key."""
    f = model.model_fields[key]
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    return doc(f.description or "", f.default if default is ... else default,
               default_doc=extra.get("default_doc"))


def section() -> Any:
    """A section that is all defaults when absent (its docs are the model's docstring)."""
    return Field(default_factory=dict)


def section_of(annotation: Any) -> type["Closed"] | None:
    """The :class:`Closed` model a field holds (through ``Optional``), else None."""
    args = getattr(annotation, "__args__", None)
    for t in (annotation, *(args or ())):
        if isinstance(t, type) and issubclass(t, Closed):
            return t
    return None


class Closed(BaseModel):
    """A mapping with a fixed set of keys: anything else is an error naming the key, with a
    suggestion for a misspelling; a missing required key is named too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @classmethod
    def not_mapping(cls, v: Any) -> str:
        keys = ", ".join(cls.model_fields)
        hint = (" (to turn it off, set its 'enabled: false')"
                if v is None and "enabled" in cls.model_fields else "")
        return f"expected a mapping with keys {keys}, got {show(v)}{hint}"

    @classmethod
    def coerce(cls, value: Any, who: str, kind: type[CompressError] = RecipeError) -> Any:
        """``value`` as an instance: itself when it is one, else a mapping of the keys (None:
        every default) validated, a problem a one-line ``kind`` error naming ``who`` and the
        key. What the Python entry points call on the config they are given."""
        if isinstance(value, cls):
            return value
        where = Where(who, kind=kind)
        try:
            return cls.model_validate({} if value is None else dict(value),
                                      context={"where": where})
        except ValidationError as e:
            raise where.error(e) from None

    @classmethod
    def check_mapping(cls, v: dict, info: ValidationInfo) -> dict:
        """Further checks on the raw mapping, once its keys are known to be valid."""
        return v

    @model_validator(mode="before")
    @classmethod
    def _closed(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise bad(cls.not_mapping(v))
        known = list(cls.model_fields)
        for k in v:
            if not isinstance(k, str):
                raise bad(f"key {show(k)}: keys must be strings")
            if k not in known:
                raise bad(unknown_key(k, known), (k,))
        for k, f in cls.model_fields.items():
            if f.is_required() and k not in v:
                sub = section_of(f.annotation)
                raise bad("required key missing" if sub is None else
                          f"required section missing (it needs {sub.required_keys()})", (k,))
        return cls.check_mapping(v, info)

    @classmethod
    def required_keys(cls) -> str:
        req = [k for k, f in cls.model_fields.items() if f.is_required()]
        return ", ".join(repr(k) for k in req) or "a mapping"


# --------------------------------------------------------------------------- methods, rules

class MethodOptions(Closed):
    """The options a decomposition method takes besides its rank (written flat in a rule).
    Each decomposer declares its own subclass as ``Decomposer.Options``."""



# --------------------------------------------------------------------------- constants

#: how data-aware reconstruction fits each layer (``compresscnn.fit.response``)
SOLVERS: tuple[str, ...] = ("closed_form", "adam")
