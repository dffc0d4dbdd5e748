import json
import subprocess
import sys

from benchmarks.gpu.summarise import BACKEND_REPORT, collect
from model.backend_report import report_file


def test_the_backend_report_name_is_the_models_own():
    assert BACKEND_REPORT == report_file("cuda")


def test_an_early_failure_still_gives_results_with_the_steps_so_far(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"step": "environment", "status": "failed", "rc": 1, "seconds": 4}\n')
    (tmp_path / "serve.json").write_text('{"offline_images_per_s": ')  # cut off mid-write by a time limit
    results = collect(tmp_path, started=None)
    assert results["steps"] == [{"step": "environment", "status": "failed", "rc": 1, "seconds": 4}]
    assert results["training"] is None and results["api_accuracy"] is None and results["gpu_tests"] is None
    assert "JSONDecodeError" in results["serving"]["error"]
    json.dumps(results)  # what run.sh writes to results.json


def test_gpu_test_counts_come_from_pytests_junit_report(tmp_path):
    (tmp_path / "test_sample.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                             "def test_bad():\n    assert False\n\n"
                                             "@pytest.mark.skip(reason='no GPU')\ndef test_skipped():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                    "-c", "/dev/null", "--junitxml", str(tmp_path / "gpu-tests.xml"), str(tmp_path / "test_sample.py")],
                   cwd=tmp_path, capture_output=True)
    tests = collect(tmp_path, started=None)["gpu_tests"]
    assert (tests["tests"], tests["passed"], tests["failures"], tests["skipped"]) == (3, 1, 1, 1)
    assert tests["failed_tests"] == ["test_sample::test_bad"]
