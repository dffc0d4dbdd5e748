"""Text-format logs keep one record on one line: CR and LF from the client (a request path) are escaped."""

import logging

from app.logging import TextFormatter


def test_a_path_with_cr_lf_cannot_forge_a_text_log_line():
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "request %s", ("x",), None)
    record.path = "/predict\r\n12:00:00.000 INFO    app.access: forged"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert "path=/predict\\r\\n12:00:00.000" in line
