"""LoRA serving against transformers + PEFT on a tiny random llama, float32: three adapters (different ranks and
targets, one rsLoRA) and the base mixed in one generate call; greedy tokens identical, logprobs within 1e-4;
also under preemption, chunked prefill, prefix caching, max_loras=1, add/remove while requests run, bad adapters."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from pagedllm import LLM, LoRARequest, SamplingParams

MAX_NEW = 12
TOL = 1e-4
ADAPTERS = {   # name: (LoraConfig kwargs)
    "rs": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "attn": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all": dict(r=16, lora_alpha=32, target_modules=r".*\.(q_proj|o_proj|gate_proj|up_proj|down_proj)"),
}
rng = np.random.default_rng(0)
PROMPTS = [rng.integers(3, 512, size=n).tolist() for n in (5, 17, 33, 40, 9, 26, 48, 12)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0, ignore_eos=True)


def make_adapter(base_dir, out_dir, seed, std: float = 0.15, **kw):
    """A PEFT adapter of base_dir with random A and B (normal, std), saved to out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:   # PEFT's B starts at zero: the adapter would change nothing
                p.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base")
    loras = {name: LoRARequest(name, i + 1, make_adapter(base, root / name, i, **kw))
             for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base, loras, _references(base, loras)


def _references(base, loras):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    refs = {}
    for name in [None, *loras]:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, loras[name].lora_path)
        model.eval()
        out = []
        for p in PROMPTS:
            g = model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            ids = g.sequences[0, len(p):].tolist()
            out.append((ids, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, ids)]))
        refs[name] = out
    return refs


def assignment(loras):
    """Per prompt: an adapter or None (the base), all four kinds mixed."""
    names = [None, "rs", "attn", "all"]
    return [names[i % 4] for i in range(len(PROMPTS))]


def check(outputs, names, refs):
    for i, (out, name) in enumerate(zip(outputs, names)):
        ids, lps = refs[name][i]
        comp = out.outputs[0]
        assert comp.token_ids == ids, f"prompt {i} under {name}: {comp.token_ids} != {ids}"
        got = [next(iter(pos.values())).logprob for pos in comp.logprobs]
        np.testing.assert_allclose(got, lps, atol=TOL, rtol=0)


def run(setup, names=None, **kw):
    base, loras, refs = setup
    names = names or assignment(loras)
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, **{"max_loras": 3, **kw})
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=[loras.get(n) for n in names])
    check(outs, names, refs)
    return llm


def test_mixed_adapters_match_peft(setup):
    refs = setup[2]
    for name in ADAPTERS:   # each adapter changes the answers: the test is not passed by the base alone
        assert sum(refs[name][i][0] != refs[None][i][0] for i in range(len(PROMPTS))) >= len(PROMPTS) // 2
    llm = run(setup)
    assert llm.engine.list_loras() == {1, 2, 3}


@pytest.mark.parametrize("arch", ["granite", "olmo2", "gemma", "gemma2", "gemma3"])
def test_llama_variants_match_peft(tmp_path, arch):
    """LoRA through the shared layers of the Llama variants: Granite's residual_multiplier scales the adapted
    o_proj / down_proj outputs, OLMo-2's post-norms and whole-projection q_norm / k_norm read adapted ones."""
    base = make_tiny_model(tmp_path / "base", arch, seed=3)
    loras = {"all": LoRARequest("all", 1, make_adapter(base, tmp_path / "all", 0, **ADAPTERS["all"]))}
    refs = _references(base, loras)
    assert refs["all"] != refs[None]
    run((base, loras, refs), names=[None, "all"] * 4, max_loras=1)


