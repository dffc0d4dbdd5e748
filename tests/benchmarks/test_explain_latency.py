from benchmarks.explain_latency import ENDPOINTS, summarise


def test_the_summary_is_in_milliseconds_with_numpys_percentiles():
    summary = summarise([0.001 * n for n in range(1, 101)])  # 1 ms ... 100 ms
    assert summary == {"requests": 100, "p50_ms": 50.5, "p99_ms": 99.01, "mean_ms": 50.5, "max_ms": 100.0}


def test_it_measures_predict_and_both_forms_of_explain():
    assert ENDPOINTS == {"predict": "/predict", "explain_png": "/explain", "explain_json": "/explain?format=json"}
