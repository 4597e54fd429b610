"""The `structured` verifier: parse JSON from the answer and validate it against a JSON-schema subset.

The subset (DOMAINS.md) is the part of JSON Schema that structured-output tasks actually use:
`type` (string, integer, number, boolean, object, array, null, or a list of them), `properties`,
`required`, `enum`, `minimum`, `maximum`, `minLength`, `maxLength`, `items`, `minItems`,
`maxItems`, `additionalProperties` (false or a schema). It is hand-written (about 100 lines with its
check of the schema itself) rather than a dependency, so a reader sees every rule, and two rules
people get wrong are explicit:
- JSON has one number type; "integer" means a number with no fractional part (so 36 and 36.0 are
  integers, 36.5 is not), as the JSON Schema spec says.
- Python's `True` is an `int`, but a JSON boolean is never a number, and `enum: [1]` does not
  accept `true`. Equality below is JSON equality, not Python's.
A schema outside the subset (a keyword such as `pattern`, an unknown type name) is an error in *our*
data: `check_meta` raises on it, naming where it is, before anything is scored (otherwise valid
JSON would quietly score 0). The model's output never raises.
"""
import json
import math
import re

from data.chat import parse_response

_TYPES = ("string", "integer", "number", "boolean", "object", "array", "null")
_KEYWORDS = {"type", "properties", "required", "enum", "minimum", "maximum", "minLength", "maxLength",
             "items", "minItems", "maxItems", "additionalProperties", "description", "title"}
_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.S)


def _types(schema):
    """`type` as a list: one name or several."""
    return schema["type"] if isinstance(schema["type"], list) else [schema["type"]]


def _is_type(value, name):
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return name == "number" or isinstance(value, int) or float(value).is_integer()
    return isinstance(value, {"string": str, "object": dict, "array": list}[name])


def json_equal(a, b):
    """Equality of JSON values: booleans are not numbers, 1 == 1.0, containers compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_schema(schema, path="$"):
    """Raise ValueError if `schema` is not in the supported subset, naming where ($.properties.age)."""
    def fail(reason):
        raise ValueError(f"structured meta: schema at {path}: {reason}")
    if not isinstance(schema, dict):
        fail(f"a schema must be an object, got {type(schema).__name__}")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        fail(f"keywords outside the supported subset: {sorted(unknown)}")
    if "type" in schema:
        types = _types(schema)
        if not types or not all(t in _TYPES for t in types):
            fail(f"type must be one of {list(_TYPES)} or a non-empty list of them, got {schema['type']!r}")
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], (int, float))):
            fail(f"{key} must be a number, got {schema[key]!r}")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        fail("enum must be a non-empty list")
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(k, str) for k in required)):
        fail("required must be a list of property names")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        fail("properties must be an object")
    for key, sub in properties.items():
        check_schema(sub, f"{path}.properties.{key}")
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items")
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, bool):
        check_schema(extra, f"{path}.additionalProperties")


META_KEYS = ("schema",)   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta['schema'] is a schema in the supported subset."""
    check_schema(meta["schema"])


def errors(value, schema, path="$"):
    """All the ways `value` violates `schema` (one that passed check_schema), as 'path: reason'
    strings (empty = valid)."""
    if "type" in schema:
        types = _types(schema)
        if not any(_is_type(value, t) for t in types):
            return [f"{path}: expected {' or '.join(types)}, found {type(value).__name__}"]
    found = []
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        found.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                found += errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                found += errors(item, properties[key], f"{path}.{key}")
            elif extra is False:
                found.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                found += errors(item, extra, f"{path}.{key}")
    return found


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf in Python, but is no JSON number we accept
        raise ValueError(f"number {text} out of range")
    return value


def parse_json(answer):
    """The JSON value in the answer (inside a ``` fence if there is one), or raise ValueError."""
    fence = _FENCE.search(answer)
    text = fence.group(1) if fence else answer
    try:
        # NaN and Infinity are Python's extensions, not JSON
        return json.loads(text.strip(), parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:  # [[[[...]]]] nested deeper than the interpreter's stack
        raise ValueError("JSON nested too deeply") from None


def score(response, meta):
    """1.0 iff the answer's JSON validates against meta['schema'], else 0.0."""
    try:
        value = parse_json(parse_response(response)["answer"])
    except ValueError:  # includes json.JSONDecodeError
        return 0.0
    return float(not errors(value, meta["schema"]))