def test_phi3_fused_adapter_matches_peft(tmp_path):
    """Phi-3's HF modules are fused (qkv_proj, gate_up_proj), so PEFT trains one A and one B on each: every part
    (q/k/v, gate/up: rows 64 | 32 | 32, 128 | 128) is served as that A with its rows of B (they were refused).
    Both fused and part tensors for one module, a B of other rows, or part tensors alone are errors naming them."""
    base = make_tiny_model(tmp_path / "base", "phi3", seed=5)
    cfg = dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    loras = {"fused": LoRARequest("fused", 1, make_adapter(base, tmp_path / "fused", 0, **cfg))}
    refs = _references(base, loras)
    assert sum(a[0] != b[0] for a, b in zip(refs["fused"], refs[None])) >= len(PROMPTS) // 2
    llm = run((base, loras, refs), names=[None, "fused"] * 4, max_loras=1)
    from pathlib import Path
    src, qkv = Path(loras["fused"].lora_path), "base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"
    q = "base_model.model.model.layers.1.self_attn.q_proj.lora_"
    both = _bad(tmp_path, src, edit_tensors=lambda t: {**t, q + "A.weight": torch.zeros(8, 64),
                                                       q + "B.weight": torch.zeros(64, 8)})
    with pytest.raises(ValueError, match="targets both qkv_proj and q_proj of layer 1"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("both", 2, both))
    rows = _bad(tmp_path, src, edit_tensors=lambda t: {**t, qkv: torch.zeros(96, 8)})   # q/k/v of another model
    with pytest.raises(ValueError, match=r"lora_B of model.layers.1.self_attn.qkv_proj has shape \(96, 8\)"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("rows", 3, rows))
    # the layer holds the one A once (one rank block over all of q/k/v's rows), so tensors on a part, each with
    # its own A, cannot be served: refused, naming the part (they were taken)
    layer = llm.engine.runner.lora.layers["model.layers.1.self_attn.qkv_proj"]
    assert layer.lora_a.shape[1] == layer.max_rank and layer.shard_bounds.tolist() == [0, 128]
    parts = _bad(tmp_path, src, edit_tensors=lambda t: {**{k: v for k, v in t.items() if ".1.self_attn.qkv" not in k},
                                                        q + "A.weight": torch.zeros(8, 64),
                                                        q + "B.weight": torch.zeros(64, 8)})
    with pytest.raises(ValueError, match="targets q_proj of layer 1, a part of qkv_proj, which Phi3ForCausalLM"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("parts", 4, parts))


@pytest.mark.parametrize("kw", [dict(num_gpu_blocks_override=20, block_size=4),   # preemption
                                dict(max_num_batched_tokens=16),                    # chunked prefill
                                dict(max_loras=1, max_cpu_loras=2)])                # one adapter a step, LRU
def test_preemption_chunking_max_loras(setup, kw):
    llm = run(setup, **kw)
    stats = llm.engine.get_stats()
    if "num_gpu_blocks_override" in kw:
        assert stats.num_preemptions > 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_prefix_cache_never_shared_across_adapters(setup):
    base, loras, refs = setup
    names = [None, "rs", "attn", None]
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=3)
    prompt = PROMPTS[6]   # 48 tokens: 3 full blocks
    outs = llm.generate([prompt] * 4, GREEDY, use_tqdm=False, lora_request=[loras.get(n) for n in names])
    for out, name in zip(outs, names):
        assert out.outputs[0].token_ids == refs[name][6][0]
    assert outs[3].num_cached_tokens > 0      # the base shares with the base
    # each adapter its own blocks: the same prompt under another adapter is a miss
    outs2 = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=loras["all"])
    assert outs2[0].num_cached_tokens == 0 and outs2[0].outputs[0].token_ids == refs["all"][6][0]
    outs3 = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=loras["rs"])   # its own blocks: a hit
    assert outs3[0].num_cached_tokens > 0 and outs3[0].outputs[0].token_ids == refs["rs"][6][0]


def test_add_remove_while_running(setup):
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=2)
    engine = llm.engine
    assert engine.add_lora(loras["attn"]) and engine.list_loras() == {2}
    engine.add_request("a", PROMPTS[1], GREEDY, lora_request=loras["rs"])
    engine.add_request("b", PROMPTS[2], GREEDY)
    while not any(r.request_id == "a" for r in engine.core.scheduler.running):   # its adapter is read off the loop
        engine.step()
    assert not engine.remove_lora(1)         # its request runs: refused, it finishes under it
    assert engine.remove_lora(2)             # unused: gone
    assert not engine.remove_lora(2) and engine.list_loras() == {1}
    engine.add_request("c", PROMPTS[3], GREEDY, lora_request=loras["all"])
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert done["a"].outputs[0].token_ids == refs["rs"][1][0]
    assert done["b"].outputs[0].token_ids == refs[None][2][0]
    assert done["c"].outputs[0].token_ids == refs["all"][3][0]
    assert engine.remove_lora(1) and engine.list_loras() == {3}


