"""benchmarks/serve_protocols.py's four ways in each get good answers from a real server (an encoding the
server refused would show as errors, not as requests/s), and the JSON it writes holds the table."""

import json

import pytest

from benchmarks.serve_protocols import WAYS, main


@pytest.mark.server
def test_every_way_in_is_answered_without_errors(tmp_path, tiny_checkpoint):
    output = tmp_path / "serve_protocols.json"
    main(["--duration", "0.5", "--warmup", "0.2", "--concurrency", "2", "--weights", str(tiny_checkpoint),
          "--output", str(output)])
    result = json.loads(output.read_text())
    assert set(result["cells"]) == set(WAYS)
    for way, [level] in result["cells"].items():
        assert level["concurrency"] == 2 and level["requests"] > 0 and level["error_count"] == 0, (way, level)
        assert f"| {way} | 2 |" in result["table"]
    assert result["model"]["architecture"] == "resnet18"
