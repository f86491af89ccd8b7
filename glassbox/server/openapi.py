"""The served OpenAPI schema (/openapi.json) describes every request body, so clients and fuzzers
(schemathesis, tests/test_fuzz_api.py) can see the API.

Bodies are read by `deps.json_body(Model)` rather than by FastAPI's own body parameters (one JSON reader
that bounds depth and checks strings, one error shape), so FastAPI does not see them: each such dependency
carries its model (`body_model`), and this puts it in the schema as the operation's `requestBody`. Every
operation also documents the one error shape (`ErrorResponse`) for any status it does not list.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from glassbox.server.schemas import ErrorResponse

REF = "#/components/schemas/{model}"


def body_model_of(route: APIRoute) -> type[BaseModel] | None:
    for dependency in route.dependant.dependencies:
        model = getattr(dependency.call, "body_model", None)
        if model is not None:
            return model
    return None


def _add_model(components: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def describe_request_bodies(app: FastAPI, routers: list[APIRouter]) -> None:
    """Replace app.openapi with one that adds the request bodies of the routers' routes (included in the
    app without a prefix of their own) and the error shape (built once)."""
    bodies = {
        (route.path_format, method.lower()): body_model_of(route)
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }

    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if built:
            return built
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error = {"description": "an error: the message names the field or limit at fault", "content": {"application/json": {"schema": _add_model(components, ErrorResponse)}}}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                model = bodies.get((path, method))
                if model is not None:
                    operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _add_model(components, model)}}}
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)  # FastAPI's validation shape: ours answers 400 in ErrorResponse's
                responses["default"] = error
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        built.update(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