def _bad(tmp_path, src, edit_cfg=None, edit_tensors=None):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_cfg:
        edit_cfg(cfg)
    if edit_tensors:
        tensors = edit_tensors(tensors)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return str(d)


@pytest.mark.parametrize("case, match", [
    ("missing", "no adapter directory at that path"),
    ("rank", "max_lora_rank"),
    ("target", "target_modules"),
    ("shape", "another base model"),
    ("dora", "use_dora"),
    ("bias", "bias"),
    ("modules_to_save", "modules_to_save"),
    ("alpha", "lora_alpha must be a number"),
    ("kasa", "kasa_config"),
    ("layer_replication", "layer_replication"),
    ("alora", "alora_invocation_tokens"),
])
def test_bad_adapters(setup, tmp_path, case, match):
    from pathlib import Path
    base, loras, _ = setup
    src = Path(loras["attn"].lora_path)
    def widen(t):
        return {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v) for k, v in t.items()}
    path = {"missing": lambda: str(tmp_path / "nowhere"),
            "rank": lambda: str(loras["all"].lora_path),
            "target": lambda: _bad(tmp_path, src, lambda c: c.update(target_modules=["q_proj", "lm_head"]),
                                   lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                              "base_model.model.lm_head.lora_B.weight": torch.zeros(512, 4)}),
            "shape": lambda: _bad(tmp_path, src, edit_tensors=widen),
            "dora": lambda: _bad(tmp_path, src, lambda c: c.update(use_dora=True)),
            "bias": lambda: _bad(tmp_path, src, lambda c: c.update(bias="all")),
            "modules_to_save": lambda: _bad(tmp_path, src, lambda c: c.update(modules_to_save=["lm_head"])),
            "alpha": lambda: _bad(tmp_path, src, lambda c: c.pop("lora_alpha")),
            "kasa": lambda: _bad(tmp_path, src, lambda c: c.update(kasa_config={"r": 4})),
            "layer_replication": lambda: _bad(tmp_path, src, lambda c: c.update(layer_replication=[[0, 2], [1, 2]])),
            "alora": lambda: _bad(tmp_path, src, lambda c: c.update(alora_invocation_tokens=[300, 301])),
            }[case]()
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_lora_rank=8)
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("bad", 9, path))
    # the engine runs on
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=loras["attn"])
    assert out[0].outputs[0].token_ids == setup[2]["attn"][0][0]


def test_lora_off(setup, monkeypatch):
    """Without enable_lora the model has no LoRA layer and a step calls no LoRA code."""
    from pagedllm.lora import layers, manager

    def boom(*a, **k):
        raise AssertionError("LoRA code ran with LoRA off")
    for cls, names in ((manager.LoRAManager, ("__init__", "prepare_step", "acquire", "release")),
                       (layers.LoRALinear, ("__init__", "forward"))):
        for name in names:
            monkeypatch.setattr(cls, name, boom)
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0)
    assert llm.engine.runner.lora is None
    assert not any("LoRA" in type(m).__name__ for m in llm.engine.runner.model.modules())
    with pytest.raises(ValueError, match="enable_lora"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=loras["rs"])
    check(llm.generate(PROMPTS, GREEDY, use_tqdm=False), [None] * len(PROMPTS), refs)


def test_lora_request_arguments(setup):
    base, loras, _ = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    with pytest.raises(ValueError, match="lora_request has 2 entries for 3 prompts"):
        llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False, lora_request=[loras["rs"], None])
    with pytest.raises(TypeError, match="LoRARequest"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request="rs")
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'rs'"):
        llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False,
                     lora_request=[loras["rs"], LoRARequest("other", 1, loras["attn"].lora_path)])
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, "/p")
    assert not llm.engine.has_unfinished_requests()


def test_adapters_of_one_name_are_each_checked_first(setup, tmp_path):
    """LoRARequests equal by name (vLLM's equality) under other ids or paths are distinct adapters: each is loaded
    and checked before anything is queued. The second's error was a request ending empty (finish_reason "error")."""
    from pagedllm.beam_search import BeamSearchParams
    base, loras, refs = setup
    attn, rs = loras["attn"].lora_path, loras["rs"].lora_path
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=2)
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[LoRARequest("x", 11, attn),
                                                                           LoRARequest("x", 12, rs)])
    assert [o.outputs[0].token_ids for o in outs] == [refs["attn"][0][0], refs["rs"][1][0]]
    for second, match in ((LoRARequest("y", 22, str(tmp_path / "nowhere")), "no adapter directory"),
                          (LoRARequest("y", 21, rs), "lora_int_id 21 is already adapter 'y'")):
        with pytest.raises(ValueError, match=match):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[LoRARequest("y", 21, attn), second])
        with pytest.raises(ValueError, match=match):
            llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=2, max_tokens=2),
                            lora_request=[LoRARequest("y", 21, attn), second])
    assert not llm.engine.has_unfinished_requests()


