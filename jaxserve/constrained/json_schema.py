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

_DATE = r"[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": r"[a-zA-Z0-9](?:[a-zA-Z0-9._+-]{0,30}[a-zA-Z0-9])?@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?)*\.[a-zA-Z]{2,8}",
    "uri": r"https?://[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?)*(?:/[a-zA-Z0-9._~-]*)*",
    "ipv4": rf"{_OCTET}(?:\.{_OCTET}){{3}}",
}

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
        for key in ("not", "if", "then", "else", "dependencies", "dependentSchemas", "dependentRequired",
                    "unevaluatedProperties", "unevaluatedItems", "contains", "$dynamicRef", "$recursiveRef",
                    "propertyNames", "patternProperties", "minProperties", "maxProperties", "multipleOf"):
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
        if key in ("dependencies", "dependentSchemas", "dependentRequired", "patternProperties"):
            return v == {}
        if key == "multipleOf":
            return "integer" == schema.get("type") and isinstance(v, int) and v == 1
        if key == "minProperties":
            return isinstance(v, int) and v <= len(set(schema.get("required", [])))
        if key == "maxProperties":
            return isinstance(v, int) and v >= len(schema.get("properties", {}) or {}) + len(
                set(schema.get("required", [])) - set(schema.get("properties", {}) or {})) and (
                schema.get("additionalProperties", None) is False or bool(schema.get("properties")))
        if key in ("unevaluatedProperties", "unevaluatedItems"):
            return v is True
        return False

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
        if key == "oneOf" and len(subs) > 1 and not _disjoint_types(subs, self):
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
        if fmt is not None and fmt not in FORMATS:
            raise UnsupportedSchema(f"unsupported keyword 'format' value {fmt!r}")
        if fmt is not None:
            if pattern is not None or "minLength" in schema or "maxLength" in schema:
                raise UnsupportedSchema("unsupported keyword 'format' combined with pattern/minLength/maxLength")
            return f'"{FORMATS[fmt]}"'
        if pattern is not None:
            return '"' + self.pattern(pattern, min_len, max_len) + '"'
        cap = self.options.max_counted_repeat
        if min_len > cap:
            raise UnsupportedSchema(f"unsupported keyword 'minLength' above {cap}")
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
        if isinstance(node, Repeat) and isinstance(node.item, Chars):
            new_lo = max(node.min, min_len)
            bounds = [b for b in (node.max, max_len) if b is not None]
            new_hi = min(bounds) if bounds else None
            if new_hi is not None and new_hi < new_lo:
                raise _Never()
            return "(?:" + emit_regex(Repeat(node.item, new_lo, new_hi)) + ")"
        raise UnsupportedSchema("unsupported keyword 'pattern' combined with minLength/maxLength")

    # -- numbers
    def integer(self, schema: dict) -> str:
        lo = _int_bound(schema, "minimum", "exclusiveMinimum", lower=True)
        hi = _int_bound(schema, "maximum", "exclusiveMaximum", lower=False)
        if lo is None and hi is None:
            return INTEGER
        return int_range(None if lo is None else int(lo), None if hi is None else int(hi), self.charge)

    def number(self, schema: dict) -> str:
        lo = _int_bound(schema, "minimum", "exclusiveMinimum", lower=True)
        hi = _int_bound(schema, "maximum", "exclusiveMaximum", lower=False)
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
        props = schema.get("properties", {}) or {}
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise ValueError("required must be an array")
        additional = schema.get("additionalProperties", True)
        names = list(props) + [r for r in required if r not in props]
        if not names:
            if additional is False:
                return f"{_literal('{')}{self.ws}{_literal('}')}"
            if additional is True or additional == {}:
                return self.any_object(max(depth - 1, 0))
            value = self.value(additional, depth)
            member = f"{STRING}{self.sep(':')}{value}"
            self.charge(2 * len(member))
            return f"{_literal('{')}{self.ws}(?:{member}(?:{self.sep(',')}{member})*)?{self.ws}{_literal('}')}"
        members: list[tuple[str, bool]] = []
        for name in names:
            is_required = name in required
            if name not in props and additional is False:
                raise _Never()  # required, yet forbidden by additionalProperties: false
            sub = props.get(name, additional if isinstance(additional, dict) else True)
            key = _literal(json.dumps(name, ensure_ascii=False))
            try:
                members.append((f"{key}{self.sep(':')}{self.value(sub, depth)}", is_required))
            except _Never:
                if is_required:
                    raise
        return self.members(members)

    def members(self, members: list[tuple[str, bool]]) -> str:
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
        if min_items > cap + len(prefix):
            raise UnsupportedSchema(f"unsupported keyword 'minItems' above {cap}")
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
