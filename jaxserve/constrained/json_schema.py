"""JSON Schema -> regex whose every match is a JSON text that validates against the schema.

Conservative by design: where the schema allows more than a regex can say, the regex admits a subset (e.g.
only declared properties, ASCII digits for \\d in patterns, at most one item under uniqueItems); where even
a safe subset is not expressible, `ValueError` names the keyword ("unsupported keyword 'not'"), which the
coverage benchmark reports as the reason. Output is compact JSON unless `JsonSchemaOptions.whitespace` says
otherwise; object properties come in schema order.

Optional properties, anyOf and $ref nest multiplicatively (each optional member repeats what follows it), so
the regex can grow exponentially with the schema: every fragment built is charged to a `BudgetMeter`
(cumulative characters and the largest fragment) and conversion stops with ConstraintTooComplex as soon as
a budget is exceeded, before the text is ever parsed.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from jaxserve.constrained.budget import BudgetMeter, CompileBudget, ConstraintTooComplex
from jaxserve.constrained.regex_parser import (
    Chars,
    Repeat,
    Seq,
    emit_chars,
    emit_regex,
    parse_regex,
    restrict_chars,
)

# Regexes below use only syntax that Python `re` and Rust-regex-style engines read the same way.
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))'
# Each STRING_CHAR decodes to exactly one code point (escaped surrogates excluded), so lengths are exact.
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = r"(?:true|false)"
NULL = r"null"
# Characters a JSON string may hold unescaped: patterns are narrowed to these so text == value.
_UNESCAPED_FORBIDDEN = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C))

_DATE = r"[1-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LABEL = r"[a-zA-Z](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?"
_HOST = rf"{_LABEL}(?:\.{_LABEL}){{0,3}}"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": r"[a-zA-Z0-9](?:[a-zA-Z0-9._+-]{0,30}[a-zA-Z0-9])?@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?)*\.[a-zA-Z]{2,8}",
    "uri": r"https?://[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?)*(?:/[a-zA-Z0-9._~-]*)*",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
    # Safe subsets of the rest of the formats JSON Schema defines (every match passes jsonschema's checker).
    "hostname": _HOST,
    "idn-hostname": _HOST,
    "ipv6": r"[0-9a-f]{1,4}(?::[0-9a-f]{1,4}){7}",
    "duration": r"P[1-9][0-9]{0,3}D(?:T[1-9][0-9]?H)?",
    "json-pointer": r"(?:/[a-zA-Z0-9._-]*)*",
    "relative-json-pointer": r"(?:0|[1-9][0-9]{0,3})(?:/[a-zA-Z0-9._-]*)*",
    "regex": r"[a-zA-Z0-9 _-]*",
}
for _alias, _same in (("uri-reference", "uri"), ("iri", "uri"), ("iri-reference", "uri"), ("uri-template", "uri"),
                      ("idn-email", "email")):
    FORMATS[_alias] = FORMATS[_same]
# Format names JSON Schema defines; any other is an annotation that constrains nothing (validators ignore it).
KNOWN_FORMATS = frozenset(FORMATS)

# Keywords that never constrain the instance.
_ANNOTATIONS = {
    "title", "description", "default", "examples", "example", "$schema", "$id", "id", "$comment", "deprecated",
    "readOnly", "writeOnly", "definitions", "$defs", "contentMediaType", "contentEncoding", "nullable_note",
    "markdownDescription", "$anchor",
}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


@dataclass(frozen=True)
class JsonSchemaOptions:
    """`whitespace`: regex allowed around structural characters (default: none, compact JSON).
    `max_ref_depth`: how many times one $ref may recurse. `max_nesting`: depth of free-form JSON values
    (json_object and schemas without constraints). `max_counted_repeat`: largest maxLength / maxItems
    expressed exactly; larger ones are narrowed to this many (still valid, just shorter)."""

    whitespace: str = ""
    max_ref_depth: int = 3
    max_nesting: int = 3
    max_counted_repeat: int = 32
    max_counted_min: int = 256  # largest minLength / minItems expressed (a lower bound cannot be narrowed)
    max_enum_values: int = 1000


class UnsupportedSchema(ValueError):
    """A valid schema this converter cannot express as a regex (the message names the keyword); a host
    matcher may still take it (constrained/host_matcher.py), unlike a malformed schema."""


class _Never(Exception):
    """The (sub)schema admits no value we can generate (e.g. recursion cut off)."""


def json_object_regex(options: JsonSchemaOptions = JsonSchemaOptions(), meter: BudgetMeter | None = None) -> str:
    """Any JSON object with nesting bounded by `options.max_nesting`."""
    conv = _Converter({}, options, meter)
    return conv.any_object(options.max_nesting)


def json_schema_to_regex(schema, options: JsonSchemaOptions = JsonSchemaOptions(),
                         meter: BudgetMeter | None = None) -> str:
    """`schema`: JSON text or the decoded value. Raises ValueError naming the unsupported keyword, and
    ConstraintTooComplex when the regex would exceed the `meter`'s budget (default: CompileBudget())."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    conv = _Converter(schema, options, meter)
    try:
        return conv.value(schema, options.max_nesting)
    except _Never:
        raise UnsupportedSchema("the schema admits no value that can be generated "
                         "(contradictory, or recursion deeper than max_ref_depth)") from None
    except RecursionError:
        raise ConstraintTooComplex("nesting depth", "schema nested too deeply") from None


def _literal(text: str) -> str:
    return "".join(emit_chars(((ord(c), ord(c)),)) for c in text)