def test_chat_takes_lora_request(setup):
    """vLLM's LLM.chat takes lora_request (one, or one per conversation), as generate does."""
    base, loras, _ = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    texts = ["Once upon a time", "The dog ran", "Lily saw a", "Tom and"]
    ids = [llm.get_tokenizer().encode(t, add_special_tokens=False) for t in texts]
    chats = llm.chat([[{"role": "user", "content": t}] for t in texts], GREEDY, use_tqdm=False,
                     lora_request=loras["rs"], chat_template=template)
    refs = llm.generate(ids, GREEDY, use_tqdm=False, lora_request=loras["rs"])
    bases = llm.generate(ids, GREEDY, use_tqdm=False)
    assert [c.outputs[0].token_ids for c in chats] == [r.outputs[0].token_ids for r in refs]
    assert [c.outputs[0].token_ids for c in chats] != [b.outputs[0].token_ids for b in bases]


def test_outputs_name_their_lora_request(setup):
    """vLLM's RequestOutput.lora_request: the adapter the request ran under, None for the base (an
    AttributeError before)."""
    base, loras, _ = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=2, n=2), use_tqdm=False,
                        lora_request=[loras["rs"], None])
    assert outs[0].lora_request is loras["rs"] and outs[1].lora_request is None


def test_beam_search_takes_lora_request(setup):
    """vLLM's LLM.beam_search takes lora_request (one, or one per prompt): at width 1 each prompt's beam is PEFT's
    greedy answer under its adapter, the adapters mixed in one search's steps."""
    from pagedllm.beam_search import BeamSearchParams
    base, loras, refs = setup
    names = assignment(loras)[:4]
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=3)
    outs = llm.beam_search(PROMPTS[:4], BeamSearchParams(beam_width=1, max_tokens=MAX_NEW, ignore_eos=True),
                           lora_request=[loras.get(n) for n in names], use_tqdm=True)
    for i, (out, name) in enumerate(zip(outs, names)):
        assert out.sequences[0].tokens[len(PROMPTS[i]):] == refs[name][i][0], (i, name)
        assert out.sequences[0].lora_request is loras.get(name)   # vLLM's BeamSearchSequence field
    grouped = llm.beam_search(PROMPTS[:4], BeamSearchParams(beam_width=1, max_tokens=MAX_NEW, ignore_eos=True),
                              lora_request=[loras.get(n) for n in names], concurrency_limit=3)
    assert [o.sequences[0].tokens for o in grouped] == [o.sequences[0].tokens for o in outs]   # each its adapter
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=2, max_tokens=2), lora_request=[loras["rs"]])


@pytest.mark.parametrize("kw, match", [(dict(max_loras=0), "max_loras"), (dict(max_lora_rank=0), "max_lora_rank"),
                                       (dict(max_loras=2, max_cpu_loras=1), "max_cpu_loras")])
def test_config_errors(kw, match):
    from pagedllm.config import EngineConfig
    with pytest.raises(ValueError, match=match):
        EngineConfig(enable_lora=True, **kw)


