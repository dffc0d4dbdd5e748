from collections import Counter

from benchmarks.profile_serving import breakdown, group_of, parse_samples, stage_of

SERVER = "<module> (app/__main__.py:69);Server.run (uvicorn/server.py:86)"
WORKER = "_worker (concurrent/futures/thread.py:83);logits (app/engine/served_model.py:98)"
CONV = "Conv2d.forward (torch/nn/modules/conv.py:565)"
RAW = "\n".join([  # py-spy record --threads --format raw: stack, a space, the number of samples
    f"thread (11): MainThread;{SERVER};json_render (fastapi/encoders.py:1);dumps (json/__init__.py:231) 3",
    f"thread (11): MainThread;{SERVER};on_body (uvicorn/protocols/http/httptools_impl.py:10) 1",
    f"thread (12): inference_0;{WORKER};{CONV} 8",
    f"thread (13): inference_1;{WORKER};{CONV} 2",
    f"thread (13): inference_1;{WORKER};unclassified (app/engine/engine.py:300) 2",
])


def test_a_sample_goes_to_the_stage_of_the_frame_nearest_its_leaf():
    # JSON encoding called from FastAPI inside uvicorn is the JSON answer, not HTTP
    assert stage_of(["Server.run (uvicorn/server.py:86)", "jsonable (fastapi/encoders.py:1)",
                     "dumps (json/__init__.py:231)"]) == "JSON answer"
    assert stage_of(["Server.run (uvicorn/server.py:86)", "on_body (httptools_impl.py:10)"]) == "HTTP and ASGI"
    assert stage_of(["_worker (concurrent/futures/thread.py:83)"]) == "other"


def test_numbered_pool_threads_form_one_group():
    assert group_of("inference_1") == group_of("inference_0") == "inference"
    assert group_of("MainThread") == "MainThread"


def test_py_spys_raw_lines_give_each_thread_its_name_and_stage_counts():
    names, stages = parse_samples(RAW)
    assert names == {11: "MainThread", 12: "inference_0", 13: "inference_1"}
    assert stages[11] == Counter({"JSON answer": 3, "HTTP and ASGI": 1})
    assert stages[13] == Counter({"forward pass": 2, "other": 2})


def test_a_groups_measured_cpu_is_shared_out_by_its_samples():
    names, stages = parse_samples(RAW)
    before = {11: 1.0, 12: 0.0, 13: 0.0, 14: 5.0}
    after = {11: 3.0, 12: 8.0, 13: 8.0, 14: 5.5}  # thread 14 was never sampled: idle, or native only
    rows = {row["group"]: row for row in breakdown(names, stages, before, after, duration=10.0)}
    assert rows["inference"]["threads"] == 2 and rows["inference"]["cpu_cores"] == 1.6
    # 10 of inference's 12 samples were in the forward pass
    assert rows["inference"]["stages_cores"] == {"forward pass": 1.333, "other": 0.267}
    assert rows["MainThread"]["stages_cores"] == {"JSON answer": 0.15, "HTTP and ASGI": 0.05}
    assert rows["not seen by py-spy"]["cpu_cores"] == 0.05 and rows["not seen by py-spy"]["stages_cores"] == {}
    assert list(rows) == ["inference", "MainThread", "not seen by py-spy"]  # most CPU first