def _alt(options: list[str]) -> str:
    options = list(dict.fromkeys(options))
    if not options:
        raise _Never()
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _repeat_bounds(lo: int, hi: int | None) -> str:
    if hi is None:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if lo == hi:
        return "" if lo == 1 else f"{{{lo}}}"
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _int_bound(schema: dict, key: str, exclusive_key: str, lower: bool) -> Decimal | None:
    value = schema.get(key)
    excl = schema.get(exclusive_key)
    bound: Decimal | None = None
    strict = False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bound = Decimal(str(value))
        strict = excl is True  # draft 4 boolean form
    if isinstance(excl, (int, float)) and not isinstance(excl, bool):
        e = Decimal(str(excl))
        if bound is None or (e >= bound if lower else e <= bound):
            bound, strict = e, True
    if bound is None:
        return None
    # Integer bound on the integer part: values k with k >= bound (or > bound when strict).
    if lower:
        k = math.ceil(bound)
        return Decimal(k + 1 if strict and k == bound else k)
    k = math.floor(bound)
    return Decimal(k - 1 if strict and k == bound else k)


# ---------------------------------------------------------------- integer ranges as regex

def _digits_range(lo: str, hi: str) -> list[str]:
    """Regexes for the decimal strings of equal length n with lo <= s <= hi (no leading-zero rule here)."""
    if lo == hi:
        return [lo]
    if not lo:
        return [""]
    if lo[0] == hi[0]:
        return [lo[0] + r for r in _digits_range(lo[1:], hi[1:])]
    n = len(lo) - 1
    if lo[1:] == "0" * n and hi[1:] == "9" * n:
        return [f"[{lo[0]}-{hi[0]}]" + ("[0-9]" + _repeat_bounds(n, n) if n else "")]
    out = []
    # lo[0] followed by >= lo[1:]
    out += [lo[0] + r for r in _digits_range(lo[1:], "9" * n)]
    a, b = int(lo[0]) + 1, int(hi[0]) - 1
    if a <= b:
        out.append((str(a) if a == b else f"[{a}-{b}]") + ("[0-9]" + _repeat_bounds(n, n) if n else ""))
    out += [hi[0] + r for r in _digits_range("0" * n, hi[1:])]
    return out


def _no_charge(_chars: int) -> None:
    return None


def nonneg_int_range(lo: int, hi: int | None, charge: Callable[[int], None] = _no_charge) -> str:
    """Canonical decimal integers in [lo, hi] (hi None: unbounded), lo >= 0. `charge(n)` is told the size of
    each length's parts as they are built (bounds of hundreds of digits make megabytes of regex)."""
    parts = []
    if lo == 0:
        parts.append("0")
        lo = 1
    top_len = len(str(hi)) if hi is not None else len(str(lo))
    for n in range(len(str(lo)), top_len + 1):
        a = max(lo, 10 ** (n - 1))
        b = 10**n - 1 if hi is None else min(hi, 10**n - 1)
        if a <= b:
            new = _digits_range(str(a), str(b))
            charge(sum(map(len, new)))
            parts += new
    if hi is None:
        parts.append(f"[1-9][0-9]{{{top_len},}}")
    if not parts:
        raise _Never()
    return _alt(parts)


def int_range(lo: int | None, hi: int | None, charge: Callable[[int], None] = _no_charge) -> str:
    if lo is not None and hi is not None and lo > hi:
        raise _Never()
    parts = []
    if lo is None or lo < 0:  # negative part: -m with m in [max(1, -hi), -lo]
        m_lo = 1 if hi is None or hi >= 0 else -hi
        m_hi = None if lo is None else -lo
        parts.append("-" + nonneg_int_range(m_lo, m_hi, charge))
    if hi is None or hi >= 0:
        parts.append(nonneg_int_range(max(lo or 0, 0), hi, charge))
    return _alt(parts)


# ---------------------------------------------------------------- converter