def test_async_llm_lora_in_core_process(setup, tmp_path):
    """The server's path: adapters load in the core process; add/remove/list are messages, a bad adapter is the
    caller's ValueError (add_lora) or its request's error (generate), and the core runs on."""
    import asyncio
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM, EngineGenerateError
    from pagedllm.engine.output_processor import OutputKind
    base, loras, refs = setup

    async def collect(engine, rid, i, lora):
        async for out in engine.generate(PROMPTS[i], GREEDY, rid, OutputKind.FINAL, lora_request=lora):
            pass
        assert out.lora_request is lora
        return out.outputs[0].token_ids

    async def main():
        engine = AsyncLLM(EngineConfig(base, dtype="float32", device="cpu", log_stats_interval=0, enable_lora=True,
                                       max_loras=2, max_lora_rank=8))
        try:
            assert await engine.add_lora(loras["rs"]) and await engine.list_loras() == {1}
            assert await engine.pin_lora(1)
            with pytest.raises(ValueError, match="not loaded"):
                await engine.pin_lora(5)
            with pytest.raises(ValueError, match="max_lora_rank"):
                await engine.add_lora(loras["all"])
            got = await asyncio.gather(collect(engine, "a", 0, loras["rs"]), collect(engine, "b", 1, loras["attn"]),
                                       collect(engine, "c", 2, None), collect(engine, "d", 3, loras["all"]),
                                       return_exceptions=True)
            assert got[:3] == [refs["rs"][0][0], refs["attn"][1][0], refs[None][2][0]]
            assert isinstance(got[3], EngineGenerateError) and "max_lora_rank" in str(got[3])
            assert await engine.remove_lora(2) and await engine.list_loras() == {1}
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_disk_tier_keeps_adapters_apart(setup, tmp_path):
    """A restarted engine on the same disk tier: the prompt's blocks come back for its adapter only."""
    from pagedllm.runner.kv_cache import bytes_per_block
    base, loras, refs = setup
    prompt = PROMPTS[6]   # 48 tokens: 3 full blocks
    block_bytes = bytes_per_block(2, 16, 2, 16, torch.float32)
    kw = dict(dtype="float32", log_stats_interval=0, enable_lora=True, num_gpu_blocks_override=8,
              kv_offloading_size=4 * block_bytes / 2**30, kv_disk_dir=str(tmp_path / "kv"))
    first = LLM(base, **kw)
    first.generate([prompt], GREEDY, use_tqdm=False, lora_request=loras["rs"])
    pushers = np.random.default_rng(1).integers(3, 512, size=(6, 48)).tolist()
    for p in pushers:   # push its blocks out of the GPU and the CPU tier, to disk
        first.generate([p], GREEDY, use_tqdm=False)
    first.engine.runner.kv_offload.flush()
    llm = LLM(base, **kw)
    for name, hit in (("attn", False), (None, False), ("rs", True)):
        out = llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=loras.get(name))[0]
        assert (out.num_cached_tokens > 0) == hit, name
        assert out.outputs[0].token_ids == refs[name][6][0]


@pytest.mark.parametrize("first, then", [(dict(lora_target_modules=["o_proj"]), {}),
                                         (dict(lora_dtype="bfloat16"), {})])
def test_disk_tier_keys_on_how_adapters_apply(setup, tmp_path, first, then):
    """The disk tier outlives the engine: blocks an adapter computed under --lora-target-modules o_proj (its q/k/v
    weights not applied) or --lora-dtype bfloat16 are other KV than the same adapter's under a restart without
    them. They were taken (same adapter files, same model): the restart's answers were not the adapter's."""
    from pagedllm.runner.kv_cache import bytes_per_block
    base, loras, refs = setup
    prompt = PROMPTS[6]   # 48 tokens: 3 full blocks
    block_bytes = bytes_per_block(2, 16, 2, 16, torch.float32)
    kw = dict(dtype="float32", log_stats_interval=0, enable_lora=True, num_gpu_blocks_override=8,
              kv_offloading_size=4 * block_bytes / 2**30, kv_disk_dir=str(tmp_path / "kv"))
    llm = LLM(base, **kw, **first)
    llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=loras["attn"])
    for p in np.random.default_rng(1).integers(3, 512, size=(6, 48)).tolist():   # its blocks pushed to disk
        llm.generate([p], GREEDY, use_tqdm=False)
    llm.engine.runner.kv_offload.flush()
    out = LLM(base, **kw, **then).generate([prompt], GREEDY, use_tqdm=False, lora_request=loras["attn"])[0]
    assert out.outputs[0].token_ids == refs["attn"][6][0]
    assert out.num_cached_tokens == 0


