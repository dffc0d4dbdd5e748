"""The OpenAPI document, made to match what the service answers (schemathesis checks it: docs/service.md).

FastAPI's own document promises things the service does not do, and leaves out things it does. On top of
what the routes declare, ``document`` writes:

- every error's body as it is: ``{"detail": str}`` (``ErrorResponse``), or ``{"error": str}``
  (``ErrorObject``) under ``/v2/``, for 422 too, where FastAPI documents its own list of problems;
- 401, 403 and 413 on every route behind the admin token (``AdminGate`` answers them before the route runs);
- the classes ``/explain?class=`` takes (CIFAR-10's labels, which every served model has; anything else is a
  400), so a fuzzer's empty or made-up class is not "valid data the service refused";
- the limits that come from settings: the most files of a ``/predict/batch``, and ``APP_MODEL_NAME`` as the
  one v2 model name when it is configured.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.api.schemas import ErrorResponse
from app.config import Settings
from model.labels import CLASS_NAMES

ERROR_BODY = {"$ref": "#/components/schemas/ErrorResponse"}
V2_ERROR_BODY = {"$ref": "#/components/schemas/ErrorObject"}
ADMIN_ERRORS = {
    "401": "no Bearer token",
    "403": "a wrong token, or the admin routes are disabled (no APP_ADMIN_TOKEN)",
    "413": "a body over APP_MAX_JSON_BYTES",
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    built = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(built(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorResponse", ErrorResponse.model_json_schema())
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            _errors(path, operation)
            _settings_limits(path, operation, settings)
    # Referenced by nothing now: the 422s above are this service's own body.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return schema


def _errors(path: str, operation: dict[str, Any]) -> None:
    responses = operation["responses"]
    if "security" in operation:
        for status, description in ADMIN_ERRORS.items():
            responses.setdefault(status, {"description": description})
    if "application/json" in operation.get("requestBody", {}).get("content", {}):
        responses.setdefault("400", {"description": "the body is not JSON"})
    body = V2_ERROR_BODY if path.startswith("/v2/") else ERROR_BODY
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": body}}


def _settings_limits(path: str, operation: dict[str, Any], settings: Settings) -> None:
    if path == "/predict/batch":
        files = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
        files["maxItems"] = settings.max_batch_files
    if path == "/explain":
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "class":
                parameter["schema"] = {"type": "string", "enum": list(CLASS_NAMES)}
    if settings.model_name is not None:
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "model_name":
                parameter["schema"] = {"type": "string", "enum": [settings.model_name]}
