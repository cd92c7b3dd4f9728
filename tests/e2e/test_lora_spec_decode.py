"""LoRA with speculative decoding on a tiny float32 llama: n-gram and draft-model speculation give the greedy tokens
(and logprobs, within float tolerance) of the engine without speculation, for two adapters and the base mixed in one
batch, the same prompt under each. The draft proposes without adapters; the verify pass applies each request's
adapter to every one of its rows (its last token and each proposal), which shows once a proposal is accepted: the
rows after it decide the next tokens. So the "mlp" adapter's requests alone must get proposals accepted too
(n-gram: the adapter makes prompt 2 repeat a token; the draft: the base with "mlp" merged in), and a second run
(their prompts' blocks cached, keyed by adapter) gives the same tokens."""
import numpy as np
import pytest
import torch

from e2e.test_lora import make_adapter
from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.config import EngineConfig

ENGINE = dict(dtype="float32", device="cpu", log_stats_interval=0, enable_lora=True, max_loras=2, max_lora_rank=8,
              max_num_seqs=8)
ADAPTERS = {   # name: LoraConfig kwargs
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
_rng = np.random.default_rng(3)
_PROMPTS = [_rng.integers(3, 512, size=n).tolist() for n in (7, 30)]
_PROMPTS.append([1] + [5 + (3 * j) % 11 for j in range(8)] * 3)   # repeats: n-gram proposes from the prompt too
ROWS = [(p, name) for p in range(len(_PROMPTS)) for name in (None, "attn", "mlp")]   # (prompt, adapter)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory):
    """The base, its adapters, and a draft of the base with "mlp" merged in."""
    root = tmp_path_factory.mktemp("lora_spec")
    base = tiny_model_dirs["llama"]
    loras = {name: LoRARequest(name, i + 1, make_adapter(base, root / name, i, std=0.6, **cfg))
             for i, (name, cfg) in enumerate(ADAPTERS.items())}
    return base, loras, _merged(base, loras["mlp"].lora_path, root / "draft")


def _merged(base, adapter_dir, out_dir) -> str:
    """base with the adapter merged into its weights: a draft that proposes what the adapter's requests generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(out_dir)
    return str(out_dir)


def without_speculation(setup, **engine) -> list:
    base, loras, _ = setup
    reference = _generate(LLM(base, **{**ENGINE, **engine}), loras, ROWS)
    tokens = [o.outputs[0].token_ids for o in reference]
    for p in range(len(_PROMPTS)):   # each adapter changes the answer: the test is not passed by the base alone
        assert tokens[3 * p] != tokens[3 * p + 1] and tokens[3 * p] != tokens[3 * p + 2]
    return reference


def check_speculation(setup, method: str, reference: list, tol: float = 1e-4, **engine) -> LLM:
    """The mixed batch with speculation gives the reference's tokens, with proposals accepted; then the "mlp"
    adapter's requests alone (their prompts' blocks cached under it) give them again, with proposals accepted
    under the adapter."""
    base, loras, draft = setup
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    llm = LLM(base, speculative_config=spec, **{**ENGINE, **engine})
    _same(reference, _generate(llm, loras, ROWS), tol)
    sd = llm.engine.get_stats().spec_decode
    assert sd.num_drafts > 0 and 0 < sd.num_accepted_tokens <= sd.num_draft_tokens
    adapted = [i for i, (_, n) in enumerate(ROWS) if n == "mlp"]
    _same([reference[i] for i in adapted], _generate(llm, loras, [ROWS[i] for i in adapted]), tol)
    after = llm.engine.get_stats()
    assert after.spec_decode.num_drafts > sd.num_drafts
    assert after.spec_decode.num_accepted_tokens > sd.num_accepted_tokens
    assert after.num_blocks_free == after.num_blocks_total   # rejected proposals' slots freed
    return llm


def _same(reference, outputs, tol: float):
    for r, o in zip(reference, outputs, strict=True):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for x, y in zip(r.outputs[0].logprobs, o.outputs[0].logprobs, strict=True):
            assert set(x) == set(y) and all(abs(x[k].logprob - y[k].logprob) <= tol for k in x)


def _generate(llm, loras, rows):
    return llm.generate([_PROMPTS[p] for p, _ in rows], GREEDY, use_tqdm=False,
                        lora_request=[loras.get(n) for _, n in rows])


@pytest.fixture(scope="module")
def reference(setup):
    return without_speculation(setup)


@pytest.mark.parametrize("method, prepass", [("ngram", False), ("draft_model", False), ("draft_model", True)])
def test_lora_with_speculation_equals_without(setup, reference, monkeypatch, method, prepass):
    """prepass: the draft's passes behind the verify too (DraftModel.prepass; CUDA's path, on a CPU only so)."""
    from pagedllm.runner import model_runner
    from pagedllm.spec_decode.draft_model import DraftModel
    monkeypatch.setattr(model_runner, "PREPASS_ON_CPU", prepass)
    depth, served = DraftModel._prepass_depth, []   # passes the pre-pass served a step
    monkeypatch.setattr(DraftModel, "_prepass_depth", lambda *a: served.append(sum(d := depth(*a))) or d)
    check_speculation(setup, method, reference)
    assert (sum(served) > 0) == prepass, served


def test_lora_with_speculation_is_accepted(tiny_model_dirs):
    """enable_lora with either proposer starts (it was refused); LoRA over FP8 linears stays refused."""
    for spec in (NGRAM, {"method": "draft_model", "model": tiny_model_dirs["llama"], "num_speculative_tokens": 2}):
        assert EngineConfig("m", enable_lora=True, speculative_config=spec).speculative.method == spec["method"]
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig("m", enable_lora=True, quantization="fp8", speculative_config=NGRAM)