def test_load_inplace_reads_the_adapter_again(setup, tmp_path):
    """vLLM's LoRARequest(load_inplace=True): the adapter loaded under that id is read again (its files rewritten
    at the same path, or another path); without it the loaded one serves, as vLLM's. Was a TypeError."""
    import shutil
    base, loras, refs = setup
    path = tmp_path / "adapter"
    shutil.copytree(loras["attn"].lora_path, path)
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)

    def tokens(req):
        return llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=req)[0].outputs[0].token_ids
    assert tokens(LoRARequest("x", 7, str(path))) == refs["attn"][0][0]
    shutil.rmtree(path)
    shutil.copytree(loras["rs"].lora_path, path)   # retrained in place
    assert tokens(LoRARequest("x", 7, str(path))) == refs["attn"][0][0]
    assert tokens(LoRARequest("x", 7, str(path), load_inplace=True)) == refs["rs"][0][0]
    assert tokens(LoRARequest("x", 7, loras["all"].lora_path, load_inplace=True)) == refs["all"][0][0]
    assert llm.engine.list_loras() == {7}
    engine = llm.engine   # refused while a request runs under it: its KV would mix two adapters
    engine.add_request("r", PROMPTS[1], GREEDY, lora_request=LoRARequest("x", 7, loras["all"].lora_path))
    with pytest.raises(ValueError, match="load_inplace while unfinished requests run under lora_int_id 7"):
        engine.add_lora(LoRARequest("x", 7, str(path), load_inplace=True))
    while engine.has_unfinished_requests():
        engine.step()


def test_pin_lora_keeps_an_adapter_on_the_host(setup):
    """vLLM's LLMEngine.pin_lora / AsyncLLM.pin_lora (an AttributeError here): a pinned adapter is never evicted
    by the host LRU (max_cpu_loras); pinning one that is not loaded is a ValueError; remove_lora still removes it."""
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=1, max_cpu_loras=1)
    engine = llm.llm_engine
    assert engine.add_lora(loras["rs"]) and engine.pin_lora(1)
    engine.add_lora(loras["attn"])
    engine.add_lora(loras["all"])
    assert engine.list_loras() == {1, 3}   # 2 was evicted, not the pinned 1
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=[loras["rs"], loras["attn"]])
    assert [o.outputs[0].token_ids for o in outs] == [refs["rs"][0][0], refs["attn"][1][0]]
    assert 1 in engine.list_loras()
    with pytest.raises(ValueError, match="LoRA 9 is not loaded"):
        engine.pin_lora(9)
    assert engine.remove_lora(1) and 1 not in engine.list_loras()


def test_adapter_placed_by_layers_and_exclusions_matches_peft(setup, tmp_path):
    """layers_to_transform, exclude_modules, and a target_modules name this model lacks only choose where PEFT put
    the adapter: its tensors say where, as vLLM reads them (each was refused here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = setup[0]
    path = make_adapter(base, tmp_path / "placed", 5, r=4, lora_alpha=8, layers_to_transform=[1],
                        target_modules=["q_proj", "v_proj", "down_proj", "query_key_value"],
                        exclude_modules=["down_proj"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    outs = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False, lora_request=LoRARequest("placed", 1, path))
    differ = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = [model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()]
        assert out.outputs[0].token_ids == ids[0]
        differ += ids[0] != plain.generate(input_ids=torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                           pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert differ   # the adapter changes the answers


def test_target_modules_null_is_taken_as_vllms(setup, tmp_path):
    """vLLM requires adapter_config.json's target_modules key but takes null (its tensors say where the adapter is):
    it was refused here. A missing key is refused, as vLLM's, naming it."""
    base, loras, refs = setup
    src = __import__("pathlib").Path(loras["attn"].lora_path)
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    null = _bad(tmp_path, src, lambda c: c.update(target_modules=None))
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("null", 1, null))
    assert out[0].outputs[0].token_ids == refs["attn"][0][0]
    (tmp_path / "m").mkdir()
    missing = _bad(tmp_path / "m", src, lambda c: c.pop("target_modules"))
    with pytest.raises(ValueError, match="target_modules is missing from adapter_config.json"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("missing", 2, missing))


def test_adapter_saved_as_pytorch_bin(setup, tmp_path):
    """PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin, which vLLM reads (as
    adapter_model.pt); here 'adapter_model.safetensors not found'. Read with weights_only: tensors, no code."""
    import shutil
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    for i, name in enumerate(("adapter_model.bin", "adapter_model.pt")):
        d = tmp_path / name
        shutil.copytree(loras["attn"].lora_path, d)
        torch.save(load_file(str(d / "adapter_model.safetensors")), d / name)
        (d / "adapter_model.safetensors").unlink()
        out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest(name, i + 1, str(d)))
        assert out[0].outputs[0].token_ids == refs["attn"][0][0]
    d = tmp_path / "code"
    shutil.copytree(loras["attn"].lora_path, d)
    (d / "adapter_model.safetensors").unlink()
    torch.save({"a": object()}, d / "adapter_model.bin")   # not tensors: weights_only refuses to unpickle it
    with pytest.raises(ValueError, match="adapter_model.bin cannot be read as a dict of tensors"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("code", 9, str(d)))


