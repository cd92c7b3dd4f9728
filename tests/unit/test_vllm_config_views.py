"""llm.llm_engine.model_config / .vllm_config, as scripts written for vLLM 0.26 read them: each value is the one
the engine runs with (checked against the engine's own objects: its model's weights, KV cache, scheduler), and
vLLM's values pagedllm keeps none of are an AttributeError saying where its settings are.

Was: an AttributeError for model_config and vllm_config ("vLLM's config objects are not built"); then for
vllm_config's device_config, load_config, lora_config and speculative_config."""
import pytest
import torch
from conftest import make_tiny_model

from pagedllm import LLM
from pagedllm.config import DEMO_MODEL
from pagedllm.engine.vllm_config import ParallelConfig


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", seed=3, max_model_len=128, max_num_seqs=5, block_size=8, num_gpu_blocks_override=40,
               enable_prefix_caching=False, max_logprobs=7, override_generation_config={"temperature": 0.5},
               hf_overrides={"rms_norm_eps": 1e-6}, enforce_eager=True)


def test_model_config_is_the_engines_in_vllms_three_places(llm):
    mc = llm.model_config
    assert mc is llm.llm_engine.model_config is llm.llm_engine.vllm_config.model_config


def test_model_config_values_are_what_the_engine_runs_with(llm):
    engine, mc = llm.engine, llm.model_config
    assert mc.model == mc.tokenizer == mc.served_model_name == DEMO_MODEL   # no tokenizer given: the model's
    assert mc.dtype is engine.dtype is torch.float32                       # resolved, as vLLM's: a torch.dtype
    assert mc.max_model_len == engine.max_model_len == 128
    assert mc.seed == 3 and mc.max_logprobs == 7 and mc.enforce_eager is True
    assert mc.skip_tokenizer_init is False and mc.disable_cascade_attn is False
    assert mc.hf_config is mc.hf_text_config is engine.hf_config and mc.hf_config.rms_norm_eps == 1e-6
    assert mc.hf_overrides == {"rms_norm_eps": 1e-6}
    assert mc.generation_config == "auto" and mc.override_generation_config == {"temperature": 0.5}
    assert mc.get_diff_sampling_param() == engine.default_sampling_params
    assert mc.get_diff_sampling_param()["temperature"] == llm.get_default_sampling_params().temperature == 0.5
    assert mc.quantization is None and mc.runner_type == "generate"
    assert mc.architectures == ["LlamaForCausalLM"] and mc.architecture == "LlamaForCausalLM"
    assert mc.get_sliding_window() is None


def test_model_sizes_match_the_loaded_weights_and_kv_cache(llm):
    mc, runner = llm.model_config, llm.engine.runner
    pc = llm.llm_engine.vllm_config.parallel_config
    embed = runner.model.model.embed_tokens.weight
    assert (mc.get_vocab_size(), mc.get_hidden_size()) == tuple(embed.shape) == (llm.engine.vocab_size, embed.shape[1])
    assert mc.get_total_num_hidden_layers() == mc.get_num_layers(pc) == runner.num_layers
    assert mc.get_num_kv_heads(pc) == mc.get_total_num_kv_heads() == runner.num_kv_heads
    assert mc.get_head_size() == runner.head_dim
    assert mc.get_num_attention_heads(pc) == mc.hf_config.num_attention_heads
    assert (pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.data_parallel_size, pc.world_size) == (1, 1, 1, 1)


def test_cache_and_scheduler_configs_are_the_engines(llm):
    vc, engine = llm.llm_engine.vllm_config, llm.engine
    cc, sc = vc.cache_config, vc.scheduler_config
    assert cc.block_size == engine.kv_cache_manager.block_size == 8
    assert cc.num_gpu_blocks == engine.runner.num_blocks == engine.kv_cache_manager.pool.num_blocks == 40
    assert cc.num_gpu_blocks_override == 40 and cc.enable_prefix_caching is False and cc.cache_dtype == "auto"
    assert cc.gpu_memory_utilization == engine.config.gpu_memory_utilization
    assert sc.max_num_seqs == engine.scheduler.max_num_seqs == 5
    assert sc.max_num_batched_tokens == engine.scheduler.max_num_batched_tokens == engine.config.max_num_batched_tokens
    assert sc.max_model_len == 128 and sc.policy == "fcfs" and sc.enable_chunked_prefill is True


