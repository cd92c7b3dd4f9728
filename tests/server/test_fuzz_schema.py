"""Schema-driven fuzzing: schemathesis generates requests from /openapi.json, valid ones (positive) and
invalid ones (negative), a bounded number per operation from a fixed seed. No response may be a 5xx, every
error is in OpenAI's shape (Anthropic's on /v1/messages), and afterwards the server is healthy and its greedy
answer unchanged."""
import json

import httpx
import pytest
from server.server_utils import EDGE_ROOT_PATH, MODEL_NAME, Tally, is_anthropic_error, is_openai_error

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (hypothesis comes with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = 20   # per operation and mode: ~250 requests (the CPU suite's 15-minute budget)
GREEDY = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}


def _greedy(edge) -> str:
    r = httpx.post(edge.url + "/v1/completions", json=GREEDY, headers=edge.headers, verify=edge.verify, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _fuzz(operation, mode, base_url: str, edge, tally: Tally):
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL_NAME   # else almost every request would stop at the 404
        what = f"{operation.label} {mode.value} {str(case.body)[:200]}"
        try:
            r = case.call(base_url=base_url, headers=edge.headers, timeout=30, verify=edge.ca_file or True)
        except Exception as e:   # a timeout or a dropped connection: as bad as a 5xx
            tally.record(599, False, f"{what}: {type(e).__name__}")
            return
        shaped = is_anthropic_error if operation.path.startswith("/v1/messages") else is_openai_error
        tally.record(r.status_code, r.status_code < 400 or shaped(r), what)
    try:
        run()
    except Unsatisfiable:   # an operation without parameters has no invalid request
        pass


def test_schema_fuzz(edge, capsys, tmp_path_factory):
    base_url = edge.url + EDGE_ROOT_PATH
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", verify=edge.ca_file or True)
    before, tally = _greedy(edge), Tally("schemathesis")
    for result in schema.get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, base_url, edge, tally)
    summary = tally.summary()
    (tmp_path_factory.getbasetemp() / "schema_fuzz_summary.json").write_text(json.dumps(summary, indent=1))
    with capsys.disabled():
        print(f"\nFUZZ SUMMARY {json.dumps(summary)}")
    assert summary["requests"] >= 300, summary
    assert summary["5xx"] == 0 and summary["wrongly_shaped"] == 0, summary
    assert httpx.get(edge.url + "/health", verify=edge.verify).status_code == 200
    assert _greedy(edge) == before
