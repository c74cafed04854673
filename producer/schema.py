"""A job's output_schema: JSON Schema 2020-12 that never reaches outside the job.

Whoever submits a job writes its schema, so a schema may not make a worker fetch anything: its
`$ref`s must point inside the schema (checked at submit), and the validators resolve references
through a registry that retrieves nothing (so a stored job that skipped the check fetches
nothing either)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jsonschema
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
    """The schema is not valid, or reaches outside itself."""


def check_output_schema(schema: dict[str, Any]) -> None:
    """Raise SchemaRefused unless `schema` is valid JSON Schema 2020-12 whose references all
    resolve inside it."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaRefused(f"not a valid JSON Schema: {exc.message}") from None
    root = DRAFT202012.create_resource(schema)
    _check_refs(root, LOCAL_ONLY.resolver_with_root(root))
    try:  # reveals $ref loops that consume nothing (not those only some outputs reach)
        next(output_validator(schema).iter_errors(None), None)
    except RecursionError:
        raise SchemaRefused("its $refs loop without end: a $ref must lead somewhere") from None


def _check_refs(resource: Resource[Any], resolver: Resolver[Any]) -> None:
    contents = resource.contents
    if isinstance(contents, dict):
        for keyword in _REF_KEYWORDS:
            ref = contents.get(keyword)
            if not isinstance(ref, str):
                continue
            if not ref.startswith("#"):
                raise SchemaRefused(
                    f"{keyword} {ref[:200]!r} points outside the schema; workers never fetch "
                    "schemas: put the referenced schema under $defs and refer to it as "
                    '"#/$defs/NAME"'
                )
            try:
                resolver.lookup(ref)
            except Unresolvable:
                raise SchemaRefused(
                    f"{keyword} {ref[:200]!r} points nowhere in the schema"
                ) from None
    for sub in resource.subresources():
        _check_refs(sub, resolver.in_subresource(sub))


def output_validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for the schema that resolves references only inside it."""
    return jsonschema.Draft202012Validator(schema, registry=LOCAL_ONLY)
