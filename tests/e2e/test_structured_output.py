"""Structured output end to end, offline: the corpus (tests/structured_output_schemas.py) x 5 seeds at
temperature 1.0, in ONE batched generate per model (the demo model and a tiny random one), with unconstrained
greedy requests in the same batch.

Every output that ends with "stop" must parse and validate (jsonschema), full-match its regex, be one of its
choices, or parse by its grammar (a Lark one by Lark itself); and enough of them must end with "stop" for that to
mean something. An output that reaches max_tokens ("length") may be cut short and is not checked."""
import json
import re

import jsonschema
import pytest

from conftest import make_tiny_model
from pagedllm import LLM, SamplingParams
from structured_output_schemas import CHECKERS, CHOICES, GRAMMARS, LARK_GRAMMARS, REGEXES, SCHEMAS, lark_accepts

SEEDS = range(5)
MAX_TOKENS = 128
MIN_STOP_FRACTION = 0.8   # of constrained requests; measured: demo 240/260, tiny random 259/260
FREE_PROMPTS = ["Once upon a time", "The little dog", "Tom and Lily went"]
PROMPT = "Here is the answer:"
ANY_WHITESPACE = ("string", "enum_mixed", "flat_object", "array_bounds", "one_of")


def _cases() -> list[tuple[str, dict, object]]:
    """(name, structured_outputs, check(text) -> bool). JSON without any whitespace between tokens: the demo model,
    trained on stories, fills any room for whitespace with newlines until max_tokens (as small real models do:
    vLLM's reason for disable_any_whitespace); a few schemas also run with any whitespace."""
    cases = [(f"json:{name}", {"json": schema, "disable_any_whitespace": True}, _json_checker(schema, compact=True))
             for name, schema in SCHEMAS.items()]
    cases += [(f"json_any_ws:{name}", {"json": SCHEMAS[name]}, _json_checker(SCHEMAS[name]))
              for name in ANY_WHITESPACE]
    cases.append(("json_object", {"json_object": True}, lambda t: isinstance(json.loads(t), dict)))
    cases += [(f"regex:{name}", {"regex": rx}, lambda t, rx=rx: re.fullmatch(rx, t) is not None)
              for name, rx in REGEXES.items()]
    cases += [(f"choice:{name}", {"choice": c}, lambda t, c=c: t in c) for name, c in CHOICES.items()]
    cases += [(f"grammar:{name}", {"grammar": g}, CHECKERS[name]) for name, g in GRAMMARS.items()]
    cases += [(f"lark:{name}", {"grammar": g}, lambda t, g=g: lark_accepts(g, t)) for name, g in LARK_GRAMMARS.items()]
    return cases


def _json_checker(schema: dict, compact: bool = False):
    def check(text: str) -> bool:
        jsonschema.validate(json.loads(text), schema)   # formats are not checked (jsonschema's default)
        return not compact or not re.search(r"[\n\t\r]", text)   # raw ones: only whitespace (JSON escapes them)
    return check


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(log_stats_interval=0, device="cpu")


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny_so"), arch="llama", seed=7)
    return LLM(path, log_stats_interval=0, device="cpu")


@pytest.mark.parametrize("which", ["demo_llm", "tiny_llm"])
def test_corpus_outputs_follow_their_constraints(which, request):
    llm: LLM = request.getfixturevalue(which)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.generate(FREE_PROMPTS, greedy, use_tqdm=False)]

    cases = _cases()
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, structured_outputs=constraint)
              for _, constraint, _ in cases for seed in SEEDS]
    prompts = [PROMPT] * len(params)
    # The unconstrained rows sit among the constrained ones: the masks must touch only their own rows.
    outputs = llm.generate(FREE_PROMPTS[:1] + prompts[:len(prompts) // 2] + FREE_PROMPTS[1:]
                           + prompts[len(prompts) // 2:],
                           [greedy] + params[:len(params) // 2] + [greedy] * 2 + params[len(params) // 2:],
                           use_tqdm=False)
    half = len(params) // 2
    free = [outputs[0]] + outputs[1 + half:3 + half]
    constrained = outputs[1:1 + half] + outputs[3 + half:]
    assert [o.outputs[0].token_ids for o in free] == alone

    bad, stops, lengths = [], 0, {}
    for i, out in enumerate(constrained):
        name, _, check = cases[i // len(SEEDS)]
        c = out.outputs[0]
        assert c.finish_reason in ("stop", "length"), (name, c.finish_reason)
        if c.finish_reason == "length":
            lengths[name] = lengths.get(name, 0) + 1
            continue
        stops += 1
        try:
            ok = check(c.text)
        except (ValueError, jsonschema.ValidationError):
            ok = False
        if not ok:
            bad.append((name, c.text))
    summary = f"{which}: {stops}/{len(constrained)} ended with stop; length by case: {lengths}"
    print(summary)
    assert not bad, f"{len(bad)} stopped outputs break their constraint, e.g. {bad[:5]} ({summary})"
    assert stops >= MIN_STOP_FRACTION * len(constrained), summary