@pytest.mark.parametrize("owner, name", [("model_config", "trust_remote_code"), ("model_config", "code_revision"),
                                         ("vllm_config", "compilation_config")])
def test_what_pagedllm_keeps_no_value_for_is_left_out_saying_where_its_settings_are(llm, owner, name):
    with pytest.raises(AttributeError, match=rf"no attribute '{name}' \(not built: .*llm.engine.config"):
        getattr(getattr(llm.llm_engine, owner), name)


def test_device_and_load_configs_are_the_engines(llm):
    """Were AttributeErrors (device_config, load_config "not built")."""
    dc, lc = llm.llm_engine.vllm_config.device_config, llm.llm_engine.vllm_config.load_config
    assert dc.device == llm.engine.device == torch.device("cpu") and dc.device_type == "cpu"
    assert lc.load_format == llm.engine.config.load_format == "auto"


def test_load_format_dummy_is_the_one_the_weights_came_from():
    """Random weights: the view says dummy. download_dir and the revisions are a Hub-id tokenizer's, as given
    (tokenizer_revision defaults to revision, as vLLM's)."""
    llm = LLM(device="cpu", load_format="dummy", download_dir="/tmp/models", revision="v1",
              num_gpu_blocks_override=8)
    lc, mc = llm.llm_engine.vllm_config.load_config, llm.llm_engine.model_config
    assert (lc.load_format, lc.download_dir, mc.revision, mc.tokenizer_revision) == ("dummy", "/tmp/models", "v1",
                                                                                      "v1")


def test_lora_and_speculative_configs_are_none_when_off_as_vllms(llm):
    """Were AttributeErrors; vLLM's are None when LoRA and speculative decoding are off."""
    vc = llm.llm_engine.vllm_config
    assert vc.lora_config is None and vc.speculative_config is None


def test_lora_config_is_the_lora_managers():
    llm = LLM(device="cpu", enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=3, lora_dtype="bfloat16",
              lora_target_modules=["o_proj", "down_proj"], num_gpu_blocks_override=8)
    lc, lora = llm.llm_engine.vllm_config.lora_config, llm.engine.runner.lora
    assert (lc.max_loras, lc.max_lora_rank, lc.max_cpu_loras) == (lora.max_loras, lora.max_lora_rank,
                                                                  lora.max_cpu_loras) == (2, 8, 3)
    assert lc.target_modules == lora.target_modules == ["o_proj", "down_proj"]
    assert lc.lora_dtype is torch.bfloat16 and {m.lora_b.dtype for m in lora.layers.values()} == {torch.bfloat16}
    with pytest.raises(AttributeError, match=r"no attribute 'fully_sharded_loras' \(not built: under tensor"):
        lc.fully_sharded_loras


def test_lora_config_resolves_auto_and_unset_as_vllm():
    """lora_dtype auto: the model's dtype (vLLM's verify_with_model_config); max_cpu_loras unset: max_loras."""
    llm = LLM(device="cpu", enable_lora=True, max_loras=2, num_gpu_blocks_override=8)
    lc, lora = llm.llm_engine.vllm_config.lora_config, llm.engine.runner.lora
    assert lc.lora_dtype is llm.engine.dtype is torch.float32
    assert {m.lora_b.dtype for m in lora.layers.values()} == {torch.float32}
    assert lc.max_cpu_loras == lora.max_cpu_loras == 2 and lc.max_lora_rank == 16 and lc.target_modules is None