def test_lora_path_with_tilde_and_hub_ids(setup, tmp_path, monkeypatch):
    """vLLM expands a lora_path starting with '~' (here it was read as a directory named '~'); a Hub id, which
    vLLM downloads, is refused saying how to fetch it. No adapter there is vLLM's LoRAAdapterNotFoundError."""
    import shutil
    from pagedllm.lora.request import LoRAAdapterNotFoundError
    base, loras, refs = setup
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(loras["attn"].lora_path, tmp_path / "adapters" / "attn")
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("attn", 1, "~/adapters/attn"))
    assert out[0].outputs[0].token_ids == refs["attn"][0][0]
    with pytest.raises(LoRAAdapterNotFoundError, match="hf download someone/sql-lora --local-dir DIR"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("sql", 2, "someone/sql-lora"))


def test_lora_dtype_sets_the_slots_dtype(setup):
    """vLLM's lora_dtype: the adapters in bfloat16 under a float32 model (auto: the model's dtype)."""
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, lora_dtype="bfloat16")
    layers = llm.engine.runner.lora.layers.values()
    assert {layer.lora_a.dtype for layer in layers} == {layer.lora_b.dtype for layer in layers} == {torch.bfloat16}
    out = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False, lora_request=loras["rs"])
    same = sum(o.outputs[0].token_ids == refs["rs"][i][0] for i, o in enumerate(out))
    assert same >= 3   # bfloat16 adapters: greedy tokens of float32 PEFT but for a near tie
    auto = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True).engine.runner.lora.layers.values()
    assert {layer.lora_a.dtype for layer in auto} == {torch.float32}


def test_lora_target_modules_applies_adapters_there_alone(setup, tmp_path, caplog):
    """vLLM's lora_target_modules: only those linears take adapters; an adapter's weights elsewhere are not applied
    (logged): the same tokens as the adapter cut down to those modules."""
    import logging
    base, loras, refs = setup
    only_o = _bad(tmp_path, __import__("pathlib").Path(loras["attn"].lora_path),
                  edit_tensors=lambda t: {k: v for k, v in t.items() if ".o_proj." in k})
    want = [o.outputs[0].token_ids for o in LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True).generate(
        PROMPTS[:4], GREEDY, use_tqdm=False, lora_request=LoRARequest("o", 1, only_o))]
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, lora_target_modules=["o_proj"])
    assert sorted({n.rsplit(".", 1)[1] for n in llm.engine.runner.lora.layers}) == ["o_proj"]
    with caplog.at_level(logging.WARNING, logger="pagedllm"):
        got = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False, lora_request=loras["attn"])
    assert [o.outputs[0].token_ids for o in got] == want
    assert want != [refs["attn"][i][0] for i in range(4)] and want != [refs[None][i][0] for i in range(4)]
    assert "its weights on ['qkv_proj'] are not applied: --lora-target-modules o_proj" in caplog.text


def test_embedding_adapters_and_bad_configs_are_named(setup, tmp_path):
    """LoRA on embed_tokens / lm_head (vLLM serves both; not built here) is refused naming the module, not as a
    module 'the model lacks'; an adapter_config.json that is no JSON object names the file (it was a bare
    JSONDecodeError or AttributeError through LLM.generate)."""
    import shutil
    base, loras, refs = setup
    llm = LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True)
    embed = make_adapter(base, tmp_path / "embed", 3, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(ValueError, match="targets model.embed_tokens, which vLLM serves LoRA on but pagedllm"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("embed", 1, embed))
    for i, (text, match) in enumerate((("{not json", "adapter_config.json is not valid JSON"),
                                       ("[1, 2]", "adapter_config.json must hold a JSON object, got list"))):
        d = tmp_path / f"cfg{i}"
        shutil.copytree(loras["attn"].lora_path, d)
        (d / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match=match):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest(f"cfg{i}", 2 + i, str(d)))
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=loras["attn"])   # the engine runs on
    assert out[0].outputs[0].token_ids == refs["attn"][0][0]
