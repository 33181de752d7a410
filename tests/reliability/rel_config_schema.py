"""Hypothesis strategies for the ``"agoq"`` block, derived from its JSON Schema (``json_schema()``).

Nothing here lists fields or allowed values by hand: ``valid(node)`` walks the schema the config
models publish (``$ref``, ``anyOf``, ``enum``, types, bounds, ``items``, ``properties``,
``additionalProperties``/``propertyNames``, ``required``, ``minItems``), so a new field, value or bound
is tested the moment it exists. A schema keyword the walker does not understand fails loudly
(``UnknownKeyword``) instead of being ignored. The one rule the schema cannot express, a model
validator, is declared in ``EXTRA_RULES`` and guarded by a test that compares it with the models'
validators.

The oracle is the schema itself (``check(block)`` returns every violation with its key path) plus
two documented refinements of what "valid" means at run time:

* ``"auto"`` for any property that has a default means the default (DeepSpeed's convention);
* pydantic's lax mode (the same as every DeepSpeed config block) accepts unambiguous spellings of a
  valid value: numeric strings for numbers, ``0``/``1``/``"yes"``/``"off"``... for booleans. Those
  are neither generated as "invalid" (``lax_accepted``) nor as "valid"; a separate property checks
  they mean the value they spell. A JSON boolean where a number belongs is *not* such a spelling.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from agoq_ds.config import json_schema

SCHEMA = json_schema()
DEFS: dict[str, dict] = SCHEMA["$defs"]

KNOWN_KEYWORDS = frozenset(
    {
        "$ref",
        "$defs",
        "$schema",
        "anyOf",
        "enum",
        "type",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "items",
        "properties",
        "additionalProperties",
        "propertyNames",
        "required",
        "default",
        "title",
        "description",
        "minItems",
        "maxItems",
    }
)
"""Schema keywords this module understands; any other one makes it raise ``UnknownKeyword``."""

Path = tuple[str | int, ...]
"""Key path inside the block: dict keys and list indices."""


class UnknownKeyword(AssertionError):
    """The schema uses a keyword the generator does not implement: extend this module."""


@dataclass(frozen=True)
class ExtraRule:
    """A constraint a model validator enforces that the JSON Schema cannot express."""

    holds: Callable[[dict], bool]
    """True when the object (raw JSON, ``"auto"`` meaning absent) satisfies the rule."""
    message: str
    """Text the error message must contain."""


def _has_selector(rule: dict) -> bool:
    return any(rule.get(k) not in (None, "auto") for k in ("class", "module", "stage"))


EXTRA_RULES: dict[str, ExtraRule] = {
    "ActivationRule": ExtraRule(_has_selector, "a rule needs at least one of 'class', 'module', 'stage'"),
}
"""Model validators by ``$defs`` name (``test_generator_knows_every_model_validator`` keeps it complete)."""


@dataclass(frozen=True)
class Node:
    """A resolved schema node: ``$ref`` followed (the referring site's keys win), its ``$defs`` name."""

    schema: dict
    name: str | None = None

    def __repr__(self) -> str:
        s = self.schema
        what = s.get("enum", s.get("type", "anyOf" if "anyOf" in s else "?"))
        return f"Node({self.name or s.get('title', '')}: {what})"

    def __post_init__(self) -> None:
        unknown = set(self.schema) - KNOWN_KEYWORDS
        if unknown:
            raise UnknownKeyword(f"schema keyword(s) {sorted(unknown)} not understood by the test generator")


def resolve(schema: dict) -> Node:
    """Follow ``$ref`` into ``$defs`` (keys next to the ``$ref``, e.g. ``default``, override)."""
    name = None
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = {**DEFS[name], **{k: v for k, v in schema.items() if k != "$ref"}}
    return Node(schema, name)


ROOT = resolve({k: v for k, v in SCHEMA.items() if k not in ("$defs", "$schema")})


def branches(node: Node) -> list[Node]:
    """The alternatives of an ``anyOf`` node (the node itself otherwise)."""
    if "anyOf" in node.schema:
        return [resolve(b) for b in node.schema["anyOf"]]
    return [node]


def nullable(node: Node) -> bool:
    return any(b.schema.get("type") == "null" for b in branches(node))


def main_branch(node: Node) -> Node:
    """The non-null alternative of ``X | null`` (the node itself otherwise)."""
    rest = [b for b in branches(node) if b.schema.get("type") != "null"]
    assert len(rest) == 1, f"anyOf with {len(rest)} non-null branches is not supported: {node.schema}"
    return rest[0]


# --- the oracle ---------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (``4.0 == 4``), booleans only equal booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class Violation:
    """One thing wrong in a block, where, and what the message must say about it."""

    path: Path
    kind: str
    """unknown_key | bad_key | enum | integer | number | boolean | string | array | object | missing |
    min_items | max_items | extra"""
    node: Node | None = None
    detail: Any = None


def check(node: Node, value: Any, path: Path = ()) -> list[Violation]:
    """Every violation of the schema (and ``EXTRA_RULES``) in ``value``, one per location."""
    alts = branches(node)
    if len(alts) > 1:
        if value is None and nullable(node):
            return []
        node = main_branch(node)
    s = node.schema
    if "enum" in s:
        return [] if any(_json_equal(value, e) for e in s["enum"]) else [Violation(path, "enum", node)]
    kind = s.get("type")
    if kind == "null":
        return [] if value is None else [Violation(path, "null", node)]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [Violation(path, "boolean", node)]
    if kind == "string":
        return [] if isinstance(value, str) else [Violation(path, "string", node)]
    if kind in ("integer", "number"):
        ok = _is_number(value) and math.isfinite(value) and (kind == "number" or float(value).is_integer())
        ok = ok and value >= s.get("minimum", -math.inf) and value <= s.get("maximum", math.inf)
        ok = ok and value > s.get("exclusiveMinimum", -math.inf) and value < s.get("exclusiveMaximum", math.inf)
        return [] if ok else [Violation(path, kind, node)]
    if kind == "array":
        if not isinstance(value, list):
            return [Violation(path, "array", node)]
        out = [v for i, item in enumerate(value) for v in check(resolve(s["items"]), item, (*path, i))]
        if len(value) < s.get("minItems", 0):
            out.append(Violation(path, "min_items", node))
        if len(value) > s.get("maxItems", math.inf):
            out.append(Violation(path, "max_items", node))
        return out
    if kind == "object":
        return _check_object(node, value, path)
    raise UnknownKeyword(f"node without enum or a known type: {s}")


def _check_object(node: Node, value: Any, path: Path) -> list[Violation]:
    s = node.schema
    if not isinstance(value, dict):
        return [Violation(path, "object", node)]
    out: list[Violation] = []
    props = s.get("properties", {})
    extra = s.get("additionalProperties", True)
    for key, item in value.items():
        if key in props:
            prop = resolve(props[key])
            if item == "auto" and "default" in prop.schema:
                continue  # DeepSpeed convention: "auto" means the default
            if item == "auto":
                out.append(Violation((*path, key), "missing", prop))
                continue
            out += check(prop, item, (*path, key))
        elif isinstance(extra, dict):
            names = s.get("propertyNames")
            if names is not None and check(resolve(names), key):
                out.append(Violation((*path, key), "bad_key", resolve(names)))
            out += check(resolve(extra), item, (*path, key))
        elif extra is False:
            out.append(Violation((*path, key), "unknown_key", node, sorted(props)))
    out += [
        Violation((*path, key), "missing", resolve(props[key])) for key in s.get("required", []) if key not in value
    ]
    rule = EXTRA_RULES.get(node.name or "")
    if rule is not None and not out and not rule.holds(value):
        out.append(Violation(path, "extra", node, rule.message))
    return out


def expected_value(node: Node, value: Any) -> Any:
    """What the parsed config must hold for a valid ``value`` (``"auto"``/absent -> the default),
    in ``model_dump(mode="json", by_alias=True)`` form."""
    if value is None:
        return None
    if len(branches(node)) > 1:
        node = main_branch(node)
    s = node.schema
    if s.get("type") == "object" and "properties" in s:
        out = {}
        for key, prop_schema in s["properties"].items():
            prop = resolve(prop_schema)
            given = value.get(key, "auto")
            out[key] = copy.deepcopy(prop.schema["default"]) if given == "auto" else expected_value(prop, given)
        return out
    if s.get("type") == "object":
        return {k: expected_value(resolve(s["additionalProperties"]), v) for k, v in value.items()}
    if s.get("type") == "array":
        return [expected_value(resolve(s["items"]), v) for v in value]
    return value


# --- lax spellings ------------------------------------------------------------------------------

BOOL_WORDS = ("0", "1", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n")
"""Strings pydantic's lax mode reads as booleans (any case)."""


def lax_accepted(node: Node, value: Any) -> bool:
    """True when pydantic's lax mode may accept ``value`` as a spelling of a valid value of
    ``node``: such values are neither 'valid' nor 'invalid' input for these tests."""
    for b in branches(node):
        s = b.schema
        if "enum" in s:
            continue
        kind = s.get("type")
        if kind in ("integer", "number") and isinstance(value, str):
            try:
                float(value)
                return True
            except ValueError:
                pass
        if kind == "boolean":
            if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
                return True
            if _is_number(value) and value in (0, 1):
                return True
    return False


# --- strategies: valid blocks -------------------------------------------------------------------

MAX_ITEMS = 3
"""Upper size of generated arrays and dicts (beyond the schema's own limits)."""


def valid(node: Node) -> st.SearchStrategy[Any]:
    """Any value ``check`` accepts for ``node`` (objects also with ``"auto"`` for defaulted keys)."""
    alts = branches(node)
    if len(alts) > 1:
        return st.one_of([valid(b) for b in alts])
    s = node.schema
    if "enum" in s:
        return st.sampled_from(s["enum"])
    kind = s.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=12)
    if kind == "integer":
        low = s.get("minimum", s["exclusiveMinimum"] + 1 if "exclusiveMinimum" in s else None)
        high = s.get("maximum", s["exclusiveMaximum"] - 1 if "exclusiveMaximum" in s else None)
        return st.integers(min_value=low, max_value=high)
    if kind == "number":
        return st.floats(
            min_value=s.get("minimum", s.get("exclusiveMinimum")),
            max_value=s.get("maximum", s.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in s,
            exclude_max="exclusiveMaximum" in s,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "array":
        return st.lists(
            valid(resolve(s["items"])),
            min_size=s.get("minItems", 0),
            max_size=min(s.get("maxItems", MAX_ITEMS), MAX_ITEMS),
        )
    if kind == "object":
        return _valid_object(node)
    raise UnknownKeyword(f"node without enum or a known type: {s}")


def _valid_object(node: Node) -> st.SearchStrategy[dict]:
    s = node.schema
    if "properties" not in s:
        keys = valid(resolve(s["propertyNames"])) if "propertyNames" in s else st.text(max_size=8)
        return st.dictionaries(keys, valid(resolve(s["additionalProperties"])), max_size=MAX_ITEMS)
    required, optional = {}, {}
    for key, prop_schema in s["properties"].items():
        prop = resolve(prop_schema)
        values = valid(prop)
        if "default" in prop.schema:
            values = st.one_of(values, st.just("auto"))
        (required if key in s.get("required", []) else optional)[key] = values
    objects = st.fixed_dictionaries(required, optional=optional)
    rule = EXTRA_RULES.get(node.name or "")
    return objects.filter(rule.holds) if rule is not None else objects


def valid_blocks() -> st.SearchStrategy[dict]:
    """Whole valid ``"agoq"`` blocks."""
    return valid(ROOT)


# --- strategies: invalid values -----------------------------------------------------------------

_PROBES: list[Any] = [None, True, False, 0, -1, 1, 3, 5.5, -0.5, 2**40, -(2**40), math.nan, math.inf, -math.inf]
_PROBES += ["", "x", "auto", "Nearest", "4", "yes", [], [1], ["x"], {}, {"x": 1}]


def invalid(node: Node) -> st.SearchStrategy[Any]:
    """Values ``check`` rejects for ``node`` that are not lax spellings of a valid value: probes of
    every JSON type, near misses of enums (other members' types, other numbers, case changes) and
    just-outside bounds."""
    near: list[st.SearchStrategy[Any]] = [st.sampled_from(_PROBES), st.integers(), st.text(max_size=6)]
    for b in branches(node):
        s = b.schema
        if "enum" in s:
            strs = [e for e in s["enum"] if isinstance(e, str)]
            near += [st.sampled_from([e.upper() for e in strs] + [e + " " for e in strs])] if strs else []
        for bound, step in (("minimum", -1), ("maximum", 1), ("exclusiveMinimum", 0), ("exclusiveMaximum", 0)):
            if bound in s:
                near.append(st.just(s[bound] + step))
                near.append(st.just(s[bound] + step * 0.5))
    return st.one_of(near).filter(lambda v: bool(check(node, v)) and not lax_accepted(node, v))


# --- mutation sites -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where a block can be made invalid."""

    path: Path
    kind: str
    """value | unknown_key | bad_key | missing"""
    node: Node


def sites(node: Node, value: Any, path: Path = ()) -> Iterator[Site]:
    """Every place in ``value`` (a valid block) where one edit makes it invalid."""
    if len(branches(node)) > 1:
        if value is None:
            return
        node = main_branch(node)
    s = node.schema
    if s.get("type") == "object" and isinstance(value, dict):
        props = s.get("properties")
        if props is not None:
            yield Site(path, "unknown_key", node)
            for key, prop_schema in props.items():
                prop = resolve(prop_schema)
                yield Site((*path, key), "value", prop)
                if key in value and value[key] != "auto":
                    yield from sites(prop, value[key], (*path, key))
                if key in s.get("required", []):
                    yield Site((*path, key), "missing", prop)
        else:
            if "propertyNames" in s:
                yield Site(path, "bad_key", resolve(s["propertyNames"]))
            for key, item in value.items():
                yield Site((*path, key), "value", resolve(s["additionalProperties"]))
                yield from sites(resolve(s["additionalProperties"]), item, (*path, key))
    elif s.get("type") == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            yield Site((*path, i), "value", resolve(s["items"]))
            yield from sites(resolve(s["items"]), item, (*path, i))


def get_in(block: Any, path: Path) -> Any:
    for p in path:
        block = block[p]
    return block


def typo_keys(keys: list[str]) -> st.SearchStrategy[str]:
    """Misspellings of ``keys`` (a dropped, doubled or swapped letter, a case change) and random text."""

    def typo(key: str, how: int, at: int) -> str:
        i = at % max(len(key), 1)
        if how == 0:
            return key[:i] + key[i + 1 :]
        if how == 1:
            return key[: i + 1] + key[i:]
        if how == 2 and len(key) > 1:
            j = min(i + 1, len(key) - 1)
            return key[:i] + key[j] + key[i] + key[j + 1 :] if j != i else key.upper()
        return key.upper()

    typos = st.builds(typo, st.sampled_from(keys), st.integers(0, 3), st.integers(0, 40)) if keys else st.nothing()
    return st.one_of(typos, st.text(min_size=1, max_size=10))


@st.composite
def invalid_blocks(draw: st.DrawFn, max_edits: int = 3) -> tuple[dict, list[Violation]]:
    """A valid block with 1..``max_edits`` edits at distinct places that make it invalid; returns
    the block and ``check``'s violations (what the error message must name)."""
    block = draw(valid_blocks())
    edits = draw(st.integers(1, max_edits))
    used: list[Path] = []
    for _ in range(edits):
        candidates = [
            x for x in sites(ROOT, block) if not any(x.path[: len(u)] == u or u[: len(x.path)] == x.path for u in used)
        ]
        if not candidates:
            break
        site = draw(st.sampled_from(candidates))
        parent = get_in(block, site.path[:-1]) if site.path else None
        if site.kind == "unknown_key":
            target = get_in(block, site.path)
            props = site.node.schema["properties"]
            key = draw(typo_keys(sorted(props)).filter(lambda k, props=props, target=target: k not in props))
            if key in target:
                continue
            target[key] = draw(st.integers() | st.text(max_size=3))
            used.append((*site.path, key))
        elif site.kind == "bad_key":
            target = get_in(block, site.path)
            key = draw(st.text(max_size=10).filter(lambda k, n=site.node, t=target: bool(check(n, k)) and k not in t))
            addl = resolve(resolve_parent(site.path).schema["additionalProperties"])
            target[key] = draw(valid(addl))
            used.append((*site.path, key))
        elif site.kind == "missing":
            del parent[site.path[-1]]
            used.append(site.path)
        else:
            parent[site.path[-1]] = draw(invalid(site.node))
            used.append(site.path)
    violations = check(ROOT, block)
    return block, violations


def resolve_parent(path: Path) -> Node:
    """The schema node of the object at ``path`` (a dict-valued property such as ``class_bits``)."""
    node = ROOT
    for p in path:
        node = main_branch(node) if len(branches(node)) > 1 else node
        s = node.schema
        if isinstance(p, int):
            node = resolve(s["items"])
        elif "properties" in s:
            node = resolve(s["properties"][p])
        else:
            node = resolve(s["additionalProperties"])
    return main_branch(node) if len(branches(node)) > 1 else node


# --- message expectations -----------------------------------------------------------------------


def path_text(path: Path) -> str:
    """``agoq.activation.rules[0].bits``: the form error messages use (a key that is empty or holds
    an unprintable character is written as a JSON string in brackets)."""

    def step(p: str | int) -> str:
        if isinstance(p, int):
            return f"[{p}]"
        return f".{p}" if p and p.isprintable() else f"[{json.dumps(p)}]"

    return "agoq" + "".join(step(p) for p in path)


def shown(value: Any) -> str:
    return json.dumps(value)


def expectation(v: Violation) -> list[str]:
    """Substrings the message line for ``v`` must contain: what is allowed there."""
    if v.kind == "unknown_key":
        return ["unknown key", "Allowed keys: " + ", ".join(v.detail)]
    if v.kind == "missing":
        return ["required key is missing"]
    if v.kind == "extra":
        return [v.detail]
    if v.kind in ("min_items", "max_items"):
        return [str(v.node.schema.get("minItems" if v.kind == "min_items" else "maxItems")), "item"]
    node = main_branch(v.node) if len(branches(v.node)) > 1 else v.node
    s = node.schema
    if v.kind in ("enum", "bad_key") or "enum" in s:
        return ["must be one of"]
    if v.kind in ("integer", "number"):
        words = ["must be an integer" if s["type"] == "integer" else "must be a number"]
        words += [str(s[b]) for b in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if b in s]
        return words + (["or null"] if nullable(v.node) else [])
    return {
        "boolean": ["valid boolean"],
        "string": ["valid string"],
        "array": ["valid list"],
        "object": ["valid dictionary"],
    }[s.get("type", v.kind)]


def enum_listed(v: Violation) -> list[str] | None:
    """For an enum violation, every allowed value as the message prints it (``None`` otherwise)."""
    node = main_branch(v.node) if len(branches(v.node)) > 1 else v.node
    if "enum" not in node.schema:
        return None
    return [str(e) for e in node.schema["enum"]]