class _Converter:
    def __init__(self, root, options: JsonSchemaOptions, meter: BudgetMeter | None = None):
        self.root = root
        self.options = options
        self.ws = options.whitespace
        self.ref_depth: dict[str, int] = {}
        self.meter = BudgetMeter(CompileBudget()) if meter is None else meter

    def charge(self, chars: int) -> None:
        """Count `chars` of regex text built; raise once the cumulative total or one fragment is too big."""
        self.meter.charge("max_schema_work_chars", chars)
        self.meter.require("max_regex_chars", chars)
        self.meter.check_time("JSON schema conversion")

    def out(self, text: str) -> str:
        self.charge(len(text))
        return text

    # -- helpers
    def sep(self, ch: str) -> str:
        return f"{self.ws}{_literal(ch)}{self.ws}" if self.ws else _literal(ch)

    def resolve(self, ref: str):
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            # Remote documents and "#name" anchors (resolved through `id`/`$anchor`) are not followed.
            raise UnsupportedSchema(f"unsupported $ref {ref!r}: only local JSON-pointer references (#/...) are supported")
        node = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            part = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), part)
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"$ref {ref!r} does not resolve in this schema")
        return node

    # -- generic values
    def any_value(self, depth: int) -> str:
        parts = [STRING, NUMBER, BOOLEAN, NULL]
        if depth > 0:
            parts += [self.any_object(depth - 1), self.any_array(depth - 1)]
        return _alt(parts)

    def any_object(self, depth: int) -> str:
        member = f"{STRING}{self.sep(':')}{self.any_value(depth)}"
        return f"{_literal('{')}{self.ws}(?:{member}(?:{self.sep(',')}{member})*)?{self.ws}{_literal('}')}"

    def any_array(self, depth: int) -> str:
        v = self.any_value(depth)
        return f"{_literal('[')}{self.ws}(?:{v}(?:{self.sep(',')}{v})*)?{self.ws}{_literal(']')}"

    # -- schemas
    def value(self, schema, depth: int) -> str:
        return self.out(self._value(schema, depth))

    def _value(self, schema, depth: int) -> str:
        if schema is True:
            return self.any_value(depth)
        if schema is False:
            raise _Never()
        if not isinstance(schema, dict):
            raise ValueError(f"a subschema must be an object or a boolean, got {type(schema).__name__}")
        if "$ref" in schema:
            return self.ref(schema, depth)
        if "allOf" in schema:
            return self.value(self.merge_all_of(schema), depth)
        if "if" in schema:
            return self.value(self.conditional(schema), depth)
        if any(k in schema for k in _DEPENDENCY_KEYWORDS):
            return self.value(self.dependencies(schema), depth)
        for key in ("not", "unevaluatedProperties", "unevaluatedItems", "contains", "$dynamicRef", "$recursiveRef",
                    "propertyNames"):
            if key in schema and not self.harmless(schema, key):
                raise UnsupportedSchema(f"unsupported keyword {key!r}")
        if "const" in schema:
            return self.enum(schema, [schema["const"]], depth)
        if "enum" in schema:
            if not isinstance(schema["enum"], list):
                raise ValueError("enum must be an array")
            return self.enum(schema, schema["enum"], depth)
        branches = None
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = self.alternatives(schema, key, depth)
        if branches is not None:
            return _alt(branches)
        types = self.types(schema)
        parts = []
        for t in types:
            try:
                parts.append(self.typed(schema, t, depth))
            except _Never:
                continue
        return _alt(parts)

    def harmless(self, schema: dict, key: str) -> bool:
        v = schema[key]
        if key in ("unevaluatedProperties", "unevaluatedItems"):
            return v is True
        if key == "propertyNames":
            return v is True or v == {}
        return False

    # -- conditionals and dependencies, rewritten as alternatives of plain object schemas
    def conditional(self, schema: dict) -> dict:
        """if/then/else where `if` tests one property against literal values and the schema itself gives
        that property a finite set of values (enum/const/boolean): the set splits exactly into the values
        that pass `if` and those that fail it, so the three cases (passes; fails; absent, which passes
        unless `if` requires the property) become disjoint anyOf branches merged with then / else."""
        cond = schema["if"]
        then, otherwise = schema.get("then", True), schema.get("else", True)
        base = {k: v for k, v in schema.items() if k not in ("if", "then", "else")}
        if cond is True or cond == {}:
            return {"allOf": [base, then]}
        if cond is False:
            return {"allOf": [base, otherwise]}
        unsupported = UnsupportedSchema("unsupported keyword 'if': only a test of one property against "
                                        "literal values the schema enumerates is supported")
        if not isinstance(cond, dict) or set(cond) - {"properties", "required", "type"} - _ANNOTATIONS:
            raise unsupported
        if cond.get("type", "object") != "object" or base.get("type", "object") != "object" or _has_branches(base):
            raise unsupported
        props = cond.get("properties")
        if not isinstance(props, dict) or len(props) != 1:
            raise unsupported
        [(name, test)] = props.items()
        tested = _literal_values(test)
        if tested is None or set(test) - {"const", "enum"} - _ANNOTATIONS:
            raise unsupported
        if set(cond.get("required", [])) - {name}:
            raise unsupported
        declared = (base.get("properties") or {}).get(name)
        values = self.finite_values(declared)
        if values is None:
            raise unsupported
        passing = {_literal_key(v) for v in tested}
        inside = [v for v in values if _literal_key(v) in passing]
        outside = [v for v in values if _literal_key(v) not in passing]
        required = list(base.get("required", []))
        if_requires = name in cond.get("required", [])

        def case(allowed, tail):
            props = dict(base.get("properties") or {})
            if allowed is None:  # the property absent
                props[name] = False
                return {"allOf": [{**base, "properties": props}, tail]}
            narrowed = {k: v for k, v in self.deref(declared).items() if k != "const"}
            props[name] = {**narrowed, "enum": allowed}
            return {"allOf": [{**base, "properties": props, "required": required + [name]}, tail]}

        branches = [case(inside, then)] if inside else []
        if outside:
            branches.append(case(outside, otherwise))
        branches.append(case(None, otherwise if if_requires else then))
        return {"anyOf": branches}

    def deref(self, schema):
        """A schema that is only a $ref, resolved (one level)."""
        if isinstance(schema, dict) and "$ref" in schema and len(schema) == 1:
            return self.resolve(schema["$ref"])
        return schema

    def finite_values(self, schema) -> list | None:
        """Every value `schema` admits when that is a small literal set (enum, const, boolean), else None."""
        schema = self.deref(schema)
        values = _literal_values(schema)
        if values is not None:
            return values
        if isinstance(schema, dict) and schema.get("type") == "boolean" and set(schema) - _ANNOTATIONS == {"type"}:
            return [True, False]
        return None

    def dependencies(self, schema: dict) -> dict:
        """dependentRequired / dependentSchemas / dependencies (both forms): each trigger property is either
        absent (kept declared with schema false, so nothing else can take its name) or present with what it
        brings; 2^triggers disjoint branches, the compile budget bounds them."""
        base = {k: v for k, v in schema.items() if k not in _DEPENDENCY_KEYWORDS}
        rules: list[tuple[str, object]] = []
        for key in _DEPENDENCY_KEYWORDS:
            table = schema.get(key, {})
            if not isinstance(table, dict):
                raise ValueError(f"{key} must be an object")
            for name, need in table.items():
                if isinstance(need, list):
                    if not all(isinstance(n, str) for n in need):
                        raise ValueError(f"{key}.{name} must list property names")
                    rules.append((name, {"required": need}))
                elif isinstance(need, (dict, bool)):
                    rules.append((name, need))
                else:
                    raise ValueError(f"{key}.{name} must be an array of names or a schema")
        if not rules:
            return base
        if _has_branches(base) or base.get("type", "object") != "object":
            raise UnsupportedSchema("unsupported keyword 'dependencies' beside anyOf/oneOf or non-object types")
        branches = [base]
        for name, need in rules:
            expanded = []
            for b in branches:
                absent = dict(b.get("properties") or {})
                absent[name] = False
                expanded.append({**b, "properties": absent})
                required = list(b.get("required", []))
                present = {**b, "required": required + ([name] if name not in required else [])}
                expanded.append({"allOf": [present, need]} if need is not True else present)
            branches = expanded
            self.charge(len(json.dumps(branches)))
        return {"anyOf": branches}

    def ref(self, schema: dict, depth: int) -> str:
        ref = schema["$ref"]
        target = self.resolve(ref)
        extra = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
        count = self.ref_depth.get(ref, 0)
        if count >= self.options.max_ref_depth:
            raise _Never()
        self.ref_depth[ref] = count + 1
        try:
            if extra:
                return self.value({"allOf": [target, extra]}, depth)
            return self.value(target, depth)
        finally:
            self.ref_depth[ref] = count

    def types(self, schema: dict) -> list[str]:
        t = schema.get("type")
        if t is None:
            inferred = []
            if any(k in schema for k in ("properties", "required", "additionalProperties")):
                inferred.append("object")
            if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
                inferred.append("array")
            if any(k in schema for k in ("pattern", "minLength", "maxLength", "format")):
                inferred.append("string")
            if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                inferred.append("number")
            # Untyped with no type-specific keyword: any value.
            return inferred if len(inferred) == 1 else (list(_TYPES) if not inferred else _reject("type"))
        types = t if isinstance(t, list) else [t]
        for x in types:
            if x not in _TYPES:
                raise ValueError(f"unknown type {x!r}")
        if "number" in types and "integer" in types:
            types = [x for x in types if x != "integer"]
        return list(dict.fromkeys(types))

    def typed(self, schema: dict, t: str, depth: int) -> str:
        if t == "string":
            return self.string(schema)
        if t == "integer":
            return self.integer(schema)
        if t == "number":
            return self.number(schema)
        if t == "boolean":
            return BOOLEAN
        if t == "null":
            return NULL
        if t == "object":
            return self.object(schema, depth)
        return self.array(schema, depth)

    def enum(self, schema: dict, values: list, depth: int) -> str:
        if len(values) > self.options.max_enum_values:
            raise ConstraintTooComplex("enum values", f"{len(values)} > {self.options.max_enum_values}")
        if self.ws and any(isinstance(v, (dict, list)) and v for v in values):
            raise UnsupportedSchema("unsupported keyword 'enum' with object/array values and whitespace")
        texts = [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values]
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const") and k not in _ANNOTATIONS}
        if rest:
            # Other keywords also apply: keep the values that their (conservative) regex admits.
            try:
                others = re.compile(self.value(rest, depth))
            except _Never:
                raise
            texts = [t for t in texts if others.fullmatch(t)]
        return _alt([_literal(t) for t in texts])

    def alternatives(self, schema: dict, key: str, depth: int) -> list[str]:
        subs = schema[key]
        if not isinstance(subs, list) or not subs:
            raise ValueError(f"{key} must be a non-empty array")
        siblings = {k: v for k, v in schema.items() if k not in (key, "anyOf", "oneOf") and k not in _ANNOTATIONS}
        if key == "oneOf" and len(subs) > 1 and not _disjoint_types(subs, self) and \
                not _exclusive_objects(subs, siblings, self):
            raise UnsupportedSchema("unsupported keyword 'oneOf' with branches that may overlap")
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedSchema("unsupported keyword 'anyOf' together with 'oneOf'")
        out = []
        for sub in subs:
            merged = {"allOf": [siblings, sub]} if siblings else sub
            try:
                out.append(self.value(merged, depth))
            except _Never:
                continue
        if not out:
            raise _Never()
        return out

    def merge_all_of(self, schema: dict) -> dict:
        parts = [{k: v for k, v in schema.items() if k != "allOf"}] + list(schema["allOf"])
        resolved = []
        seen_refs = 0
        while parts:
            p = parts.pop(0)
            if p is True or p == {}:
                continue
            if p is False:
                raise _Never()
            if not isinstance(p, dict):
                raise ValueError("allOf items must be schemas")
            if "$ref" in p:
                seen_refs += 1
                if seen_refs > 64:
                    raise UnsupportedSchema("schema too complex: allOf references too deep")
                rest = {k: v for k, v in p.items() if k != "$ref"}
                parts = [self.resolve(p["$ref"]), rest] + parts
                continue
            if "allOf" in p:
                parts = [{k: v for k, v in p.items() if k != "allOf"}] + list(p["allOf"]) + parts
                continue
            resolved.append(p)
        merged: dict = {}
        props: dict = {}
        required: list = []
        closed_sets = []
        for p in resolved:
            for k, v in p.items():
                if k in _ANNOTATIONS:
                    continue
                if k == "properties":
                    for name, sub in v.items():
                        if name in props and props[name] != sub:
                            props[name] = {"allOf": [props[name], sub]}
                        else:
                            props[name] = sub
                elif k == "required":
                    required += [r for r in v if r not in required]
                elif k == "additionalProperties":
                    if v is False:
                        closed_sets.append(set(p.get("properties", {})))
                    elif v is not True and v != {}:
                        raise UnsupportedSchema("unsupported keyword 'additionalProperties' schema inside allOf")
                elif k == "type":
                    a = merged.get("type")
                    ta = set(a if isinstance(a, list) else [a]) if a is not None else None
                    tb = set(v if isinstance(v, list) else [v])
                    both = tb if ta is None else _intersect_types(ta, tb)
                    if not both:
                        raise _Never()
                    merged["type"] = sorted(both)
                elif k in merged and merged[k] != v:
                    raise UnsupportedSchema(f"unsupported keyword {k!r} with conflicting values inside allOf")
                else:
                    merged[k] = v
        if props:
            if closed_sets:
                allowed = set.intersection(*closed_sets)
                if any(r not in allowed for r in required):
                    raise _Never()
                props = {k: v for k, v in props.items() if k in allowed}
                merged["additionalProperties"] = False
            merged["properties"] = props
        elif closed_sets:
            merged["additionalProperties"] = False
        if required:
            merged["required"] = required
        return merged

    # -- strings
    def string(self, schema: dict) -> str:
        min_len = schema.get("minLength", 0)
        max_len = schema.get("maxLength")
        if not isinstance(min_len, int) or (max_len is not None and not isinstance(max_len, int)):
            raise ValueError("minLength/maxLength must be integers")
        if max_len is not None and max_len < min_len:
            raise _Never()
        fmt = schema.get("format")
        pattern = schema.get("pattern")
        if fmt is not None and fmt in KNOWN_FORMATS:
            if pattern is not None:
                raise UnsupportedSchema("unsupported keyword 'format' combined with pattern")
            regex = FORMATS[fmt]
            lo, hi = _length_range(parse_regex(regex))
            if lo < min_len or (max_len is not None and (hi is None or hi > max_len)):
                raise UnsupportedSchema(f"unsupported keyword 'format' {fmt!r} with minLength/maxLength "
                                        f"outside its lengths {lo}..{hi}")
            return f'"{regex}"'
        if pattern is not None:
            return '"' + self.pattern(pattern, min_len, max_len) + '"'
        cap = self.options.max_counted_min
        if min_len > cap:
            raise UnsupportedSchema(f"unsupported keyword 'minLength' above {cap}")
        cap = self.options.max_counted_repeat
        hi = None if max_len is None else min(max_len, max(cap, min_len))
        return f'"{STRING_CHAR}{_repeat_bounds(min_len, hi)}"'

    def pattern(self, pattern: str, min_len: int, max_len: int | None) -> str:
        if not isinstance(pattern, str):
            raise ValueError("pattern must be a string")
        try:
            # Full-match of the anchor-stripped pattern is a subset of re.search matches: always valid.
            node = parse_regex(pattern, subset_classes=True, meter=self.meter)
        except ConstraintTooComplex:
            raise
        except ValueError as e:
            raise UnsupportedSchema(f"unsupported keyword 'pattern': {e}") from None
        node = restrict_chars(node, _UNESCAPED_FORBIDDEN)
        lo, hi = _length_range(node)
        if lo >= min_len and (max_len is None or (hi is not None and hi <= max_len)):
            return "(?:" + emit_regex(node) + ")"
        # One repetition of a character class among fixed-length parts: its bounds carry the lengths.
        items = list(node.items) if isinstance(node, Seq) else [node]
        ranges = [_length_range(it) for it in items]
        variable = [i for i, (a, b) in enumerate(ranges) if a != b]
        if len(variable) == 1 and isinstance(items[variable[0]], Repeat) and isinstance(items[variable[0]].item, Chars):
            rep = items[variable[0]]
            fixed = sum(a for i, (a, _) in enumerate(ranges) if i != variable[0])
            new_lo = max(rep.min, min_len - fixed)
            bounds = [b for b in (rep.max, None if max_len is None else max_len - fixed) if b is not None]
            new_hi = min(bounds) if bounds else None
            if new_hi is not None and new_hi < new_lo:
                raise _Never()
            items[variable[0]] = Repeat(rep.item, new_lo, new_hi)
            return "(?:" + emit_regex(Seq(tuple(items)) if len(items) > 1 else items[0]) + ")"
        raise UnsupportedSchema("unsupported keyword 'pattern' combined with minLength/maxLength")

    # -- numbers
    def integer(self, schema: dict) -> str:
        lo = _int_bound(schema, "minimum", "exclusiveMinimum", lower=True)
        hi = _int_bound(schema, "maximum", "exclusiveMaximum", lower=False)
        step = _multiple_of(schema)
        if step is not None:
            # jsonschema divides by a float step in floating point: past 2^53 a multiple may fail its check, and
            # an integer past ~10^308 makes it raise. A float step gets at most 15 digits.
            digits = 15 if isinstance(schema["multipleOf"], float) else None
            return self.multiples(step, None if lo is None else int(lo), None if hi is None else int(hi), digits)
        if lo is None and hi is None:
            return INTEGER
        return int_range(None if lo is None else int(lo), None if hi is None else int(hi), self.charge)

    def multiples(self, step: int, lo: int | None, hi: int | None, digits: int | None = None) -> str:
        """Integers in [lo, hi] divisible by `step`: listed when there are at most max_enum_values of them;
        otherwise exact by their last digits when step = 2^a 5^b (divisibility by it depends only on the
        last max(a, b) digits); else refused."""
        if step == 1:
            if digits is not None:
                cap = 10 ** digits - 1
                lo, hi = max(-cap, -cap if lo is None else lo), min(cap, cap if hi is None else hi)
            return self.integer({k: v for k, v in {"minimum": lo, "maximum": hi}.items() if v is not None})
        if lo is not None and hi is not None:
            first = -(-lo // step) * step
            if first > hi:
                raise _Never()
            if (hi - first) // step < self.options.max_enum_values:
                return self.out(_alt([str(v) for v in range(first, hi + 1, step)]))
            raise UnsupportedSchema("unsupported keyword 'multipleOf' over a range this wide")
        positive = _positive_multiples_regex(step, self.options.max_enum_values, digits)
        if positive is None:
            raise UnsupportedSchema(f"unsupported keyword 'multipleOf' {step} without both bounds")
        if lo is None and hi is None:
            return f"(?:0|-?{positive})"
        if hi is None and lo <= 0 and lo > -step:  # 0 and the positive multiples
            return f"(?:0|{positive})"
        if hi is None and 0 < lo <= step:
            return positive
        if lo is None and 0 <= hi < step:
            return f"(?:0|-{positive})"
        if lo is None and -step <= hi < 0:
            return f"-{positive}"
        raise UnsupportedSchema("unsupported keyword 'multipleOf' with this one-sided bound")

    def number(self, schema: dict) -> str:
        lo = _int_bound(schema, "minimum", "exclusiveMinimum", lower=True)
        hi = _int_bound(schema, "maximum", "exclusiveMaximum", lower=False)
        if "multipleOf" in schema:  # an integral step: its multiples are integers
            return self.integer(schema)
        if lo is None and hi is None:
            return NUMBER
        # Integer part k in [lo, hi]; a fraction only where k >= 0 and k + 1 <= hi keeps k.f inside.
        lo_i = None if lo is None else int(lo)
        hi_i = None if hi is None else int(hi)
        parts = [int_range(lo_i, hi_i, self.charge)]
        frac_lo = max(lo_i if lo_i is not None else 0, 0)
        frac_hi = None if hi_i is None else hi_i - 1
        if frac_hi is None or frac_lo <= frac_hi:
            parts.append(nonneg_int_range(frac_lo, frac_hi, self.charge) + r"\.[0-9]+")
        return _alt(parts)

    # -- objects
    def object(self, schema: dict, depth: int) -> str:
        """Declared properties in schema order (required ones always, optional ones maybe); undeclared names
        only when nothing is declared (from patternProperties, else additionalProperties). A declared name
        that matches patternProperties also takes their schemas. min/maxProperties count the members."""
        props = schema.get("properties", {}) or {}
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise ValueError("required must be an array")
        additional = schema.get("additionalProperties", True)
        patterns = schema.get("patternProperties", {}) or {}
        if not isinstance(patterns, dict):
            raise ValueError("patternProperties must be an object")
        compiled = []
        for pattern, sub in patterns.items():
            try:  # jsonschema matches names with Python's re.search: the same semantics here
                compiled.append((pattern, re.compile(pattern), sub))
            except re.error as e:
                raise UnsupportedSchema(f"unsupported keyword 'patternProperties': {pattern!r}: {e}") from None
        lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or (hi or 0) < 0:
            raise ValueError("minProperties/maxProperties must be non-negative integers")
        names = list(props) + [r for r in required if r not in props]
        if not names:
            return self.open_object(additional, compiled, lo, hi, depth)
        members: list[tuple[str, bool]] = []
        for name in names:
            is_required = name in required
            matching = [sub for _, rx, sub in compiled if rx.search(name)]
            if name in props:
                sub = props[name]
            elif matching:
                sub = True  # an undeclared name that a pattern takes: additionalProperties does not apply
            elif additional is False:
                raise _Never()  # required, yet forbidden by additionalProperties: false
            else:
                sub = additional if isinstance(additional, dict) else True
            if matching:
                sub = {"allOf": [sub] + matching}
            key = _literal(json.dumps(name, ensure_ascii=False))
            try:
                members.append((f"{key}{self.sep(':')}{self.value(sub, depth)}", is_required))
            except _Never:
                if is_required:
                    raise
        return self.members(members, lo, hi)

    def open_object(self, additional, patterns: list, lo: int, hi: int | None, depth: int) -> str:
        """An object with no declared names: members whose names come from patternProperties (a name of any
        pattern, its value valid for every pattern's schema) or else from additionalProperties. Names may
        repeat, and a repeated name counts once: so minProperties above 1 cannot be promised here."""
        empty = f"{_literal('{')}{self.ws}{_literal('}')}"
        if patterns:
            keys = _alt(['"' + self.pattern(p, 0, None) + '"' for p, _, _ in patterns])
            value_schema = patterns[0][2] if len(patterns) == 1 else {"allOf": [sub for _, _, sub in patterns]}
        elif additional is False:
            if lo > 0:
                raise _Never()
            return empty
        else:
            keys = STRING
            value_schema = True if additional is True or additional == {} else additional
        if lo > 1:
            raise UnsupportedSchema("unsupported keyword 'minProperties' above 1 for an object without declared properties")
        if value_schema is True and not patterns and lo == 0 and hi is None:
            return self.any_object(max(depth - 1, 0))
        try:
            value = self.value(value_schema, depth - 1 if value_schema is True else depth)
        except _Never:
            if lo > 0:
                raise
            return empty
        if hi == 0:
            return empty
        member = f"{keys}{self.sep(':')}{value}"
        self.charge(2 * len(member))
        more = _repeat_bounds(max(lo - 1, 0), None if hi is None else hi - 1)
        body = f"{member}(?:{self.sep(',')}{member}){more}"
        if lo == 0:
            body = f"(?:{body})?"
        return f"{_literal('{')}{self.ws}{body}{self.ws}{_literal('}')}"

    def members(self, members: list[tuple[str, bool]], lo: int = 0, hi: int | None = None) -> str:
        """Members in order, required ones always; between `lo` and `hi` of them in all."""
        n_required = sum(1 for _, r in members if r)
        top = len(members) if hi is None else min(hi, len(members))
        if lo > top or n_required > top:
            raise _Never()
        if lo <= n_required and top == len(members):
            return self.uncounted_members(members)
        return self.counted_members(members, lo, top)

    def counted_members(self, members: list[tuple[str, bool]], lo: int, hi: int) -> str:
        """suffix[k]: the members from i on when k were emitted before (None: no way to end within
        [lo, hi]). Each optional member doubles what follows it in the text: the budget bounds that."""
        comma = self.sep(",")
        suffix: list[str | None] = ["" if k >= lo else None for k in range(hi + 1)]
        for text, is_required in reversed(members):
            nxt = suffix
            suffix = []
            for k in range(hi + 1):
                take = None
                if k < hi and nxt[k + 1] is not None:
                    take = (comma if k else "") + text + nxt[k + 1]
                skip = None if is_required else nxt[k]
                options = [o for o in (take, skip) if o is not None]
                suffix.append(None if not options else options[0] if len(options) == 1
                              else "(?:" + "|".join(options) + ")")
                self.charge(len(suffix[-1] or ""))
        if suffix[0] is None:
            raise _Never()
        return f"{_literal('{')}{self.ws}{suffix[0]}{self.ws}{_literal('}')}"

    def uncounted_members(self, members: list[tuple[str, bool]]) -> str:
        comma = self.sep(",")
        after_some = ""  # B_i: members i.. when something was emitted before
        after_none = ""  # A_i: members i.. when nothing was emitted yet
        for text, is_required in reversed(members):
            # Both suffixes repeat `text` and each other: charge before building (growth is quadratic here
            # and multiplies across nesting levels).
            self.charge(2 * (len(text) + len(after_some) + len(comma)) + len(after_none) + 8)
            if is_required:
                after_none = text + after_some
                after_some = comma + text + after_some
            else:
                with_it = text + after_some
                after_none = f"(?:{with_it}|{after_none})" if after_none else f"(?:{with_it})?"
                after_some = f"(?:{comma}{text})?" + after_some
        return f"{_literal('{')}{self.ws}{after_none}{self.ws}{_literal('}')}"

    # -- arrays
    def array(self, schema: dict, depth: int) -> str:
        min_items = schema.get("minItems", 0)
        max_items = schema.get("maxItems")
        if not isinstance(min_items, int) or (max_items is not None and not isinstance(max_items, int)):
            raise ValueError("minItems/maxItems must be integers")
        if schema.get("uniqueItems") is True:
            # Zero or one item is always unique: a safe subset.
            if min_items > 1:
                raise UnsupportedSchema("unsupported keyword 'uniqueItems' with minItems > 1")
            max_items = 1 if max_items is None else min(max_items, 1)
        if max_items is not None and max_items < min_items:
            raise _Never()
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix or []
        comma = self.sep(",")
        open_, close = f"{_literal('[')}{self.ws}", f"{self.ws}{_literal(']')}"
        cap = self.options.max_counted_repeat
        if min_items > self.options.max_counted_min + len(prefix):
            raise UnsupportedSchema(f"unsupported keyword 'minItems' above {self.options.max_counted_min}")
        prefix_rx = [self.value(p, depth - 1) if p is True else self.value(p, depth) for p in prefix]
        try:
            item_rx = self.value(items, depth - 1 if items is True else depth) if items is not False else None
        except _Never:
            item_rx = None
        # Lengths: n prefix items (the first n of prefix), then rest items of `items`.
        options = []
        hi_total = max_items
        for n in range(0, len(prefix) + 1):
            if n < len(prefix):
                if n < min_items or (hi_total is not None and n > hi_total):
                    continue
                options.append(self.out(comma.join(prefix_rx[:n])))
                continue
            # all prefix items present, then 0.. more items
            if item_rx is None:
                if n >= min_items and (hi_total is None or n <= hi_total):
                    options.append(comma.join(prefix_rx))
                continue
            rest_lo = max(min_items - n, 0)
            rest_hi = None if hi_total is None else hi_total - n
            if rest_hi is not None and rest_hi < rest_lo:
                continue
            if rest_hi is None or rest_hi > max(cap, rest_lo):
                rest_hi = None if rest_hi is None and rest_lo <= cap else max(cap, rest_lo)
            head = comma.join(prefix_rx)
            if rest_hi == 0:
                options.append(head)
                continue
            if rest_lo == 0:
                tail = f"(?:{item_rx}(?:{comma}{item_rx}){_repeat_bounds(0, None if rest_hi is None else rest_hi - 1)})?"
                if head:
                    tail = f"(?:{comma}{item_rx}){_repeat_bounds(0, rest_hi)}"
            else:
                tail = f"{item_rx}(?:{comma}{item_rx}){_repeat_bounds(rest_lo - 1, None if rest_hi is None else rest_hi - 1)}"
                if head:
                    tail = f"(?:{comma}{item_rx}){_repeat_bounds(rest_lo, rest_hi)}"
            options.append(self.out(head + tail))
        if not options:
            raise _Never()
        self.charge(sum(map(len, options)))  # the alternation joins them: charge before building it
        return open_ + _alt(options) + close


def _reject(keyword: str):
    raise UnsupportedSchema(f"unsupported keyword {keyword!r}: several types implied without 'type'")


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _intersect_types(a: set, b: set) -> set:
    out = a & b
    if "number" in a and "integer" in b or "integer" in a and "number" in b:
        out.add("integer")
    return out


def _branch_types(sub, conv: _Converter) -> set[str] | None:
    """The JSON types a oneOf branch can produce (None: unknown)."""
    if not isinstance(sub, dict):
        return None
    if "$ref" in sub:
        try:
            return _branch_types(conv.resolve(sub["$ref"]), conv)
        except ValueError:
            return None
    if "const" in sub:
        return {_json_type(sub["const"])}
    if "enum" in sub and isinstance(sub["enum"], list):
        return {_json_type(v) for v in sub["enum"]}
    if "type" not in sub:
        try:
            types = conv.types(sub)
        except ValueError:
            return None
        return set(types) if len(types) < len(_TYPES) else None
    t = sub["type"]
    types = set(t if isinstance(t, list) else [t])
    if "number" in types:
        types.add("integer")
    return types


def _disjoint_types(subs: list, conv: _Converter) -> bool:
    seen: set[str] = set()
    for sub in subs:
        types = _branch_types(sub, conv)
        if types is None or types & seen:
            # Distinct const/enum values, or a required property with distinct const/enum values in every
            # branch (a discriminator), also make the branches exclusive.
            return _distinct_literals(subs) or _has_discriminator(subs, conv)
        seen |= types
    return True


def _distinct_literals(subs: list) -> bool:
    values = []
    for sub in subs:
        if not isinstance(sub, dict):
            return False
        if "const" in sub:
            vals = [sub["const"]]
        elif isinstance(sub.get("enum"), list):
            vals = sub["enum"]
        else:
            return False
        values += [json.dumps(v, sort_keys=True) for v in vals]
    return len(values) == len(set(values))


def _multiple_of(schema: dict) -> int | None:
    """multipleOf as an integer (None when absent). A fractional step is refused: jsonschema checks it in
    binary floating point (0.3 is not a multiple of 0.1 there), so no decimal output is safe."""
    step = schema.get("multipleOf")
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        raise ValueError("multipleOf must be a positive number")
    if isinstance(step, float) and not step.is_integer():
        raise UnsupportedSchema(f"unsupported keyword 'multipleOf' with the fractional step {step}")
    return int(step)


def _positive_multiples_regex(step: int, max_listed: int, max_digits: int | None = None) -> str | None:
    """Regex of the positive multiples of `step` = 2^a 5^b (None otherwise, or when the multiples below
    10^max(a, b) are more than `max_listed`): those short ones listed, the longer ones by their last digits."""
    rest, twos, fives = step, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return None
    width = max(twos, fives)
    bound = 10 ** width
    if bound // step > max_listed:
        return None
    endings = [str(v).zfill(width) for v in range(0, bound, step)]
    short = [str(v) for v in range(step, bound, step)]
    if max_digits is not None and max_digits <= width:
        return _alt(short) if short else None
    middle = "[0-9]*" if max_digits is None else _repeat_bounds(0, max_digits - width - 1).join(["[0-9]", ""])
    longer = "[1-9]" + middle + _alt(endings)
    return _alt(short + [longer])


_DEPENDENCY_KEYWORDS = ("dependentRequired", "dependentSchemas", "dependencies")


def _has_branches(schema: dict) -> bool:
    return any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "if"))


