"""Rules and targets: what the core's ``compress`` is told to do, typed and checked.

A rule is a discriminated union on ``method`` over the registered decomposers: the rule keys
of :class:`~compresscnn.config.RuleBase` plus the method's own ``Options`` model, flat beside
them, so a method option is checked by the model its decomposer declares and the message
names the rule. The Python API (``compress``, ``validate_rules``), recipes, ``--set``
overrides and compare recipes all validate through these models; the recipe layer composes
them, this module knows nothing of recipes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, ValidationInfo
from pydantic import create_model
from pydantic_core import PydanticCustomError

from compresscnn.config import (ALLOCATIONS, RULE_KEYS, Calibration, Closed, Enum, KeyPath,
                                MethodOptions, RuleBase, Target, Where, bad, first_error, show,
                                suggest, unknown_key)
from compresscnn.core.method_options import methods
from compresscnn.errors import RecipeError

__all__ = ["rule_model", "validate_rules", "validate_target", "validate_compress",
           "rule_options", "CompressArgs"]


def _registry() -> Mapping[str, Any]:
    """The methods a rule may name: declared without torch (:mod:`compresscnn.core.method_options`),
    so that a recipe is checked before torch is loaded."""
    return methods()


def _options(dec: Any) -> type[MethodOptions]:
    return getattr(dec, "Options", MethodOptions)


_RULE_MODELS: dict[tuple, type[RuleBase]] = {}


def rule_model(method: str) -> type[RuleBase]:
    """The typed rule of a registered method: the rule keys plus the method's options, e.g.
    ``rule_model("tucker2")(match="layer*.conv2", rank=[16, 16], hooi=5)``."""
    reg = _registry()
    if method not in reg:
        raise RecipeError(f"method: unknown method {method!r} (known: {', '.join(sorted(reg))})")
    return _rule_model(method, reg[method])


def _rule_model(name: str, dec: Any) -> type[RuleBase]:
    opts, ranks = _options(dec), tuple(getattr(dec, "rank_names", ()) or ())
    key = (name, opts, ranks)
    if key not in _RULE_MODELS:
        text = RuleBase.model_fields["method"].description
        model = create_model(f"{name.title()}Rule", __base__=(RuleBase, opts),
                             __doc__=f"A rule of method {name}.",
                             method=(Literal[name], Field(name, description=text)))
        model.rank_names = ranks
        _RULE_MODELS[key] = model
    return _RULE_MODELS[key]


_ADAPTERS: dict[tuple, TypeAdapter] = {}


def _rules_adapter(registry: Mapping[str, Any]) -> TypeAdapter:
    """``list[rule]``, a rule being a discriminated union on ``method`` over ``registry``;
    :func:`_precheck_rule` first names a missing/unknown method or a misplaced option."""
    key = tuple((n, _options(d), tuple(getattr(d, "rank_names", ()) or ()))
                for n, d in sorted(registry.items()))
    if key not in _ADAPTERS:
        members = tuple(_rule_model(n, d) for n, d in sorted(registry.items()))
        one: Any = (members[0] if len(members) == 1
                    else Annotated[Union[members], Field(discriminator="method")])
        _ADAPTERS[key] = TypeAdapter(list[Annotated[one, BeforeValidator(_precheck_rule)]])
    return _ADAPTERS[key]


def _precheck_rule(rule: Any, info: ValidationInfo) -> Any:
    """What the union cannot say well: a rule that is no mapping, a typo of a rule key, a
    missing or unknown method, a key that is an option of another method."""
    registry = info.context["registry"]
    if isinstance(rule, RuleBase):
        return rule.model_dump()
    if not isinstance(rule, dict):
        raise bad("expected a mapping with match, method and a rank policy "
                  f"(rank, energy, macs or params), got {show(rule)}")
    for k in rule:
        if not isinstance(k, str):
            raise bad(f"key {show(k)}: keys must be strings")
    m = rule.get("method")
    dec = registry.get(m) if isinstance(m, str) else None
    opts = list(_options(dec).model_fields) if dec is not None else []
    for k in rule:  # a near-miss of a rule key is a typo, whatever the method
        if k not in RULE_KEYS and k not in opts and suggest(k, RULE_KEYS) is not None:
            raise bad(unknown_key(k, RULE_KEYS), (k,))
    if "method" not in rule:
        raise bad(f"required key missing (known methods: {', '.join(sorted(registry))})",
                  ("method",))
    if not isinstance(m, str) or not m.strip():
        raise bad(f"expected a string, got {show(m)}", ("method",))
    if dec is None:
        s = suggest(m, registry)
        raise bad(f"unknown method {m!r} (known: {', '.join(sorted(registry))})"
                  + (f"; did you mean {s!r}?" if s else ""), ("method",))
    for k in rule:
        if k not in RULE_KEYS and k not in opts:
            raise bad(_not_an_option(k, m, opts, registry), (k,))
    return rule


def _not_an_option(key: str, method: str, opts: list[str], registry: Mapping[str, Any]) -> str:
    what = f"not an option of method {method} (options: {', '.join(sorted(opts)) or 'none'})"
    s = suggest(key, opts)
    if s is not None:
        what += f"; did you mean {s!r}?"
    owners = sorted(n for n, d in registry.items() if key in _options(d).model_fields)
    if owners:
        what += f"; it is an option of {', '.join(owners)}"
    return what


def _parse_rules(raw: Any, has_target: bool, where: Where) -> list[RuleBase]:
    """Typed rules; a problem is a ``PydanticCustomError`` whose suffix is its key path."""
    if not isinstance(raw, (list, tuple)):
        raise bad(f"expected a list of rules, got {show(raw)}", ("rules",))
    if not raw:
        raise bad("expected at least one rule, got an empty list", ("rules",))
    reg = _registry()
    ctx = {"where": where, "has_target": has_target, "registry": reg}
    try:
        return _rules_adapter(reg).validate_python(list(raw), context=ctx)
    except ValidationError as e:
        path, msg = first_error(e, ("rules",))
        raise bad(msg, path) from None


def _fail(where: Where, e: PydanticCustomError) -> RecipeError:
    return where.fail(e.context["suffix"], e.context["msg"])


def validate_rules(rules: Any, source: str = "rules", *, target: Any = None,
                   _ctx: Where | None = None) -> list[dict]:
    """Validate a list of rules (dicts or typed rules: recipe or Python API) and return them
    as dicts with defaults filled.

    Each returned rule has every key of :data:`RULE_KEYS` (``match``/``exclude`` as lists of
    globs, unused policies as ``None``) followed by the method options that were given
    (:func:`rule_options` picks those out). ``target``: the global budget, if any; without
    one every rule needs exactly one of :data:`POLICY_KEYS`.
    """
    where = _ctx or Where(source)
    try:
        return [r.model_dump() for r in _parse_rules(rules, target is not None, where)]
    except PydanticCustomError as e:
        raise _fail(where, e) from None


def validate_target(target: Any, source: str = "target", *, _ctx: Where | None = None,
                    _path: KeyPath = ("target",)) -> dict | None:
    """``None`` or ``{macs|params|latency: fraction}`` with exactly one key (a dict or a
    :class:`~compresscnn.config.Target`)."""
    where = _ctx or Where(source)
    if target is None:
        return None
    try:
        return Target.model_validate(target, context={"where": where}).model_dump()
    except ValidationError as e:
        raise where.error(e, _path) from None


def _same(model: type[Closed], key: str) -> Any:
    """The type of ``model``'s field ``key``, for a field of another name."""
    f = model.model_fields[key]
    return Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation


