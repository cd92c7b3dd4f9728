"""Shared test helpers: tiny random HF model directories (weights, config, tokenizer) built on the fly.

`make_tiny_model` is importable (`from conftest import make_tiny_model`: pytest puts tests/ on sys.path);
`tiny_model_dirs` builds one of each kind per session.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

DEMO_DIR = Path(__file__).resolve().parents[1] / "pagedllm" / "demo" / "stories260k"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# Large enough init that logits are peaky: greedy argmax has a clear margin, so exact-match tests are stable.
_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
             initializer_range=0.2, bos_token_id=1, eos_token_id=2)
_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
    # head_dim != hidden / heads, as in real Qwen3 checkpoints
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    # checkpoints with fused qkv_proj / gate_up_proj; its pad_token_id default (32000) is past the tiny vocab
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    # 8 experts, top 2, renormalized as Qwen3-30B-A3B; layer 1 dense (mlp_only_layers), as some checkpoints have
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "norm_topk_prob": True, "mlp_only_layers": [1]}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # every multiplier away from Llama's: an ignored one changes the tokens (attention's: not head_dim ** -0.5)
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 6.0, "residual_multiplier": 0.3,
                                                        "attention_multiplier": 0.6, "logits_scaling": 2.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"attention_bias": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 32, "hidden_act": "gelu_pytorch_tanh"}),
    # each Gemma 2 setting away from a neutral one, so an ignored one changes the tokens: the scale's scalar is not
    # head_dim, the window (layer 0; layer 1 is full) shorter than most test sequences, caps that bite
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 20, "sliding_window": 24,
                                                     "attn_logit_softcapping": 3.0, "final_logit_softcapping": 4.0}),
    # Gemma 3: a 24-token window on layers 0 and 2 (1 is full), each type rotating with its own theta (the full
    # layers' linearly scaled, as 4B and up), per-head q/k norms, no soft caps (as every Gemma 3 checkpoint)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 32, "query_pre_attn_scalar": 20, "sliding_window": 24, "num_hidden_layers": 3,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                    "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}}),
}
# Gemma 3 4B and up: gemma3's text model (its overrides go to text_config) beside a one-layer SigLIP tower
_VISION_LANGUAGE = {"gemma3_vl": ("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration", dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, image_size=28, patch_size=14),
    mm_tokens_per_image=4, boi_token_index=509, eoi_token_index=510, image_token_index=511))}


def make_tiny_model(path, arch: str = "llama", tie_word_embeddings: bool = False, seed: int = 0,
                    max_shard_size: str | None = None, **overrides) -> str:
    """Save a tiny random float32 transformers model, with the demo tokenizer, as a complete HF model dir."""
    import transformers
    if arch in _VISION_LANGUAGE:   # tie_word_embeddings at the top: transformers ties by that one
        text_arch, config_name, model_name, top = _VISION_LANGUAGE[arch]
        config = getattr(transformers, config_name)(text_config={**_BASE, **_ARCHS[text_arch][2], **overrides},
                                                    tie_word_embeddings=tie_word_embeddings, **top)
    else:
        config_name, model_name, arch_defaults = _ARCHS[arch]
        config = getattr(transformers, config_name)(
            **{**_BASE, **arch_defaults, **overrides}, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).float()
        _perturb_ones_and_zeros(model, std=config.initializer_range)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / name, path / name)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return str(path)


@torch.no_grad()
def _perturb_ones_and_zeros(model, std: float) -> None:
    # HF inits norms to 1 (Gemma's (1 + weight) ones to 0) and biases to 0: a loader that skipped them would still
    # pass. Make them all distinct, around their init.
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.normal_(0.0, std)
        elif "norm" in name:
            param.normal_(param.mean().item(), std)


def longrope(partial_rotary_factor: float, head_dim: int = 16, original: int = 64) -> dict:
    """Phi3Config overrides for longrope over int(head_dim * partial_rotary_factor) features, pretrained on
    `original` positions: short and long factors far apart, so which one runs shows in the tokens."""
    half = int(head_dim * partial_rotary_factor) // 2
    return dict(original_max_position_embeddings=original, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor,
        "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 4.0 * i for i in range(half)]})


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    specs = {
        "llama": dict(arch="llama"),
        "llama_tied": dict(arch="llama", tie_word_embeddings=True, seed=1),
        "qwen2": dict(arch="qwen2", seed=2),
        "qwen3": dict(arch="qwen3", seed=3),
        "llama3_rope": dict(arch="llama", seed=4, rope_parameters=llama3),
        "phi3": dict(arch="phi3", seed=5),
        # Phi-3.5-mini's rope (longrope, whole heads) and Phi-4-mini's (longrope over 3/4 of each head)
        "phi3_longrope": dict(arch="phi3", seed=6, **longrope(1.0)),
        "phi4_mini": dict(arch="phi3", seed=7, **longrope(0.75)),
        "qwen3_moe": dict(arch="qwen3_moe", seed=5),
        "mixtral": dict(arch="mixtral", seed=6),
        "granite": dict(arch="granite", seed=6),
        "olmo2": dict(arch="olmo2", seed=7),
        "gemma": dict(arch="gemma", seed=8, tie_word_embeddings=True),
        "gemma2": dict(arch="gemma2", seed=9, tie_word_embeddings=True),
        # untied, unlike the checkpoints: a tied tiny Gemma repeats its last token (its sqrt(hidden)-scaled embedding
        # dominates the logits), so greedy tokens would show little; the multimodal fixture is tied
        "gemma3": dict(arch="gemma3", seed=15),
    }
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: make_tiny_model(root / name, **spec) for name, spec in specs.items()}


@pytest.fixture
def one_thread_per_rank(monkeypatch):
    """Tensor parallelism on CPU: this process (rank 0) and each worker it spawns (OMP_NUM_THREADS is read when
    the worker imports torch) compute on one thread. With torch's default, a thread a core on every rank, their
    OpenMP threads spin against each other on the suite's 2 cores: a tiny model's TP=2 step took ~8x as long."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


async def final_token_ids(engine, request_id, prompt, params) -> list[int]:
    """An AsyncLLM request's finished token ids (its stream's last output)."""
    from pagedllm.engine.output_processor import OutputKind
    out = None
    async for out in engine.generate(prompt, params, request_id, OutputKind.FINAL):
        pass
    return out.outputs[0].token_ids


async def assert_dies_within(engine, prompt, kill, seconds: float | None = None):
    """A long request runs, kill() ends a worker of the engine: the request fails with EngineDeadError within
    `seconds` of the kill (not a hang). By default the bound an engine stuck in a collective that never raises
    has (seen once with Ray and gloo): the monitor's grace, then the core process's exit seen."""
    import asyncio
    import time

    from pagedllm import SamplingParams
    from pagedllm.distributed.executor import DEATH_GRACE_SECONDS
    from pagedllm.engine.async_llm import EngineDeadError
    seconds = seconds or DEATH_GRACE_SECONDS + 3
    long = SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)
    task = asyncio.ensure_future(final_token_ids(engine, "long", prompt, long))
    await asyncio.sleep(0.5)
    kill()
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(task, seconds)
    assert time.monotonic() - start < seconds


def raising_at_call(fn, n: int, error: BaseException | type[BaseException]):
    """fn, but its n-th call raises error (a fault injected at a chosen step); the other calls go through."""
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise error
        return fn(*args, **kwargs)
    return wrapper
