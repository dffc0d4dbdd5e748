"""The OpenAPI document says what the service answers (app/api/openapi.py); schemathesis checks the whole of
it against a live server in tests/app/test_openapi_fuzz.py and benchmarks/openapi_fuzz.py."""

import pytest

from tests.support.service import ADMIN_TOKEN, running_app, service_settings

pytestmark = pytest.mark.anyio


async def openapi(client) -> dict:
    return (await client.get("/openapi.json")).json()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


async def test_every_error_is_documented_with_the_body_the_service_sends(client):
    document = await openapi(client)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                body = "ErrorObject" if path.startswith("/v2/") else "ErrorResponse"
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{body}"}, (method, path, status)
    assert document["components"]["schemas"]["ErrorResponse"]["properties"]["detail"]["type"] == "string"


async def test_a_validation_error_is_the_documented_detail_string(client):
    response = await client.post("/predict?top_k=99", content=b"x", headers={"content-type": "image/png"})
    assert response.status_code == 422 and isinstance(response.json()["detail"], str)


async def test_the_admin_routes_document_their_refusals(client):
    for path, method, operation in operations(await openapi(client)):
        if path.startswith(("/admin", "/train")):
            assert {"401", "403", "413"} <= set(operation["responses"]), (method, path)
        if "requestBody" in operation and "application/json" in operation["requestBody"]["content"]:
            assert "400" in operation["responses"], (method, path)


async def test_the_schema_carries_the_limits(service):
    document = await openapi(service.client)
    batch = document["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    files = batch["properties"]["files"]
    assert files["minItems"] == 1 and files["maxItems"] == service.app.state.settings.max_batch_files
    assert files["items"]["minLength"] == 1
    top_k = next(p for p in document["paths"]["/predict"]["post"]["parameters"] if p["name"] == "top_k")
    assert (top_k["schema"]["minimum"], top_k["schema"]["maximum"]) == (1, 10)
    train = document["components"]["schemas"]["TrainParams"]["properties"]
    assert "fastcnn" in train["arch"]["enum"]
    infer = document["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    tensor = infer["schema"]["properties"]["inputs"]["items"]["properties"]
    assert tensor["datatype"]["enum"] == ["UINT8", "FP32"]
    assert (tensor["shape"]["minItems"], tensor["shape"]["maxItems"]) == (4, 4)
    response = await service.client.post("/v2/models/resnet18/infer", json=infer["example"])
    assert response.status_code == 200, "the documented example is a request that works"


async def test_a_configured_model_name_is_the_only_one_documented(tiny_checkpoint):
    async with running_app(service_settings(tiny_checkpoint, model_name="cifar10"), wait_ready=False) as (_, client):
        for path, _, operation in operations(await openapi(client)):
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model_name":
                    assert parameter["schema"]["enum"] == ["cifar10"], path


async def test_a_wrong_method_allows_every_method_of_the_path(client):
    response = await client.request("PATCH", "/train", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}
