import json
import logging

import pytest
from fastapi import APIRouter

from tests.support import images

pytestmark = pytest.mark.anyio


async def test_a_request_id_is_made_when_the_client_sends_none(client):
    first, second = (await client.get("/healthz")).headers, (await client.get("/healthz")).headers
    assert len(first["x-request-id"]) == 32 and first["x-request-id"] != second["x-request-id"]


@pytest.mark.parametrize("sent", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace.42:span_7"])
async def test_a_sane_client_request_id_is_echoed(client, sent):
    response = await client.post("/predict", content=images.TEXT, headers={"x-request-id": sent,
                                                                           "content-type": "image/png"})
    assert response.status_code == 415 and response.headers["x-request-id"] == sent


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "line\tbreak"])
async def test_an_unsafe_client_request_id_is_replaced(client, sent):
    response = await client.get("/healthz", headers={"x-request-id": sent})
    assert response.headers["x-request-id"] != sent and len(response.headers["x-request-id"]) == 32


async def test_log_lines_are_json_and_name_the_request(client, caplog):
    from app.logging import JsonFormatter

    with caplog.at_level(logging.INFO, logger="app.access"):
        logging.getLogger("app.access").addHandler(caplog.handler)
        try:
            await client.post("/predict", content=images.png(), headers={"x-request-id": "log-me-1",
                                                                        "content-type": "image/png"})
        finally:
            logging.getLogger("app.access").removeHandler(caplog.handler)
    records = [r for r in caplog.records if getattr(r, "route", None) == "/predict"]
    assert records, "no access-log line for the request"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "log-me-1" and line["status"] == 200 and line["method"] == "POST"
    assert line["message"] == "request" and line["ms"] > 0


async def test_an_unexpected_error_is_a_plain_json_500_with_the_request_id(service):
    router = APIRouter()

    @router.get("/test-only/boom")
    async def boom() -> None:
        raise ZeroDivisionError("secret internals")

    service.app.include_router(router)
    response = await service.client.get("/test-only/boom", headers={"x-request-id": "boom-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert response.json() == {"detail": "internal error; it has been logged under request ID boom-1"}
    assert (await service.client.get("/healthz")).status_code == 200
