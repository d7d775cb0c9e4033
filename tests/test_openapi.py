"""/openapi.json of both services lists every status each route can return, with OpenAI's body.

In-process: the schema is built from the routes, no model is loaded. The fuzzing in
tests/test_fuzz.py checks the other direction against real servers (every status a server
sends is documented, every body matches its schema).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.student_rollout.app import build_app as build_rollout
from services.student_rollout.settings import RolloutSettings
from services.teacher.app import TeacherSettings
from services.teacher.app import build_app as build_teacher

ERROR_REF = "#/components/schemas/ErrorResponse"
WORK = {"200", "400", "404", "413", "429", "503"}

COMMON: dict[tuple[str, str], set[str]] = {
    ("get", "/health"): {"200"},
    ("get", "/ready"): {"200", "503"},
    ("get", "/metrics"): {"200"},
    ("get", "/info"): {"200", "503"},
    ("get", "/v1/models"): {"200", "503"},
    ("get", "/v1/models/{model_id}"): {"200", "404", "503"},
    ("post", "/v1/completions"): WORK,
    ("post", "/v1/chat/completions"): WORK,
}
TEACHER = {**COMMON, ("post", "/v1/score"): WORK}
ROLLOUT = {
    **COMMON,
    ("post", "/v1/rollouts"): WORK,
    ("get", "/v1/weights"): {"200", "503"},
    ("post", "/v1/weights/load"): {"200", "400", "403", "409", "413", "429", "503"},
    ("put", "/v1/weights"): {"200", "400", "409", "413", "429", "503"},
    ("post", "/v1/weights/broadcast/init"): {"202", "400", "409", "413", "429", "501", "503"},
    ("post", "/v1/weights/broadcast"): {"202", "400", "409", "413", "429", "501", "503"},
    ("get", "/v1/weights/broadcast"): {"200", "400"},
    ("delete", "/v1/weights/broadcast"): {"200", "400", "413", "429", "503"},
}
OPEN = {"/health", "/ready", "/metrics"}


def _schema(service: str, api_key: str | None) -> dict[str, Any]:
    if service == "teacher":
        app = build_teacher(TeacherSettings(model="fake", api_key=api_key))
    else:
        app = build_rollout(RolloutSettings(model="fake", api_key=api_key))
    # Served over HTTP as clients (and schemathesis) read it, behind the key like every route
    # that is not a probe; no lifespan, so no model load.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = TestClient(app).get("/openapi.json", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in schema["paths"].items()
            for method, op in ops.items()}


@pytest.mark.parametrize("service,expected", [("teacher", TEACHER), ("student_rollout", ROLLOUT)])
@pytest.mark.parametrize("api_key", [None, "k"])
def test_every_route_lists_its_error_statuses(service: str, expected: dict, api_key: str | None
                                              ) -> None:
    ops = _operations(_schema(service, api_key))
    assert set(ops) == set(expected)
    for (method, path), statuses in expected.items():
        want = set(statuses)
        if api_key and path not in OPEN:
            want.add("401")
        assert set(ops[method, path]["responses"]) == want, (method, path)


@pytest.mark.parametrize("service", ["teacher", "student_rollout"])
def test_every_error_status_has_the_openai_error_body(service: str) -> None:
    schema = _schema(service, "k")
    for (method, path), op in _operations(schema).items():
        for status, response in op["responses"].items():
            if status.startswith("2"):
                continue
            body = response["content"]["application/json"]["schema"]
            if path == "/ready":
                assert body == {"$ref": "#/components/schemas/NotReadyResponse"}
            else:
                assert body == {"$ref": ERROR_REF}, (method, path, status)
            assert response["description"], (method, path, status)
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"]
    components = schema["components"]["schemas"]
    info = components["ErrorInfo"]
    assert set(info["properties"]) == {"message", "type", "param", "code"}
    assert set(info["required"]) == {"message", "type"}
    assert components["ErrorResponse"]["required"] == ["error"]
    assert components["NotReadyResponse"]["properties"]["status"]["enum"] == [
        "loading", "failed", "broken"]


@pytest.mark.parametrize("service", ["teacher", "student_rollout"])
def test_no_fastapi_422_anywhere(service: str) -> None:
    # Validation errors are answered 400 in OpenAI's shape (services/common/errors.py).
    schema = _schema(service, None)
    for op in _operations(schema).values():
        assert "422" not in op["responses"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ValidationError" not in schema["components"]["schemas"]


def test_streaming_and_upload_content_types_are_documented() -> None:
    teacher = _operations(_schema("teacher", None))
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert set(teacher["post", path]["responses"]["200"]["content"]) == {
            "application/json", "text/event-stream"}
    assert "text/plain" in teacher["get", "/metrics"]["responses"]["200"]["content"]
    rollout = _operations(_schema("student_rollout", None))
    body = rollout["put", "/v1/weights"]["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"application/octet-stream"}
