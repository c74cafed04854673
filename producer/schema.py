"""A job's output_schema: JSON Schema 2020-12 that never reaches outside the job and never
makes validation take unbounded time.

Whoever submits a job writes its schema, and a prompt-injected model writes the output that is
validated against it. So a schema may not make a worker fetch anything: its `$ref`s must point
inside the schema (checked at submit), and validators resolve references through a registry
that retrieves nothing. And its regular expressions (`pattern`, `patternProperties`) run on RE2,
whose matching time is linear in the text: a backtracking pattern such as `^(a+)+$` cannot stall
a worker. Patterns RE2 cannot run (lookarounds, backreferences) are refused at submit."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import jsonschema
import re2
from jsonschema import validators
from jsonschema._utils import extras_msg
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable
from referencing.jsonschema import DRAFT202012

if TYPE_CHECKING:
    from referencing._core import Resolver  # not exported; only its type is named here

_REF_KEYWORDS = ("$ref", "$dynamicRef")


def _retrieve_nothing(uri: str) -> Resource[Any]:
    raise NoSuchResource(uri)


LOCAL_ONLY: Registry[Any] = Registry(retrieve=_retrieve_nothing)  # type: ignore[call-arg]
"""A registry that holds no schema and retrieves none: only references inside the schema
being validated resolve."""


class SchemaRefused(ValueError):
    """The schema is not valid, reaches outside itself, or has a pattern RE2 cannot run."""


# -- regular expressions on RE2 --------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the submitter, not to stderr
_RE2_OPTIONS.max_mem = 1 << 20  # per pattern; a larger program is refused as too large


@functools.lru_cache(maxsize=128)
def regex(pattern: str) -> Any:
    """The compiled RE2 pattern (re2.error when RE2 cannot run it)."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not regex(patrn).search(instance):
        yield ValidationError(f"{instance!r:.200} does not match {patrn!r:.200}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in patterns.items():
        for k, v in instance.items():
            if regex(patrn).search(k):
                yield from validator.descend(v, subschema, path=k, schema_path=patrn)


def _additional_properties(
    validator: Any, ap: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """jsonschema's own, with patternProperties matched by RE2."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = [regex(p) for p in schema.get("patternProperties", {})]
    extras = {k for k in instance if k not in properties and not any(p.search(k) for p in patterns)}
    if validator.is_type(ap, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], ap, path=extra)
    elif not ap and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            listed = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            error = "Additional properties are not allowed (%s %s unexpected)"
            yield ValidationError(error % extras_msg(sorted(extras, key=str)))


def _canonical(value: Any) -> Any:
    """A hashable form in which two JSON values are equal exactly when JSON Schema says so
    (1 == 1.0, true != 1, object key order does not matter)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    return ("other", repr(value))


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """jsonschema's own compares every pair of objects (minutes for a long reply): hashing."""
    if unique and validator.is_type(instance, "array"):
        seen: set[Any] = set()
        for item in instance:
            key = _canonical(item)
            if key in seen:
                yield ValidationError(f"{instance!r:.200} has non-unique elements")
                return
            seen.add(key)


class BudgetSpent(Exception):
    """Validating one output took longer than its budget."""


_deadline: ContextVar[float] = ContextVar("agentq_schema_deadline", default=math.inf)


def _metered(keyword: Callable[..., Any]) -> Callable[..., Any]:
    """A keyword that first checks the validation's deadline: JSON Schema validation costs
    up to the schema's size times the output's, and both come from outside."""

    def metered(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > _deadline.get():
            raise BudgetSpent
        return keyword(validator, value, instance, schema)

    return metered


_Validator = validators.extend(
    jsonschema.Draft202012Validator,
    validators={
        name: _metered(keyword)
        for name, keyword in {
            **jsonschema.Draft202012Validator.VALIDATORS,
            "pattern": _pattern,
            "patternProperties": _pattern_properties,
            "additionalProperties": _additional_properties,
            "uniqueItems": _unique_items,
        }.items()
    },
)

VALIDATION_BUDGET_S = 1.0
"""Most time one output's validation may take (it runs on the worker's event loop)."""


def output_errors(
    validator: Any, value: Any, budget_s: float = VALIDATION_BUDGET_S
) -> list[ValidationError]:
    """The output's errors, first by path; raises BudgetSpent past `budget_s`."""
    token = _deadline.set(time.monotonic() + budget_s)
    try:
        return sorted(validator.iter_errors(value), key=lambda e: list(e.path))
    finally:
        _deadline.reset(token)


# -- the submit-time check -------------------------------------------------------------------


def check_output_schema(schema: dict[str, Any]) -> None:
    """Raise SchemaRefused unless `schema` is valid JSON Schema 2020-12 whose references all
    resolve inside it and whose patterns RE2 runs."""
    try:
        _check(schema)
    except RecursionError:  # a schema built in Python, never a (depth-checked) line
        raise SchemaRefused("the schema nests too deep, or its $refs loop without end") from None


def _check(schema: dict[str, Any]) -> None:
    try:  # patterns are checked below, by the engine that runs them (not Python's re)
        jsonschema.Draft202012Validator.check_schema(schema, format_checker=None)
    except jsonschema.SchemaError as exc:
        raise SchemaRefused(f"not a valid JSON Schema: {exc.message}") from None
    root = DRAFT202012.create_resource(schema)
    keywords: set[str] = set()
    for resource, resolver in _subschemas(root, LOCAL_ONLY.resolver_with_root(root)):
        contents = resource.contents
        if not isinstance(contents, dict):
            continue
        keywords.update(contents)
        if resource is not root and "$schema" in contents:
            raise SchemaRefused("$schema is allowed only at the top: the schema is 2020-12")
        for keyword in _REF_KEYWORDS:
            if isinstance(ref := contents.get(keyword), str):
                _check_ref(keyword, ref, resolver)
        if isinstance(p := contents.get("pattern"), str):
            _check_pattern(p)
        for p in contents.get("patternProperties") or {}:
            _check_pattern(p)
    if "unevaluatedProperties" in keywords and "patternProperties" in keywords:
        raise SchemaRefused(
            "unevaluatedProperties together with patternProperties is not supported (its "
            "patterns would run on a backtracking engine): use additionalProperties"
        )
    if "$schema" in schema and jsonschema.validators.validator_for(schema, default=None) is not (
        jsonschema.Draft202012Validator
    ):
        raise SchemaRefused(
            f"$schema {str(schema['$schema'])[:200]!r}: output schemas are JSON Schema 2020-12; "
            "leave $schema out"
        )
    # reveals $ref loops that consume nothing (not those only some outputs reach)
    next(output_validator(schema).iter_errors(None), None)


def _subschemas(
    resource: Resource[Any], resolver: Resolver[Any]
) -> Iterator[tuple[Resource[Any], Resolver[Any]]]:
    yield resource, resolver
    for sub in resource.subresources():
        yield from _subschemas(sub, resolver.in_subresource(sub))


def _check_ref(keyword: str, ref: str, resolver: Resolver[Any]) -> None:
    if not ref.startswith("#"):
        raise SchemaRefused(
            f"{keyword} {ref[:200]!r} points outside the schema; workers never fetch "
            'schemas: put the referenced schema under $defs and refer to it as "#/$defs/NAME"'
        )
    try:
        resolver.lookup(ref)
    except Unresolvable:
        raise SchemaRefused(f"{keyword} {ref[:200]!r} points nowhere in the schema") from None


def _check_pattern(p: str) -> None:
    try:
        regex(p)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise SchemaRefused(
            f"pattern {p[:200]!r} cannot run on the linear-time matcher (RE2: {reason}): "
            "lookarounds and backreferences are not supported, rewrite it without them"
        ) from None


def output_validator(schema: dict[str, Any]) -> Any:
    """A validator for the schema that resolves references only inside it and runs patterns
    on RE2. A top-level $schema is dropped: it would hand the subschemas that $ref the top to
    jsonschema's own validator (Python's backtracking re)."""
    body = {k: v for k, v in schema.items() if k != "$schema"}
    return _Validator(body, registry=LOCAL_ONLY)
