"""The app's error handlers (every error leaves as an OpenAI error body) and the OpenAPI description of the request
bodies it parses by hand."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jisu.server import protocol as p

logger = logging.getLogger("jisu.server")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.APIError)
    async def api_error(request: Request, e: p.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        loc = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in loc[1:]) or None
        message = f"{param}: {errors[0].get('msg')}" if errors else "invalid request"
        return JSONResponse(p.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(p.error_body(message, kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect):
        # The client hung up while sending its body: nobody reads an answer, and nothing went wrong here.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(p.error_body("internal server error", "server_error"), status_code=500)


def body_schema(model: type[BaseModel]) -> dict:
    # Bodies are parsed by hand (strictly, with a size cap), so FastAPI cannot see them; describe them.
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def register_schemas(app: FastAPI, models) -> None:
    """Puts the request models (and the models they use) into the OpenAPI document's components."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(s.pop("$defs", {}))
                components[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