def test_speculative_config_ngram_is_the_proposers():
    """One of prompt_lookup_min/max given sets the other, as vLLM's; ngram's draft model config is the target's."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}
    llm = LLM(device="cpu", speculative_config=spec, num_gpu_blocks_override=16)
    sc, ngram = llm.llm_engine.vllm_config.speculative_config, llm.engine.core.speculator.ngram
    assert (sc.method, sc.model, sc.num_speculative_tokens) == ("ngram", "ngram", 3) and ngram.k == 3
    assert (sc.prompt_lookup_min, sc.prompt_lookup_max) == (ngram.min_n, ngram.max_n) == (4, 4)
    assert sc.draft_model_config is sc.target_model_config is llm.model_config
    assert not sc.uses_draft_model() and not sc.use_eagle()
    assert sc.rejection_sample_method == "standard"


@pytest.mark.parametrize("given,want", [(None, "standard"), ("standard", "standard"), ("strict", "standard"),
                                        ("synthetic", "synthetic")])
def test_rejection_sample_method_takes_vllms_names(given, want):
    """vLLM 0.26's "standard" (pagedllm's earlier "strict" still read as it); its "block" is refused by name."""
    from pagedllm.spec_decode.config import SpeculativeConfig
    extra = {} if given is None else {"rejection_sample_method": given}
    if given == "synthetic":
        extra["synthetic_acceptance_rate"] = 0.5
    assert SpeculativeConfig("ngram", 2, **extra).rejection_sample_method == want
    with pytest.raises(ValueError, match="rejection_sample_method"):
        SpeculativeConfig("ngram", 2, rejection_sample_method="block")


def test_speculative_config_draft_model_is_the_loaded_draft(tmp_path):
    target = make_tiny_model(tmp_path / "target")
    draft = make_tiny_model(tmp_path / "draft", num_hidden_layers=1, seed=5)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    llm = LLM(target, device="cpu", speculative_config=spec, num_gpu_blocks_override=16)
    sc, runner = llm.llm_engine.vllm_config.speculative_config, llm.engine.runner
    assert (sc.method, sc.model, sc.num_speculative_tokens) == ("draft_model", draft, 2) and sc.uses_draft_model()
    assert (sc.prompt_lookup_min, sc.prompt_lookup_max) == (0, 0)   # unused, as vLLM's
    dmc = sc.draft_model_config
    assert dmc.model == draft and sc.target_model_config is llm.model_config and dmc.tokenizer == target
    assert dmc.get_total_num_hidden_layers() == runner.draft.num_layers == 1
    assert dmc.get_vocab_size() == runner.draft.hf_config.vocab_size == llm.model_config.get_vocab_size()
    assert dmc.dtype is runner.draft.dtype and dmc.max_model_len == runner.draft.max_model_len
    assert sc.draft_tensor_parallel_size == 1   # the target's, as vLLM resolves it (was an AttributeError)


def test_views_are_read_only(llm):
    import dataclasses
    mc, cc = llm.model_config, llm.llm_engine.vllm_config.cache_config
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.max_model_len = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cc.num_gpu_blocks = 1


def test_head_counts_split_over_ranks_as_the_runner_splits_them(tmp_path):
    """Qwen3's head_dim (32) is not hidden_size / heads (16); 4 query heads and 2 KV heads over 2 and 4 ranks:
    the 4-rank case replicates one KV head on each rank."""
    llm = LLM(make_tiny_model(tmp_path / "qwen3", arch="qwen3"), device="cpu", num_gpu_blocks_override=8)
    mc = llm.model_config
    assert mc.get_head_size() == llm.engine.runner.head_dim == 32 and mc.architecture == "Qwen3ForCausalLM"
    assert [(mc.get_num_attention_heads(ParallelConfig(n)), mc.get_num_kv_heads(ParallelConfig(n)))
            for n in (1, 2, 4)] == [(4, 2), (2, 1), (1, 1)]


def test_quantization_is_the_one_the_linears_run(tmp_path):
    """As vLLM's: --quantization's, unless the checkpoint has its own quantization_config, whose method wins."""
    assert LLM(device="cpu", quantization="fp8", num_gpu_blocks_override=8).model_config.quantization == "fp8"
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    ckpt = make_tiny_model(tmp_path / "fp8", quantization_config=fp8)
    llm = LLM(ckpt, device="cpu", num_gpu_blocks_override=8, load_format="dummy")   # the config is what counts
    assert llm.model_config.quantization == "fp8" and llm.engine.config.quantization is None
    assert {p.dtype for p in llm.engine.runner.model.parameters()} >= {torch.float8_e4m3fn}   # the linears are fp8
