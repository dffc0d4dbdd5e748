"""Schemathesis against the OpenAPI schema of a live server: no generated request may get a 5xx, and every
answer is one the schema documents (status, content type, body, headers).

Driven through Hypothesis directly, one operation at a time, in valid and invalid (negative) modes;
schemathesis's lazy pytest fixture loader does not run under pytest 9. The full run, every check in every
phase with ~2,500 cases, is ``python -m benchmarks.openapi_fuzz``.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.service import ADMIN, live_environment, live_server

pytestmark = pytest.mark.server

EXAMPLES = 10  # per operation and mode: ~20 operations x 2 modes, well under a minute here
# The checks that hold for any request; those that judge whether a request should have been accepted need
# the per-operation statuses of benchmarks/schemathesis.toml, and run there.
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
               response_headers_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory, tiny_checkpoint):
    # With the admin token the training routes are fuzzed too: the jobs that valid bodies start find no data
    # in the empty APP_DATA_DIR and fail at once.
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "no-data").mkdir()
    environment = live_environment(tiny_checkpoint, APP_MAX_UPLOAD_BYTES="200000", APP_STATE_DIR=str(folder / "state"),
                                   APP_DATA_DIR=str(folder / "no-data"))
    with live_server(folder, environment) as server:
        yield server


def test_the_schema_covers_the_api(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    paths = {operation.ok().path for operation in schema.get_all_operations()}
    assert {"/predict", "/predict/batch", "/explain", "/model", "/healthz", "/readyz", "/metrics", "/admin/reload",
            "/v2/models/{model_name}/infer", "/v2/health/ready"} <= paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(fuzzed_server, mode):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        def check(case):
            response = case.call(base_url=fuzzed_server.url, timeout=30, headers=ADMIN)
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{response.status_code} {response.text}\n{case.as_curl_command()}"
            case.validate_response(response, checks=CONFORMANCE, headers=ADMIN)
            assert response.headers.get("x-request-id")  # schemathesis gives each header as a list
            if response.status_code >= 400 and (response.headers.get("content-type") or [""])[0] == "application/json":
                body = response.json()
                assert isinstance(body.get("detail", body.get("error")), str), body

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones
    assert len(statuses) > 100 and max(statuses) < 500
    if mode is GenerationMode.NEGATIVE:
        assert {400, 415, 422} & set(statuses), "invalid requests were not refused as invalid"
