"""LoRA under tensor parallelism on CPU (gloo, float32): TP=2 gives TP=1's greedy tokens and logprobs with two
adapters and the base in one batch (a column-parallel layer's B cut by output rows, the KV head's replicated on
both ranks; a row-parallel layer's A cut by input columns, its partial product joining the base's before the
all-reduce and the bias added once); an adapter first named by a later request, removed and added again, reaches
every rank, and so does one loaded again in place from rewritten files. TP=1 with the adapter is the reference
(tests/e2e/test_lora.py checks it against PEFT)."""
import shutil

import pytest

from conftest import make_tiny_model
from e2e.test_lora import make_adapter
from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.config import EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread_per_rank")

ADAPTERS = {   # name: LoraConfig kwargs
    "every": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "some": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"]),
    "late": dict(r=16, lora_alpha=8, target_modules=["v_proj", "gate_proj", "down_proj"]),
}
PROMPTS = [[1] + [5 + (11 * i + j) % 400 for j in range(n)] for i, n in enumerate((3, 41, 20))]
ENGINE = dict(device="cpu", log_stats_interval=0, max_num_batched_tokens=32, max_model_len=256, enable_lora=True,
              max_loras=2, max_lora_rank=16)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
# (prompt, adapter) rows: two adapters (max_loras) and the base in one batch, a prompt under each
MIXED = [(0, "every"), (0, None), (1, "some"), (1, "every")]
LATE = [(2, "late"), (1, None)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_lora")
    # 1 KV head: its rows of k/v (and of their B) on both ranks; biases on every linear: o_proj's and down_proj's
    # (row-parallel) added once, after the all-reduce that the LoRA products join
    base = make_tiny_model(root / "base", "llama", num_key_value_heads=1, attention_bias=True, mlp_bias=True, seed=21)
    loras = {name: LoRARequest(name, i + 1, make_adapter(base, root / name, i, std=0.3, **cfg))
             for i, (name, cfg) in enumerate(ADAPTERS.items())}
    return base, loras


def _run(llm, loras, rows):
    return llm.generate([PROMPTS[p] for p, _ in rows], GREEDY, use_tqdm=False,
                        lora_request=[None if n is None else loras[n] for _, n in rows])


def _run_queued(llm, loras, rows):
    """Through the engine's queue: an adapter not loaded yet is read by the loader's thread (LLM.generate loads
    it first, with add_lora)."""
    engine, done = llm.engine, {}
    for i, (p, n) in enumerate(rows):
        engine.add_request(f"q{i}", PROMPTS[p], GREEDY, lora_request=None if n is None else loras[n])
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return [done[f"q{i}"] for i in range(len(rows))]


def _same(ref, out):
    assert len(out) == len(ref)
    for r, o in zip(ref, out):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for x, y in zip(r.outputs[0].logprobs, o.outputs[0].logprobs):
            assert set(x) == set(y)
            assert all(abs(x[k].logprob - y[k].logprob) <= 1e-5 for k in x)


def test_tp2_lora_equals_tp1(setup, tmp_path):
    base, loras = setup
    reference = LLM(base, **ENGINE)
    try:
        ref = [_run(reference, loras, MIXED), _run(reference, loras, LATE)]
    finally:
        reference.shutdown()
    tokens = [o.outputs[0].token_ids for o in ref[0]]
    assert tokens[0] != tokens[1] and tokens[2] != tokens[3]   # the adapters change the answers
    llm = LLM(base, tensor_parallel_size=2, **ENGINE)
    try:
        _same(ref[0], _run(llm, loras, MIXED))
        _same(ref[1], _run_queued(llm, loras, LATE))   # a new adapter, read by each rank now
        assert llm.engine.remove_lora(loras["late"].lora_int_id)
        _same(ref[1], _run(llm, loras, LATE))   # read again on every rank (add_lora)
        swap = shutil.copytree(loras["some"].lora_path, tmp_path / "swap")
        loras["swap"] = LoRARequest("swap", 9, str(swap))
        _same(ref[0][2:3], _run(llm, loras, [(1, "swap")]))
        shutil.copytree(loras["late"].lora_path, swap, dirs_exist_ok=True)   # other weights, the same path
        loras["swap"] = LoRARequest("swap", 9, str(swap), load_inplace=True)   # every rank reads them again
        _same(ref[1][:1], _run(llm, loras, [(2, "swap")]))
    finally:
        llm.shutdown()


def test_tp2_phi3_fused_adapter_equals_tp1(tmp_path):
    """A Phi-3 adapter on the fused qkv_proj / gate_up_proj: each rank serves A with its rows of each part of B
    (its q head rows, its KV head's k and v rows, its gate and up columns), as it holds the base's."""
    base = make_tiny_model(tmp_path / "base", "phi3", seed=5)
    cfg = dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    loras = {"fused": LoRARequest("fused", 1, make_adapter(base, tmp_path / "fused", 0, std=0.3, **cfg))}
    rows = [(0, "fused"), (0, None), (1, "fused"), (2, "fused")]
    reference = LLM(base, **ENGINE)
    try:
        ref = _run(reference, loras, rows)
    finally:
        reference.shutdown()
    assert ref[0].outputs[0].token_ids != ref[1].outputs[0].token_ids   # the adapter changes the answer
    llm = LLM(base, tensor_parallel_size=2, **ENGINE)
    try:
        _same(ref, _run(llm, loras, rows))
    finally:
        llm.shutdown()


def test_tp2_lora_with_draft_speculation_equals_tp1(setup, tmp_path):
    """TP=2 with a draft model (sharded over both ranks, no adapters: the base with "every" merged in, so that the
    requests under "every" get proposals accepted) gives TP=1's tokens without speculation: every rank's verify
    rows apply each request's adapter, its shards of A and B, to the request's last token and proposals alike."""
    from e2e.test_lora_spec_decode import _merged
    base, loras = setup
    reference = LLM(base, **ENGINE)
    try:
        ref = _run(reference, loras, MIXED)
    finally:
        reference.shutdown()
    spec = {"method": "draft_model", "model": _merged(base, loras["every"].lora_path, tmp_path / "draft"),
            "num_speculative_tokens": 3}
    llm = LLM(base, tensor_parallel_size=2, speculative_config=spec, **ENGINE)
    try:
        _same(ref, _run(llm, loras, MIXED))
        sd = llm.engine.get_stats().spec_decode
        assert 0 < sd.num_accepted_tokens <= sd.num_draft_tokens
    finally:
        llm.shutdown()


def test_tp_lora_config_accepted_fp8_still_refused():
    """enable_lora with tensor_parallel_size 2 starts (it was refused); LoRA over FP8 linears stays refused."""
    EngineConfig("m", tensor_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig("m", tensor_parallel_size=2, enable_lora=True, quantization="fp8")
