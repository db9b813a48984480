"""The API schema (``vnicd-api.yml``): loading it and validating values against it.

Requests are validated strictly before dispatch (unknown fields are errors); the
tests validate responses with the same code. Knows nothing of JSON-RPC or libvirt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from vnicd import errors, names

Spec = dict[str, Any]

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}

_FORMATS: dict[str, tuple[Callable[[str], bool], str]] = {
    "uuid": (names.is_uuid, "not a UUID"),
    "mac": (names.is_mac, "not a MAC address (xx:xx:xx:xx:xx:xx)"),
    "alias": (names.is_alias, "not a device alias (letters, digits, '_', '-')"),
    "ifname": (names.is_ifname, "not a network interface name"),
    "network": (
        lambda v: v == "" or names.is_ifname(v),
        "not a network name (1-15 of letters, digits, '_', '.', '-'; or \"\" to unwire)",
    ),
}


def _engine_bool(text: str, path: str) -> bool:
    """ovirt-engine sends some booleans as Java's String.valueOf: "true" or "false"."""
    if text.lower() not in ("true", "false"):
        raise errors.InvalidParameter(path, f"{text!r} is not a boolean (true or false)")
    return text.lower() == "true"


# type -> how a string is read where the spec says ``lenient: true``
_LENIENT: dict[str, Callable[[str, str], Any]] = {"boolean": _engine_bool}


@dataclass(frozen=True)
class Verb:
    name: str
    description: str
    params: dict[str, Spec]
    result: Spec
    errors: list[str] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def method(self) -> str:
        return self.name.split(".", 1)[1]


class Schema:
    def __init__(self, data: dict[str, Any]) -> None:
        self.types: dict[str, Spec] = data.get("types", {})
        self.errors: dict[str, Spec] = data["errors"]
        self.verbs: dict[str, Verb] = {
            name: Verb(
                name,
                " ".join(str(v.get("description", "")).split()),
                v.get("params") or {},
                v["result"],
                v.get("errors") or [],
            )
            for name, v in data["verbs"].items()
        }

    @classmethod
    def load(cls) -> Schema:
        text = resources.files("vnicd").joinpath("vnicd-api.yml").read_text()
        schema = cls(yaml.safe_load(text))
        schema.check_schema()
        return schema

    def resolve(self, spec: Spec) -> Spec:
        """Expand a named type into its definition, local keys winning. An unknown type
        name is a defect of the schema itself: ValueError."""
        while spec.get("type") in self.types:
            local = {k: v for k, v in spec.items() if k != "type"}
            spec = {**self.types[spec["type"]], **local}
        kind = spec.get("type", "string")
        if kind not in _TYPES and "oneOf" not in spec:
            raise ValueError(f"unknown type {kind!r} in the schema")
        return spec

    def check_schema(self) -> None:
        """Resolve every spec of every verb and type: a schema that names an unknown type
        or nests one is refused when loaded, not when a request happens to reach it."""

        def walk(spec: Spec) -> None:
            spec = self.resolve(spec)
            for sub in spec.get("oneOf", []):
                walk(sub)
            for sub in spec.get("properties", {}).values():
                walk(sub)
            if "items" in spec:
                walk(spec["items"])

        for verb in self.verbs.values():
            for spec in verb.params.values():
                walk(spec)
            walk(verb.result)
        for name in self.types:
            walk({"type": name})

    def validate_params(self, verb: Verb, params: dict[str, Any]) -> None:
        """Raise MissingParameter or InvalidParameter naming the first bad field.

        Lenient values (``lenient: true``) are coerced in place, so the handler sees
        the declared type.
        """
        self._check_fields(verb.params, params, "", None)

    def validate_result(self, verb: Verb, result: Any) -> None:
        """Raise ValueError when a result does not match the schema."""
        try:
            self._check(verb.result, result, "result")
        except errors.RequestError as e:
            raise ValueError(f"{verb.name}: {e}") from e

    def _check(self, spec: Spec, value: Any, path: str) -> Any:
        """The value, checked (and coerced where the spec is lenient)."""
        spec = self.resolve(spec)
        if value is None and spec.get("nullable"):
            return None
        if "oneOf" in spec:
            return self._check_one_of(spec["oneOf"], value, path)
        kind = spec.get("type", "string")
        if spec.get("lenient") and kind in _LENIENT and isinstance(value, str):
            value = _LENIENT[kind](value, path)
        if not _TYPES[kind](value):
            raise errors.InvalidParameter(path, f"expected {kind}, got {type(value).__name__}")
        if "enum" in spec and value not in spec["enum"]:
            raise errors.InvalidParameter(path, f"{value!r} is not one of {spec['enum']}")
        if "format" in spec:
            check, problem = _FORMATS[spec["format"]]
            if not check(value):
                raise errors.InvalidParameter(path, f"{value!r} is {problem}")
        if kind == "object" and "properties" in spec:
            self._check_fields(spec["properties"], value, path + ".", spec.get("anyOf"))
        if kind == "array" and "items" in spec:
            for i, item in enumerate(value):
                value[i] = self._check(spec["items"], item, f"{path}[{i}]")
        return value

    def _check_one_of(self, specs: list[Spec], value: Any, path: str) -> Any:
        problems = []
        for spec in specs:
            try:
                return self._check(spec, value, path)
            except errors.RequestError as e:
                problems.append(e.message)
        raise errors.InvalidParameter(path, "matches none of: " + " | ".join(problems))

    def _check_fields(
        self, fields: dict[str, Spec], value: dict[str, Any], prefix: str, any_of: list[str] | None
    ) -> None:
        for key in value:
            if key not in fields:
                raise errors.InvalidParameter(prefix + key, "unknown field")
        for key, spec in fields.items():
            if key in value:
                value[key] = self._check(spec, value[key], prefix + key)
                for other in spec.get("excludes", []):
                    if other in value:
                        raise errors.InvalidParameter(
                            prefix + key, f"cannot be given together with {prefix + other}"
                        )
            elif spec.get("required"):
                raise errors.MissingParameter(prefix + key)
        if any_of and not any(k in value for k in any_of):
            raise errors.MissingParameter(" or ".join(prefix + k for k in any_of))
