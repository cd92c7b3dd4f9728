"""A kept token waits in its RequestGrammar until the next bitmask fill: the bitmasks are
those of a matcher that took every token at once (xgrammar's own, the reference), a stop token is taken at once
so the scheduler sees the grammar's end, and a refused token fails the request's next accept. On the engine, a
constrained step's sampling launch that raises ends that step's requests with an error, and the engine goes on."""
from concurrent.futures import Future

import pytest
import torch
import xgrammar as xgr
from conftest import raising_at_call

from pagedllm import LLM, SamplingParams
from pagedllm.structured_output.manager import RequestGrammar, StructuredOutputManager

VOCAB = ["<eos>", "{", "}", '"', "a", "b", ":", ",", " ", "ab", '{"a": "', '"}', "x", "[THINK]", "[/THINK]"]
EOS = 0
SCHEMA = '{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}'


@pytest.fixture(scope="module")
def compiled():
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(SCHEMA, any_whitespace=False)


def _grammar(compiled) -> RequestGrammar:
    future = Future()
    future.set_result(compiled)
    g = RequestGrammar(future, "json", 30.0)
    assert g.poll()
    return g


def _manager() -> StructuredOutputManager:
    return StructuredOutputManager(pool=None, vocab_size=len(VOCAB), max_num_seqs=2, device=torch.device("cpu"))


def test_deferred_accepts_give_the_bitmasks_of_immediate_ones(compiled):
    manager, g, ref = _manager(), _grammar(compiled), xgr.GrammarMatcher(compiled)
    expected = xgr.allocate_token_bitmask(1, len(VOCAB))
    for token in [VOCAB.index(t) for t in ['{"a": "', "ab", "b", " ", "a", '"}']]:
        assert g.accept(token) and not g.terminated
        assert g.pending == [token]   # not taken yet: the fill takes it
        assert ref.accept_token(token)
        mask = manager.fill_bitmask([(1, g)])
        ref.fill_next_token_bitmask(expected)
        assert g.pending == [] and torch.equal(mask[1], expected[0])
    assert g.accept(EOS) and g.terminated and ref.accept_token(EOS) and ref.is_terminated()


def test_a_fill_that_allows_no_token_marks_the_grammar_dead():
    """A regex whose language ends in nothing: its fill allows "a" first (alive), and after "a" no token at all,
    not even the stop token (dead: what the row samples then is noise the scheduler drops). A live row beside
    it in the same fill stays alive."""
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS]), max_threads=1)
    g, other = (_grammar(compiler.compile_regex(rx)) for rx in (r"a[^\s\S]", "a+"))
    manager = _manager()
    manager.fill_bitmask([(0, g), (1, other)])
    assert not g.dead and not other.dead
    assert g.accept(VOCAB.index("a")) and other.accept(VOCAB.index("a"))
    mask = manager.fill_bitmask([(1, g), (0, other)])
    assert g.dead and not mask[1].any() and not other.dead and mask[0].any()


def test_batch_fill_of_many_rows_matches_each_matcher_alone(compiled):
    """One batch accept and one batch fill for every row: each row, sampled in any order, equals its own
    matcher's reference bitmask, at every step."""
    n = 11
    manager = StructuredOutputManager(pool=None, vocab_size=len(VOCAB), max_num_seqs=n, device=torch.device("cpu"))
    grammars, refs = [_grammar(compiled) for _ in range(n)], [xgr.GrammarMatcher(compiled) for _ in range(n)]
    order = [7, 2, 10, 0, 5, 9, 1, 3, 8, 6, 4]   # sampled row of each grammar
    texts = [['{"a": "', "ab", "b", '"}'], ['{"a": "', '"}'], ['{"a": "', "a", " "]]
    expected = xgr.allocate_token_bitmask(1, len(VOCAB))
    for step in range(4):
        for i, (g, ref) in enumerate(zip(grammars, refs)):
            text = texts[i % len(texts)]
            if step < len(text):
                token = VOCAB.index(text[step])
                assert g.accept(token) and ref.accept_token(token)
        mask = manager.fill_bitmask(list(zip(order, grammars)))
        for row, ref in zip(order, refs):
            ref.fill_next_token_bitmask(expected)
            assert torch.equal(mask[row], expected[0]), (step, row)


def test_a_stop_token_is_taken_at_once_after_the_pending_ones(compiled):
    g = _grammar(compiled)
    for t in ['{"a": "', "ab"]:
        assert g.accept(VOCAB.index(t))
    assert g.accept(EOS) is False and g.rejected == EOS   # the string is open: xgrammar refuses the end
    g = _grammar(compiled)
    for t in ['{"a": "', "ab", '"}']:
        assert g.accept(VOCAB.index(t))
    assert g.accept(EOS) and g.terminated and g.pending == []


def test_a_refused_token_fails_the_next_accept(compiled):
    g = _grammar(compiled)
    assert g.accept(VOCAB.index("x"))   # refused only when the fill takes it
    _manager().fill_bitmask([(0, g)])
    assert g.rejected == VOCAB.index("x")
    assert g.accept(VOCAB.index("{")) is False


