"""The JSON Schema subset that constrained decoding enforces, compiled to automaton nodes (router/constrained.py).

Supported keywords (anything else is refused naming the keyword; the API's meta-schema,
``protocol_features.SchemaSubset``, lists the same ones, so the OpenAPI document and the node agree):
``type`` (object, array, string, number, integer, boolean, null, or a non-empty list of them),
``properties``, ``required``, ``additionalProperties`` (true or false only), ``items``, ``minItems``,
``maxItems``, ``enum``, ``const``, and the annotations ``title``, ``description``, ``default``, ``examples``,
``$schema``, ``$comment``, ``strict``. A subschema may be ``true`` (anything) or ``false`` (nothing).

Semantics are JSON Schema's (2020-12), read as "what may the output be":
- every keyword applies at once: ``{"type": "string", "enum": ["a", 1]}`` allows only ``"a"``;
- a ``required`` name missing from ``properties`` is a property with any JSON value (unless
  ``additionalProperties`` is false, which makes an object impossible);
- a branch that nothing satisfies (an array with ``minItems > maxItems``, an object needing an impossible
  property, an enum none of whose values fits the other keywords) drops out of the union; only when the
  whole schema allows no value at all is it refused (:class:`UnsatisfiableSchema`), since there is nothing
  to generate.
The decoder generates a subset of what the schema allows (only listed properties, objects where
``properties`` is given without ``type``), never anything outside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$comment", "strict"})
KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                      "enum", "const"}) | ANNOTATIONS


class UnsupportedSchema(ValueError):
    """A schema keyword or value the constrained decoder cannot enforce (the API answers 400 naming it)."""

    def __init__(self, keyword: str, path: str, detail: str = "") -> None:
        where = path or "the root"
        super().__init__(f"JSON schema keyword '{keyword}' at {where} is not supported{': ' + detail if detail else ''}"
                         f" (supported: {', '.join(sorted(KEYWORDS))})")
        self.keyword = keyword
        self.path = path


class UnsatisfiableSchema(UnsupportedSchema):
    """A schema in the subset that no JSON value satisfies, so there is nothing to generate."""

    def __init__(self, path: str, reasons: list[str]) -> None:
        ValueError.__init__(self, f"no JSON value satisfies the schema at {path or 'the root'}: "
                                  + "; ".join(dict.fromkeys(reasons)))
        self.keyword = "schema"
        self.path = path


# ---- schema nodes ------------------------------------------------------------------------------------


@dataclass(eq=False)
class ObjectSpec:
    properties: dict[str, Node] = field(default_factory=dict)
    required: frozenset[str] = frozenset()
    free: bool = False
    """Any keys with any values (json_object mode, or ``{"type": "object"}`` with no properties)."""
    key_literals: dict[str, str] = field(default_factory=dict)  # '"name"' (JSON-encoded) -> name


@dataclass(eq=False)
class Node:
    """What one JSON value may be. Several kinds at once form a union (``"type": [...]``)."""

    obj: ObjectSpec | None = None
    items: Node | None = None
    """The element node; None with ``max_items == 0`` (items that nothing satisfies: only ``[]``)."""
    is_array: bool = False
    min_items: int = 0
    max_items: int | None = None
    string: bool = False
    number: bool = False
    integer: bool = False
    literals: tuple[str, ...] = ()
    """Exact JSON texts also allowed (true/false/null); with ``only_literals`` the only ones (enum/const)."""
    only_literals: bool = False


def any_value() -> Node:
    """Any JSON value (json_object mode); nested containers reuse the same node."""
    node = Node(obj=ObjectSpec(free=True), is_array=True, string=True, number=True, literals=("true", "false", "null"))
    node.items = node
    return node


ANY = any_value()


def json_object_node() -> Node:
    """``response_format: {"type": "json_object"}`` / Ollama ``format: "json"``: one JSON object."""
    return Node(obj=ObjectSpec(free=True))


def compile_schema(schema: Any, path: str = "") -> Node:
    """The JSON schema as automaton nodes.

    :class:`UnsupportedSchema` for anything outside the subset, :class:`UnsatisfiableSchema` (a subclass)
    when no JSON value satisfies it.
    """
    check_keywords(schema, path)
    reasons: list[str] = []
    node = _compile(schema, path, reasons)
    if node is None:
        raise UnsatisfiableSchema(path, reasons)
    return node


def _compile(schema: Any, path: str, why: list[str]) -> Node | None:
    """The node, or None when nothing satisfies ``schema`` (the reason appended to ``why``)."""
    if schema is True:
        return ANY
    if schema is False:
        why.append(f"{path or 'the root'} is false")
        return None
    if not schema:
        return ANY
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        fitting = [v for v in values if admits(schema, v)]
        if not fitting:
            why.append(f"no value of enum/const at {path or 'the root'} fits its other keywords")
            return None
        return Node(literals=tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in fitting)),
                    only_literals=True)
    types = schema.get("type")
    if types is None:
        preferred = ["object"] if "properties" in schema else (["array"] if "items" in schema else [])
        node = _compile_types(schema, preferred, path, why) if preferred else None
        return node or _compile_types(schema, list(TYPES), path, why)
    return _compile_types(schema, [types] if isinstance(types, str) else types, path, why)


def _compile_types(schema: dict, types: list[str], path: str, why: list[str]) -> Node | None:
    node = Node()
    literals: list[str] = []
    alive = False
    for t in types:
        if t == "object":
            node.obj = _object_spec(schema, path, why)
            alive |= node.obj is not None
        elif t == "array":
            alive |= _array(node, schema, path, why)
        elif t == "string":
            node.string = alive = True
        elif t in ("number", "integer"):
            node.number = alive = True
        elif t == "boolean":
            literals += ["true", "false"]
        else:
            literals.append("null")
    node.integer = "integer" in types and "number" not in types
    node.literals = tuple(dict.fromkeys(literals))
    return node if alive or literals else None


def _array(node: Node, schema: dict, path: str, why: list[str]) -> bool:
    """Make ``node`` allow arrays; False when no array satisfies the schema."""
    where = path or "the root"
    min_items = schema.get("minItems", 0)
    max_items = schema.get("maxItems")
    if max_items is not None and max_items < min_items:
        why.append(f"minItems {min_items} > maxItems {max_items} at {where}")
        return False
    items = _compile(schema.get("items", True), f"{path}/items", why)
    if items is None:
        if min_items > 0:
            why.append(f"minItems {min_items} at {where} but no item is possible")
            return False
        max_items = 0
    node.is_array, node.items, node.min_items, node.max_items = True, items, min_items, max_items
    return True


def _object_spec(schema: dict, path: str, why: list[str]) -> ObjectSpec | None:
    where = path or "the root"
    props: dict[str, Any] = schema.get("properties") or {}
    required: list[str] = schema.get("required", [])
    extra: bool = schema.get("additionalProperties", True)
    missing = [r for r in required if r not in props]
    if missing and not extra:
        why.append(f"required {missing} at {where} are not in properties and additionalProperties is false")
        return None
    if not props and not required:
        return ObjectSpec(free=extra)
    nodes: dict[str, Node] = {}
    for name, sub in props.items():
        compiled = _compile(sub, f"{path}/properties/{name}", why)
        if compiled is not None:
            nodes[name] = compiled
        elif name in required:
            why.append(f"required property {name!r} at {where} cannot have any value")
            return None
    for name in missing:  # allowed by additionalProperties: any JSON value
        nodes[name] = ANY
    return ObjectSpec(properties=nodes, required=frozenset(required),
                      key_literals={json.dumps(name, ensure_ascii=False): name for name in nodes})


def check_keywords(schema: Any, path: str = "") -> None:
    """Every subschema uses only the subset's keywords, with the value types the meta-schema gives them
    (api/protocol_features.SchemaSubset); :class:`UnsupportedSchema` naming the first that does not."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UnsupportedSchema("schema", path, f"expected an object or a boolean, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in KEYWORDS:
            raise UnsupportedSchema(key, path)
        if key == "type":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not names or any(t not in TYPES for t in names):
                raise UnsupportedSchema("type", path, f"expected one of {list(TYPES)} or a non-empty list of them")
        elif key == "properties" and not (isinstance(value, dict) and all(
                isinstance(s, bool | dict) for s in value.values())):
            raise UnsupportedSchema("properties", path, "expected an object of schemas")
        elif key == "required" and not (isinstance(value, list) and all(isinstance(r, str) for r in value)):
            raise UnsupportedSchema("required", path, "expected a list of property names")
        elif key == "additionalProperties" and not isinstance(value, bool):
            raise UnsupportedSchema("additionalProperties", path, "only true or false")
        elif key in ("minItems", "maxItems") and not (_is_integer(value) and value >= 0):
            raise UnsupportedSchema(key, path, "expected a non-negative integer")
        elif key == "enum" and not (isinstance(value, list) and value):
            raise UnsupportedSchema("enum", path, "expected a non-empty list")
        elif key == "items" and not isinstance(value, bool | dict):
            raise UnsupportedSchema("items", path, "expected a schema")
    for name, sub in (schema.get("properties") or {}).items():
        check_keywords(sub, f"{path}/properties/{name}")
    if "items" in schema:
        check_keywords(schema["items"], f"{path}/items")


# ---- validation (enum/const values against the other keywords) ----------------------------------------


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _has_type(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "integer":
        return _is_integer(value)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    return value is None


def json_equal(a: Any, b: Any) -> bool:
    """JSON Schema's equality: ``1 == 1.0``, but ``true != 1``; objects by keys, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def admits(schema: Any, value: Any) -> bool:
    """Whether ``value`` validates against ``schema`` (a schema of the subset, keywords already checked)."""
    if isinstance(schema, bool):
        return schema
    types = schema.get("type")
    if types is not None and not any(_has_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return False
    if "const" in schema and not json_equal(value, schema["const"]):
        return False
    if "enum" in schema and not any(json_equal(value, v) for v in schema["enum"]):
        return False
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        if any(name not in value for name in schema.get("required", [])):
            return False
        for key, item in value.items():
            if key in props:
                if not admits(props[key], item):
                    return False
            elif schema.get("additionalProperties", True) is False:
                return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return False
        if schema.get("maxItems") is not None and len(value) > schema["maxItems"]:
            return False
        items = schema.get("items", True)
        if not all(admits(items, item) for item in value):
            return False
    return True
