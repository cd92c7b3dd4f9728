"""bench/schemas.py: no answer under the 8 run-on schemas can complete within W1's max_tokens (the shortest
valid answer is longer than max_tokens of the vocabulary's longest token), and xgrammar enforces that."""
import json

import jsonschema
import pytest

from pagedllm.bench.schemas import (COVERS_MAX_TOKENS, LONGEST_TOKEN_BYTES, RUN_ON_SCHEMAS, min_json_bytes,
                                    run_on)
from pagedllm.bench.workloads import build
from pagedllm.structured_output.grammar_spec import build_grammar
from pagedllm.structured_output.params import StructuredOutputsParams as P

xgr = pytest.importorskip("xgrammar")
QWEN3 = "/work/shared/model-configs/Qwen--Qwen3-0.6B"


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(QWEN3)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=151936, stop_token_ids=[tok.eos_token_id])
    return tok, info, xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def test_bound_covers_w1_and_the_qwen3_vocabulary(qwen3):
    _, info, _ = qwen3
    assert max(build("W1").output_lens) <= COVERS_MAX_TOKENS
    assert max(len(b) for b in info.decoded_vocab) <= LONGEST_TOKEN_BYTES


def test_every_schema_is_longer_than_the_budget():
    assert len(RUN_ON_SCHEMAS) == 8
    for schema in RUN_ON_SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        assert min_json_bytes(schema) > COVERS_MAX_TOKENS * LONGEST_TOKEN_BYTES


@pytest.mark.parametrize("schema, shortest", [
    ({"type": "object", "properties": {"a": {"enum": ["xy", 7]}, "b": {"type": "string"}}, "required": ["a", "b"]},
     {"a": 7, "b": ""}),
    ({"type": "array", "items": {"anyOf": [{"type": "null"}, {"type": "integer"}]}, "minItems": 3}, [0, 0, 0]),
    ({"type": "object", "properties": {"k": {"const": "Point"}, "s": {"type": "string", "minLength": 4},
                                       "o": {"type": "boolean"}}, "required": ["k", "s"]}, {"k": "Point", "s": "abcd"}),
    ({"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2}, "minItems": 2},
     [[True, True], [True, True]]),
])
def test_min_json_bytes_is_the_shortest_valid_text(schema, shortest):
    jsonschema.validate(shortest, schema)
    assert min_json_bytes(schema) == len(json.dumps(shortest, separators=(",", ":")))


def test_run_on_minimum_makes_the_shortest_array_too_long():
    items = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    schema = run_on(items)
    shortest = [[0, 0, 0]] * schema["minItems"]
    jsonschema.validate(shortest, schema)
    assert len(json.dumps(shortest, separators=(",", ":"))) > COVERS_MAX_TOKENS * LONGEST_TOKEN_BYTES


def test_xgrammar_refuses_to_close_one_item_short(qwen3):
    """The table schema cut to minItems 600 (the real 16,385 rows take the matcher ~100 s to read): 599 shortest
    rows cannot close, 600 can (then EOS ends it). A count this large is a repetition in xgrammar's grammar."""
    tok, _, compiler = qwen3
    schema = json.loads(json.dumps(RUN_ON_SCHEMAS[2]))
    n = schema["properties"]["rows"]["minItems"] = 600
    compiled = compiler.compile_grammar(build_grammar(P(json=schema)))
    for k, closes in ((n - 1, False), (n, True)):
        doc = json.dumps({"columns": ["a", "b", "c"], "rows": [[0, 0, 0]] * k}, separators=(",", ":"))
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(doc) is closes
        if closes:
            assert matcher.accept_token(tok.eos_token_id)


def test_schemas_compile_fast(qwen3):
    import time
    _, _, compiler = qwen3
    for schema in RUN_ON_SCHEMAS:
        start = time.perf_counter()
        compiler.compile_grammar(build_grammar(P(json=schema)))
        assert time.perf_counter() - start < 2.0   # each ~0.05 s on one shared core