@pytest.mark.parametrize("xgrammar_core", ["present", "absent"])
def test_the_batch_accept_of_single_tokens_equals_the_per_token_flush(compiled, monkeypatch, xgrammar_core):
    """The fill takes rows with one kept token in one batch accept, the others one token at a time: rows, pending
    tokens and rejections as RequestGrammar.flush alone leaves them, for two steps. The batch call sits below
    xgrammar's public API: without it (another release's layout) the fill flushes row by row."""
    if xgrammar_core == "absent":
        import xgrammar.base
        monkeypatch.delattr(xgrammar.base, "_core")
    steps = [   # the kept tokens of each row, per step
        [["{"], ['{"a": "'], ["x"], ['{"a": "', "ab"], ["{", "x"], [], ["x", "{"], ['{"a": "']],
        [['"'], ["a"], ["{"], ['"}'], ["a"], ['{"a": "'], ["b"], ['{"a": "']],
    ]
    n = len(steps[0])
    manager = StructuredOutputManager(pool=None, vocab_size=len(VOCAB), max_num_seqs=n, device=torch.device("cpu"))
    batched, alone = [_grammar(compiled) for _ in range(n)], [_grammar(compiled) for _ in range(n)]
    expected = xgr.allocate_token_bitmask(1, len(VOCAB))
    for step, kept in enumerate(steps):
        for b, a, texts in zip(batched, alone, kept):
            for t in texts:
                assert b.accept(VOCAB.index(t)) == a.accept(VOCAB.index(t))
        mask = manager.fill_bitmask(list(enumerate(batched)))
        for row, (b, a) in enumerate(zip(batched, alone)):
            a.flush()
            assert (b.rejected, b.pending, b.terminated) == (a.rejected, a.pending, a.terminated), (step, row)
            a.matcher.fill_next_token_bitmask(expected)
            assert torch.equal(mask[row], expected[0]), (step, row)
    x, opening = VOCAB.index("x"), VOCAB.index('{"a": "')   # the quote ends the string, then "a" is refused
    assert [g.rejected for g in batched] == [None, None, x, None, x, None, x, opening]


def _allowed(manager, g) -> set[str]:
    mask = manager.fill_bitmask([(0, g)])[0]
    return {t for i, t in enumerate(VOCAB) if (int(mask[i // 32]) >> (i % 32)) & 1}


@pytest.mark.parametrize("first", ["[THINK]", '{"a": "'])
def test_the_first_token_is_the_reasoning_start_or_the_grammars(compiled, first):
    """The mistral rule where the prompt holds no [THINK] (reasoning_first_token_decides): the first token's
    bitmask allows [THINK] and what the grammar allows, nothing else; [THINK] keeps the constraint waiting for
    [/THINK], any other first token is the grammar's own (vLLM leaves the first token free and starts its
    grammar after it, so its answer may open with a token the constraint refuses: not taken)."""
    think, end = VOCAB.index("[THINK]"), VOCAB.index("[/THINK]")
    future = Future()
    future.set_result(compiled)
    g, manager = RequestGrammar(future, "json", 30.0, waits_for=end, opens_with=think), _manager()
    assert g.poll() and g.masks
    assert _allowed(manager, g) == {"[THINK]", "{", '{"a": "'}
    assert g.accept(VOCAB.index(first))
    if first == "[THINK]":
        assert g.pending == []
        for token in ("x", "{", "[THINK]"):   # reasoning, free
            assert g.accept(VOCAB.index(token)) and not g.masks and g.pending == []
        assert g.accept(end) and g.masks   # the grammar starts here, at its beginning
        assert _allowed(manager, g) == {"{", '{"a": "'}
        assert g.accept(VOCAB.index('{"a": "'))
    assert g.masks and _allowed(manager, g) >= {"ab", '"'}   # inside the string
    for t in ["ab", '"}']:
        assert g.accept(VOCAB.index(t))
    assert _allowed(manager, g) == {"<eos>"}   # [THINK] was the first token's choice only
    assert g.accept(EOS) and g.terminated and g.rejected is None


def test_a_constrained_sampling_failure_ends_that_steps_requests():
    llm = LLM(dtype="float32", log_stats_interval=0)
    core = llm.engine.core
    sample = core.runner.sample_constrained
    core.runner.sample_constrained = raising_at_call(sample, 3, RuntimeError("bitmask kernel failed"))
    constrained = SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True,
                                 structured_outputs={"regex": "[a-z ]+"})
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    outs = llm.generate(["One day", "Once upon a time"], [constrained, plain], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "error"]   # both rows were in that step
    assert len(outs[0].outputs[0].token_ids) == 2   # two steps sampled before the third raised
    core.runner.sample_constrained = sample
    again = llm.generate(["One day", "Once upon a time"], [constrained, plain], use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in again] == ["length", "length"]
