"""Rules and targets: what the core's ``compress`` is told to do, typed and checked.

A rule is a discriminated union on ``method`` over the registered decomposers: the rule keys
of :class:`~compresscnn.config.RuleBase` plus the method's own ``Options`` model, flat beside
them, so a method option is checked by the model its decomposer declares and the message
names the rule. The Python API (``compress``, ``validate_rules``), recipes, ``--set``
overrides and compare recipes all validate through these models; the recipe layer composes
them, this module knows nothing of recipes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Mapping, Union

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, ValidationInfo
from pydantic import create_model, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from compresscnn.config import (FRACTION, Closed, Enum, Int, KeyPath, MethodOptions, Nullable,
                                Patterns, Rank, Str, Where, bad, doc, first_error, section,
                                show, suggest, unknown_key)
from compresscnn.fit.config import FitConfig
from compresscnn.core.method_options import methods
from compresscnn.errors import RecipeError

__all__ = ["rule_model", "validate_rules", "validate_target", "validate_compress",
           "rule_options", "RuleBase", "Target", "PlanConfig", "CompressConfig", "POLICY_KEYS",
           "RULE_KEYS", "TARGET_KEYS", "ALLOCATIONS", "CALIBRATED_ALLOCATIONS"]

ALLOCATIONS: tuple[str, ...] = ("spectral", "energy", "sensitivity", "output", "data_spectral")
#: the allocations that measure the model on calibration batches to plan
CALIBRATED_ALLOCATIONS: tuple[str, ...] = ("sensitivity", "output", "data_spectral")

#: at most one of these per rule (none only when a global ``target`` is set)
POLICY_KEYS: tuple[str, ...] = ("rank", "energy", "macs", "params")


class RuleBase(Closed):
    """Which layers get which method and rank; the method's options sit flat beside these
    keys (each method's rule model adds its ``Options``)."""

    #: the method's rank components (set on each method's rule model)
    rank_names: ClassVar[tuple[str, ...]] = ()

    match: Patterns(allow_empty=False) = doc(
        "Layers to factorize: `fnmatch` glob(s) over dotted module names "
        "(`layer*.*.conv2`, `features.*`).")
    exclude: Patterns(allow_empty=True) = doc("Glob(s) of module names this rule leaves alone.",
                                              [])
    method: Str() = doc("A registered decomposition method: `tucker2`, `cp`, `spatial`, `svd` "
                        "(Linear), `fire`; or `auto`: per layer, the method (of its option "
                        "`methods`, default cp, spatial, tucker2, svd) and rank with the lowest "
                        "measured error at the budget (a global `target`, or a `macs`/`params` "
                        "policy), each candidate decomposed to measure it (`ranks` per method, "
                        "default 12).")
    rank: Nullable(Rank) = doc(
        "An int: the same rank for every component; a list: one int per component (as many "
        "as the method has, in its order, e.g. `[r_in, r_out]` for tucker2); a float: the "
        "fraction of the layer's parameters kept (`1` is rank 1, `1.0` keeps everything); "
        "`full`: exact; `evbmf`: chosen by EVBMF.", None)
    energy: Nullable(FRACTION) = doc(
        "Keep the smallest rank whose singular values hold this fraction of the squared "
        "spectrum.", None)
    macs: Nullable(FRACTION) = doc("Fraction of this layer's MACs to keep.", None)
    params: Nullable(FRACTION) = doc(
        "Fraction of this layer's parameters to keep (same as a float `rank`).", None)
    round_to: Nullable(Int(1)) = doc(
        "Round ranks to multiples of this where it costs little (hardware-friendly channel "
        "counts); 1 turns rounding off. null: the multiple the `latency` section's runtime "
        "rewards for layers timed there (`objective: latency`), else 8.", None,
        default_doc="null (8)")
    objective: Nullable(Enum("macs", "latency")) = doc(
        "`latency`: time this rule's layers and candidate ranks on the `latency` section's "
        "runtime and keep only decompositions measurably faster than the dense layer (a layer "
        "where none is stays dense); null/`macs`: plan on MAC counts. A `latency` target "
        "implies it.", None)

    @model_validator(mode="after")
    def _policy(self, info: ValidationInfo) -> "RuleBase":
        given = [k for k in POLICY_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise bad(f"give at most one of {', '.join(POLICY_KEYS)} "
                      f"(got {' and '.join(given)})")
        # a rule built directly (no context) may leave its policy to a target given later
        if not given and info.context is not None and not info.context.get("has_target"):
            raise bad(f"give one of {', '.join(POLICY_KEYS)} "
                      "(or a global 'target' to let the budget choose)")
        names = self.rank_names
        if isinstance(self.rank, list) and names and len(self.rank) != len(names):
            raise bad(f"method {self.method} takes {len(names)} rank(s) ({', '.join(names)}), "
                      f"got {len(self.rank)}: {self.rank}", ("rank",))
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """Every rule key, then the method options that were given (in that order)."""
        d = handler(self)
        out = {k: d[k] for k in RuleBase.model_fields}
        out.update({k: d[k] for k in d if k not in out and k in self.model_fields_set})
        return out

    def options(self) -> dict[str, Any]:
        """The method options that were given."""
        return {k: v for k, v in self.model_dump().items() if k not in RuleBase.model_fields}


RULE_KEYS: tuple[str, ...] = tuple(RuleBase.model_fields)
TARGET_KEYS: tuple[str, ...] = ("macs", "params", "latency")


class Target(Closed):
    """Global budget: exactly one of `macs`, `params`, `latency`, the fraction (in (0, 1]) of
    the whole model's cost to keep."""

    macs: Nullable(FRACTION) = doc("multiply-accumulates of one forward pass", None)
    params: Nullable(FRACTION) = doc("parameters", None)
    latency: Nullable(FRACTION) = doc("measured latency on the `latency` section's runtime", None)

    @classmethod
    def not_mapping(cls, v: Any) -> str:
        return ("expected null or a mapping with one of macs, params, latency "
                f"(e.g. {{macs: 0.5}}), got {show(v)}")

    @classmethod
    def check_mapping(cls, v: dict, info: ValidationInfo) -> dict:
        if len(v) != 1:
            got = " and ".join(v) if v else "none"
            raise bad(f"give exactly one of macs, params, latency (got {got})")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, float]:
        return {k: v for k, v in handler(self).items() if v is not None}


class PlanConfig(Closed):
    """How :func:`~compresscnn.core.surgery.plan` spreads a global target over the layers,
    and the runtime latency-aware planning times them on."""

    allocation: Enum(*ALLOCATIONS) = doc(
        "How a global `target` spreads over layers: `spectral` minimises the summed squared "
        "relative weight errors; `energy` maximises the product of the energies the layers "
        "keep (Zhang et al. 2015: no layer is cut to nothing); `sensitivity` (needs "
        "`calibration`) weighs each layer's error by the measured change of the model's output "
        "when that layer alone is decomposed (first 4 calibration batches); `output` (needs "
        "`calibration`) decomposes every candidate rank of every budgeted layer (as `method: "
        "auto` does) and minimises the summed squared relative errors of the layers' outputs "
        "on the first calibration batch instead of their weights'; `data_spectral` (needs "
        "`calibration`) is `spectral` on the layers' outputs without decomposing anything: "
        "an `svd` layer's spectrum is that of its weight in the metric of its inputs' second "
        "moments on the first 4 calibration batches (the error of the best rank-r fit of its "
        "outputs, which the closed-form fit reaches), other layers keep their weight "
        "spectra.", "spectral")
    latency: Any = doc(
        "The runtime latency-aware planning (`objective: latency`, a `latency` target) times "
        "layers on: a `compresscnn.measure.latency.LatencyConfig`, or a mapping of the "
        "recipe's `latency` section; null: its defaults.", None)


class CompressConfig(PlanConfig):
    """The settings of :func:`~compresscnn.core.surgery.compress` besides its rules, target
    and objective: the plan's (:class:`PlanConfig`), the data-aware fit's on calibration
    batches (:class:`~compresscnn.fit.config.FitConfig`) and the seed of what that fit
    draws at random. A mapping validates into it."""

    fit: FitConfig = section()
    seed: Int(0, 2**32 - 1) = doc(
        "Seed of the calibration distillation (its batch order, flips, crops and mixes).", 0)

    @model_validator(mode="after")
    def _latency(self) -> "CompressConfig":
        if self.latency is not None and not (isinstance(self.latency, dict)
                                             or hasattr(self.latency, "runtime")):
            raise bad(f"expected a LatencyConfig or a mapping, got {show(self.latency)}",
                      ("latency",))
        return self


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


def validate_compress(rules: Any, target: Any, config: Any = None,
                      source: str = "compress()") -> tuple[list[dict], dict | None,
                                                            CompressConfig]:
    """The Python API's rules (dicts or typed rules), target (a dict or a :class:`Target`)
    and config (a :class:`CompressConfig`, a mapping of its keys, or None for the
    defaults), checked before any work with the recipe's messages:
    ``compress(): target.macs: ...``."""
    where = Where(source)
    target = validate_target(target, _ctx=where)
    rules = validate_rules(rules, target=target, _ctx=where)
    if isinstance(config, CompressConfig):
        return rules, target, config
    try:
        return rules, target, CompressConfig.model_validate(
            {} if config is None else config, context={"where": where})
    except ValidationError as e:
        raise where.error(e) from None


def rule_options(rule: Mapping[str, Any]) -> dict[str, Any]:
    """The method options of a (validated) rule: its keys that are not :data:`RULE_KEYS`."""
    return {k: v for k, v in rule.items() if k not in RULE_KEYS}