class CompressArgs(Closed):
    """The keyword arguments of ``compress`` that a recipe also has, with the recipe's types."""

    objective: _same(RuleBase, "objective")
    allocation: Enum(*ALLOCATIONS)
    reconstruct: _same(Calibration, "reconstruct")
    reconstruct_steps: _same(Calibration, "steps")
    reconstruct_lr: _same(Calibration, "lr")
    fit_through: _same(Calibration, "fit_through")
    solver: _same(Calibration, "solver")
    refit_dense: _same(Calibration, "refit_dense")
    bn_recalibrate: _same(Calibration, "bn_recalibrate")
    distill: _same(Calibration, "distill")


def validate_compress(rules: Any, target: Any, source: str = "compress()",
                      **kwargs: Any) -> tuple[list[dict], dict | None]:
    """The Python API's rules (dicts or typed rules), target (a dict or a
    :class:`~compresscnn.config.Target`) and keyword arguments (:class:`CompressArgs`),
    checked before any work with the recipe's messages: ``compress(): target.macs: ...``."""
    where = Where(source)
    target = validate_target(target, _ctx=where)
    rules = validate_rules(rules, target=target, _ctx=where)
    try:
        CompressArgs.model_validate(kwargs, context={"where": where})
    except ValidationError as e:
        raise where.error(e) from None
    return rules, target


def rule_options(rule: Mapping[str, Any]) -> dict[str, Any]:
    """The method options of a (validated) rule: its keys that are not :data:`RULE_KEYS`."""
    return {k: v for k, v in rule.items() if k not in RULE_KEYS}