def _literal_key(value) -> str:
    """JSON-Schema equality of literals: 1 == 1.0, but true != 1 (Python's == says otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "n:" + str(Decimal(str(value)).normalize())
    return "v:" + json.dumps(value, sort_keys=True)


def _literal_values(sub) -> list | None:
    if isinstance(sub, dict) and "const" in sub:
        return [sub["const"]]
    if isinstance(sub, dict) and isinstance(sub.get("enum"), list):
        return sub["enum"]
    return None


def _has_discriminator(subs: list, conv: _Converter) -> bool:
    branches = []
    for sub in subs:
        if isinstance(sub, dict) and "$ref" in sub and len(sub) == 1:
            try:
                sub = conv.resolve(sub["$ref"])
            except ValueError:
                return False
        if not isinstance(sub, dict) or not isinstance(sub.get("properties"), dict):
            return False
        branches.append(sub)
    candidates = set.intersection(*(set(b.get("required", [])) & set(b["properties"]) for b in branches))
    for name in sorted(candidates):
        values = [_literal_values(b["properties"][name]) for b in branches]
        if any(v is None for v in values):
            continue
        encoded = [json.dumps(v, sort_keys=True) for vals in values for v in vals]
        if len(encoded) == len(set(encoded)):
            return True
    return False


def _exclusive_objects(subs: list, siblings: dict, conv: _Converter) -> bool:
    """oneOf over object branches whose outputs each fail every other branch: an output of branch A has
    only A's declared names (the converter emits no others when a branch declares some) and all of A's
    required ones, so it fails B when A requires a name B's closed object (additionalProperties false, no
    patternProperties) does not declare, or when B requires a name A does not declare."""
    shapes = []
    for sub in subs:
        try:
            shape = conv.merge_all_of({"allOf": [siblings, sub]})
        except (ValueError, _Never):
            return False
        names = set(shape.get("properties") or {}) | set(shape.get("required") or [])
        if shape.get("type", "object") not in ("object", ["object"]) or not names or _has_branches(shape):
            return False
        shapes.append((shape, names))

    def fails(a: tuple, b: tuple) -> bool:
        (_, a_names), (b_shape, b_names) = a, b
        a_required = set(a[0].get("required") or [])
        b_closed = b_shape.get("additionalProperties") is False and not b_shape.get("patternProperties")
        return bool(b_closed and a_required - set(b_shape.get("properties") or {})) or \
            bool(set(b_shape.get("required") or []) - a_names)

    return all(fails(a, b) for i, a in enumerate(shapes) for j, b in enumerate(shapes) if i != j)


def _length_range(node) -> tuple[int, int | None]:
    """(min, max) number of code points in the strings a regex IR matches (max None: unbounded)."""
    from jaxserve.constrained.regex_parser import Alt, Seq

    if isinstance(node, Chars):
        return 1, 1
    if isinstance(node, Seq):
        lo, hi = 0, 0
        for n in node.items:
            a, b = _length_range(n)
            lo += a
            hi = None if hi is None or b is None else hi + b
        return lo, hi
    if isinstance(node, Alt):
        ranges = [_length_range(n) for n in node.items]
        his = [b for _, b in ranges]
        return min(a for a, _ in ranges), None if any(b is None for b in his) else max(his)
    a, b = _length_range(node.item)
    return a * node.min, None if node.max is None or b is None else b * node.max
