"""``python -m app``'s own messages: bad and unknown settings, a taken port, a background task that dies."""

from __future__ import annotations

import logging
import socket

import httpx
import pytest

from app import __main__ as entry_point
from app.config import SettingsError, load_settings, unknown_variables
from app.logging import JsonFormatter, TextFormatter, configure_logging, use_text
from tests.support.service import live_environment, live_server
from tests.support.waiting import wait_until


def test_a_bad_setting_is_one_line_naming_the_variable_and_what_it_is(monkeypatch, capsys):
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "abc")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith("APP_MAX_BATCH_SIZE='abc': ")
    assert "valid integer" in message and "most images in one forward pass" in message and "(unset: 0)" in message
    with pytest.raises(SystemExit) as exit_:
        entry_point.main([])
    assert exit_.value.code == f"error: {message}" and "Traceback" not in capsys.readouterr().err


def test_a_bad_admin_token_is_never_echoed(monkeypatch):
    monkeypatch.setenv("APP_ADMIN_TOKEN", "hunter2-short")
    monkeypatch.setenv("APP_DEVICE", "gpu")
    with pytest.raises(SettingsError) as error:
        load_settings()
    lines = str(error.value).splitlines()
    assert len(lines) == 2 and any(line.startswith("APP_DEVICE='gpu'") for line in lines)
    assert "hunter2" not in str(error.value)


def test_an_unknown_app_variable_is_a_warning_with_a_guess():
    environ = {"APP_MAX_BACH_SIZE": "8", "APP_DEVICE": "cpu", "APP_ZZZ": "1", "HOME": "/root"}
    assert unknown_variables(environ) == [
        "APP_MAX_BACH_SIZE is not a setting and is ignored; did you mean APP_MAX_BATCH_SIZE?",
        "APP_ZZZ is not a setting and is ignored; docs/service.md lists the settings",
    ]


def test_a_taken_port_says_use_port():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        problem = entry_point.port_problem("127.0.0.1", port)
    assert problem is not None and "already in use" in problem and "--port" in problem
    assert entry_point.port_problem("127.0.0.1", port) is None


class Terminal:
    def isatty(self) -> bool:
        return True


def test_logs_are_text_on_a_terminal_and_json_otherwise_or_on_request():
    assert use_text("auto", Terminal()) and not use_text("auto", object())
    assert use_text("text", object()) and not use_text("json", Terminal())
    record = logging.LogRecord("app.factory", logging.INFO, "", 0, "serving %s", ("resnet18-abc",), None)
    record.origin = "APP_WEIGHTS"
    text = TextFormatter().format(record)
    assert text.endswith("INFO    app.factory: serving resnet18-abc   origin=APP_WEIGHTS")
    assert '"message": "serving resnet18-abc"' in JsonFormatter().format(record)
    configure_logging("info", "json")
    assert isinstance(logging.getLogger("app").handlers[0].formatter, JsonFormatter)


@pytest.mark.server
def test_an_unreadable_registry_never_stops_python_m_app(tmp_path, tiny_checkpoint):
    # Before issue 22 the registry follower SIGTERMed its own process here: on a shared volume every replica
    # stopped together. Now the error is logged once, reported, and retried (tests/app/control/test_follower.py).
    environment = live_environment(tiny_checkpoint, APP_REGISTRY_POLL_S="0.1", APP_LOG_FORMAT="text",
                                   APP_RUN_JOBS="false")
    with live_server(tmp_path, environment) as server:
        (tmp_path / "state" / "registry" / "current").mkdir()  # the pointer becomes unreadable
        wait_until(lambda: "EISDIR" in server.log.read_text(), what="the error to be logged")
        wait_until(lambda: httpx.get(f"{server.url}/readyz").json()["registry_error"], what="it to be reported")
        assert server.process.poll() is None
        log = server.log.read_text()
    assert log.count("could not be read (EISDIR") == 1, log  # once, not at every retry
    assert "CRITICAL" not in log


def test_a_list_setting_that_is_not_json_is_one_line_too(monkeypatch):
    monkeypatch.setenv("APP_RELOAD_ROOTS", "/models")
    with pytest.raises(SettingsError, match=r'^APP_RELOAD_ROOTS must be a JSON list, such as \["/models"\]$'):
        load_settings()
