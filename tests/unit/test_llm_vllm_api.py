"""LLM's methods called as a script written for vLLM 0.26's LLM calls them: the same parameters, in the same
positions, with the same meaning; or a clear error naming what is not built and why."""
import dataclasses

import pytest

from pagedllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=3)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_chat_parameters_by_position_mean_what_they_mean_in_vllm(llm):
    """vLLM's order: ..., chat_template, chat_template_content_format, add_generation_prompt, continue_final_message,
    tools, chat_template_kwargs. Here chat_template_content_format was keyword-only and tools came after
    chat_template_kwargs: by position, "string" became add_generation_prompt and the tools the template variables."""
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if tools %}T{{ tools | length }}{% endif %}"
                "{{ greeting }}{% if add_generation_prompt %}>{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    [out] = llm.chat(messages, GREEDY, False, None, template, "string", True, False, TOOLS, {"greeting": "G"})
    assert out.prompt == "hiT1G>"
    [out] = llm.chat(messages, GREEDY, False, None, template, "string", False, True, None, None)
    assert out.prompt == "hi"


def test_wait_for_completion_takes_vllms_output_type_first(llm):
    """vLLM's wait_for_completion(output_type=None, *, use_tqdm=True): wait_for_completion(RequestOutput) made the
    class the progress bar's factory (a TypeError from inside tqdm's call), and with use_tqdm= it was a 'multiple
    values' TypeError."""
    from pagedllm import RequestOutput
    llm.enqueue("Once", GREEDY)
    [out] = llm.wait_for_completion(RequestOutput, use_tqdm=False)
    assert out.finished and out.outputs[0].text == " upon a time"
    llm.enqueue("Once", GREEDY)
    assert [o.outputs[0].text for o in llm.wait_for_completion(RequestOutput)] == [" upon a time"]
    llm.enqueue("Once", GREEDY)
    assert len(llm.wait_for_completion((RequestOutput, dict), use_tqdm=False)) == 1
    for wrong in (dict, False, "RequestOutput"):
        with pytest.raises(TypeError, match="output_type must be RequestOutput .*use_tqdm is keyword-only"):
            llm.wait_for_completion(wrong)
    assert not llm.engine.has_unfinished_requests()


def test_generate_takes_mm_processor_kwargs_empty_and_refuses_others(llm):
    """vLLM 0.26's generate(mm_processor_kwargs=) was an unexpected-keyword TypeError (chat() already took it)."""
    assert llm.generate("Once", GREEDY, use_tqdm=False, mm_processor_kwargs=None)[0].finished
    assert llm.generate("Once", GREEDY, use_tqdm=False, mm_processor_kwargs={})[0].finished
    with pytest.raises(ValueError, match=r"mm_processor_kwargs \['num_crops'\] is not built here: multimodal"):
        llm.generate("Once", GREEDY, use_tqdm=False, mm_processor_kwargs={"num_crops": 4})
    assert not llm.engine.has_unfinished_requests()


def test_enqueue_takes_vllms_parameters(llm, capsys):
    """vLLM 0.26's enqueue(prompts, sampling_params, lora_request, priority, use_tqdm, tokenization_kwargs,
    mm_processor_kwargs): the last three were unexpected-keyword TypeErrors. use_tqdm: a bar of the requests
    added; the overrides as generate()'s."""
    ids = llm.enqueue(["Once", "Lily"], GREEDY, None, [0, 0], False, {}, None)
    assert len(ids) == 2 and "Adding requests" not in capsys.readouterr().err
    llm.enqueue("Once", GREEDY, use_tqdm=True)
    assert "Adding requests" in capsys.readouterr().err
    for name in ("tokenization_kwargs", "mm_processor_kwargs"):
        with pytest.raises(ValueError, match=rf"{name} \['padding'\] is not built here"):
            llm.enqueue("Once", GREEDY, **{name: {"padding": "max_length"}})
    assert [o.outputs[0].text for o in llm.wait_for_completion(use_tqdm=False)] == [" upon a time", " and Tom",
                                                                                     " upon a time"]


def test_enqueue_chat_adds_conversations_as_chat_renders_them(llm):
    """vLLM 0.26's LLM.enqueue_chat was an AttributeError: conversations rendered as chat() renders them, added
    as enqueue() adds prompts, in vLLM's parameter order (priority after lora_request)."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conversations = [[{"role": "user", "content": "Once"}], [{"role": "user", "content": "Lily"}]]
    ids = llm.enqueue_chat(conversations, GREEDY, False, None, [0, 0], template, "string")
    assert len(ids) == 2 and llm.engine.has_unfinished_requests()
    queued = llm.wait_for_completion(use_tqdm=False)
    direct = llm.chat(conversations, GREEDY, False, chat_template=template)
    assert [o.prompt for o in queued] == ["Once", "Lily"]
    assert [o.outputs[0].text for o in queued] == [o.outputs[0].text for o in direct]
    with pytest.raises(ValueError, match="priority has 1 entries for 2 prompts"):
        llm.enqueue_chat(conversations, GREEDY, priority=[0], chat_template=template)
    assert not llm.engine.has_unfinished_requests()


def test_reset_prefix_cache_takes_vllms_arguments(llm):
    """vLLM 0.26's reset_prefix_cache(reset_running_requests=False, reset_connector=False): both were TypeErrors.
    A request holding blocks (added through llm.engine) is not preempted: asked to, the call says so."""
    assert llm.reset_prefix_cache(True, True) and llm.reset_prefix_cache(reset_running_requests=False,
                                                                         reset_connector=False)
    llm.engine.add_request("held", "Once upon a time", SamplingParams(max_tokens=50, ignore_eos=True))
    llm.engine.step()
    try:
        assert llm.reset_prefix_cache() is False
        with pytest.raises(NotImplementedError, match="reset_running_requests=True.*requests still hold KV blocks"):
            llm.reset_prefix_cache(reset_running_requests=True)
    finally:
        llm.engine.abort_request("held")
    assert llm.reset_prefix_cache(reset_running_requests=True)


def test_beam_search_takes_vllms_concurrency_limit(llm):
    """vLLM 0.26's beam_search(..., concurrency_limit=): the most prompts searched at once. It was an
    unexpected-keyword TypeError; the groups give the beams searching all prompts together gives."""
    from pagedllm import BeamSearchParams
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    prompts = ["Once", "Lily", "The dog"]
    beams = lambda outs: [[(s.tokens, round(s.cum_logprob, 4)) for s in o.sequences] for o in outs]  # noqa: E731
    together = beams(llm.beam_search(prompts, params))
    peak_together = llm.last_beam_search_blocks[0]
    assert beams(llm.beam_search(prompts, params, None, False, 1)) == together
    assert llm.last_beam_search_blocks[0] < peak_together   # one prompt's beams at a time hold fewer blocks
    assert beams(llm.beam_search(prompts, params, concurrency_limit=2)) == together
    for wrong in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="concurrency_limit must be an integer >= 1 or None"):
            llm.beam_search(prompts, params, concurrency_limit=wrong)
    assert not llm.engine.has_unfinished_requests() and llm.engine.core.kv_cache_manager.num_used_blocks == 0


def test_beam_search_params_take_vllms_structured_outputs_field_and_refuse_a_grammar():
    """vLLM 0.26's BeamSearchParams has structured_outputs (beams constrained by a grammar): here it was an
    unexpected-keyword TypeError; None is taken, a grammar refused naming it and what does follow one."""
    from pagedllm import BeamSearchParams
    from pagedllm.sampling_params import StructuredOutputsParams
    assert BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs=None).structured_outputs is None
    with pytest.raises(ValueError, match=r"BeamSearchParams.structured_outputs is not built.*generate\(\)"):
        BeamSearchParams(beam_width=2, max_tokens=4, structured_outputs=StructuredOutputsParams(regex="a+"))


def test_a_dict_prompts_cache_salt_keeps_its_cached_blocks_to_its_salt(llm):
    """vLLM's TextPrompt / TokensPrompt "cache_salt": only requests of the same salt share cached blocks. It was
    refused as an unknown key ("multi-modal inputs are not supported"); generate() and beam_search() take it."""
    from pagedllm import BeamSearchParams
    text = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
            "friends every day.")   # 39 tokens: 2 full blocks of 16
    cached = lambda prompt: llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens  # noqa: E731
    assert llm.reset_prefix_cache()
    assert cached({"prompt": text, "cache_salt": "a"}) == 0
    assert cached({"prompt": text, "cache_salt": "a"}) == 32
    assert cached({"prompt_token_ids": llm.get_tokenizer().encode(text), "cache_salt": "a"}) == 32
    assert cached({"prompt": text, "cache_salt": "b"}) == 0 and cached(text) == 0
    assert cached({"prompt": text, "cache_salt": ""}) == 32   # empty: no salt (vLLM's), as the plain prompt
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    [salted] = llm.beam_search([{"prompt": text, "cache_salt": "c"}], params)
    [plain] = llm.beam_search([text], params)
    assert [s.tokens for s in salted.sequences] == [s.tokens for s in plain.sequences]
    assert cached({"prompt": text, "cache_salt": "c"}) == 32 and cached({"prompt": text, "cache_salt": "d"}) == 0
    with pytest.raises(ValueError, match="a dict prompt's 'cache_salt' must be a string, got int"):
        llm.generate({"prompt": text, "cache_salt": 5}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="a dict prompt's 'cache_salt' must be a string, got int"):
        llm.beam_search([{"prompt": text, "cache_salt": 5}], params)


def test_vllms_world_size_mm_cache_and_apply_model(llm):
    """vLLM 0.26's get_world_size(include_dp=True), reset_mm_cache() and apply_model(func) were AttributeErrors."""
    from types import SimpleNamespace
    assert llm.get_world_size() == llm.get_world_size(include_dp=False) == 1
    assert llm.reset_mm_cache() is None
    assert llm.apply_model(lambda model: type(model).__name__) == ["LlamaForCausalLM"]
    split = LLM.__new__(LLM)   # ranks in other processes: not reached, said so
    split.engine = SimpleNamespace(config=SimpleNamespace(tensor_parallel_size=2))
    with pytest.raises(NotImplementedError, match=r"LLM\.apply_model\(\), vLLM's: calls on every worker"):
        split.apply_model(lambda model: 1)


@pytest.mark.parametrize("method", ["init_weight_transfer_engine", "start_weight_update", "start_draft_weight_update",
                                    "update_weights", "finish_weight_update"])
def test_vllms_weight_transfer_methods_say_they_are_not_built(method):
    """vLLM 0.26's in-place weight updates (RL training) were bare AttributeErrors."""
    llm = LLM.__new__(LLM)   # no engine is needed to refuse
    args = ({"update_info": {}},) if method in ("init_weight_transfer_engine", "update_weights") else ()
    with pytest.raises(NotImplementedError, match=rf"LLM\.{method}\(\), vLLM's: .*weight transfer.*new LLM"):
        getattr(llm, method)(*args)


def test_vllms_prompt_types_are_importable_and_taken(llm):
    """`from vllm import TextPrompt, TokensPrompt` had no pagedllm counterpart (an ImportError)."""
    from pagedllm import TextPrompt, TokensPrompt
    ids = llm.get_tokenizer().encode("Once")
    outs = llm.generate([TextPrompt(prompt="Once"), TokensPrompt(prompt_token_ids=ids, prompt="Once")], GREEDY,
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["Once", "Once"]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_tokenization_kwargs_truncate_and_leave_out_special_tokens_as_vllms(llm):
    """vLLM 0.26 truncates a prompt through tokenization_kwargs (its SamplingParams has no truncate_prompt_tokens
    any more) and leaves the BOS out with add_special_tokens=False: both were refused here."""
    tok = llm.get_tokenizer()
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    out = lambda prompt, kw: llm.generate(prompt, GREEDY, use_tqdm=False, tokenization_kwargs=kw)[0]  # noqa: E731
    assert out(text, {"truncate_prompt_tokens": 5}).prompt_token_ids == [ids[0]] + ids[-4:]   # the BOS kept
    assert out(ids, {"truncate_prompt_tokens": 5}).prompt_token_ids == ids[-5:]
    assert out(ids, {"truncate_prompt_tokens": 5, "truncation_side": "right"}).prompt_token_ids == ids[:5]
    assert out(text, {"truncate_prompt_tokens": None}).prompt_token_ids == ids   # None: unset (vLLM's)
    plain = out(text, {"add_special_tokens": False})
    assert plain.prompt_token_ids == ids[1:] and plain.prompt == text
    salted = out({"prompt": text, "cache_salt": "s"}, {"add_special_tokens": False, "truncate_prompt_tokens": 3})
    assert salted.prompt_token_ids == ids[-3:]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    [chat] = llm.chat([{"role": "user", "content": text}], GREEDY, False, chat_template=template,
                      tokenization_kwargs={"add_special_tokens": True, "truncate_prompt_tokens": 4})
    assert chat.prompt_token_ids == [ids[0]] + ids[-3:]
    with pytest.raises(ValueError, match="tokenization_kwargs: SamplingParams.truncate_prompt_tokens must be"):
        out(text, {"truncate_prompt_tokens": 0})
    with pytest.raises(ValueError, match="tokenization_kwargs: add_special_tokens must be a bool"):
        out(text, {"add_special_tokens": "no"})
    assert not llm.engine.has_unfinished_requests()


def test_tokenization_kwargs_cut_a_text_as_the_server_does(llm):
    """vLLM 0.26 offline (TokenizeParams.with_kwargs) as its server: without a side the tokenizer truncates, and
    the BOS it adds stays; with truncation_side given the encoded tokens are cut from that side, BOS and all.
    transformers' truncation and max_length say the same as truncate_prompt_tokens. Here a side given still kept
    the BOS, and truncation / max_length were refused."""
    tok = llm.get_tokenizer()
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    out = lambda kw: llm.generate(text, GREEDY, use_tqdm=False, tokenization_kwargs=kw)[0].prompt_token_ids  # noqa
    assert out({"truncate_prompt_tokens": 5, "truncation_side": "left"}) == ids[-5:]   # the BOS cut with the left
    assert out({"truncate_prompt_tokens": 5, "truncation_side": "right"}) == ids[:5]
    assert out({"truncation_side": "left", "truncation": True, "max_length": 5}) == ids[-5:]
    assert out({"truncation": True, "max_length": 5}) == [ids[0]] + ids[-4:]
    assert out({"truncation": "longest_first", "max_length": 5}) == [ids[0]] + ids[-4:]
    assert out({"truncation": True}) == ids   # max_length unset: max_model_len
    assert out({"truncate_prompt_tokens": 5, "truncation": False}) == ids
    params = SamplingParams(temperature=0.0, max_tokens=2, truncate_prompt_tokens=5, truncation_side="left")
    assert llm.generate(text, params, use_tqdm=False)[0].prompt_token_ids == ids[-5:]
    assert not llm.engine.has_unfinished_requests()


def test_tokenization_kwargs_max_length_alone_limits_the_prompts_tokens(llm):
    """vLLM 0.26's TokenizeParams.with_kwargs: max_length without truncation is the most input tokens a prompt may
    have (max_input_tokens; its length check comes after any truncation), text or token ids; truncate_prompt_tokens
    may not be more, and its -1 means max_length. Here max_length alone was refused whatever the prompt."""
    tok = llm.get_tokenizer()
    text = "Once upon a time, there was a little girl named Lily."
    ids, n = tok.encode(text), len(tok.encode(text))
    out = lambda prompt, kw: llm.generate(prompt, GREEDY, use_tqdm=False, tokenization_kwargs=kw)[0]  # noqa: E731
    assert out(text, {"max_length": n}).prompt_token_ids == ids
    assert out(ids, {"max_length": n}).prompt_token_ids == ids
    no_bos = out({"prompt": text}, {"max_length": n - 1, "add_special_tokens": False})
    assert no_bos.prompt_token_ids == ids[1:] and no_bos.prompt == text
    for prompt, kw in [(text, {}), (ids, {}), ({"prompt": text}, {}), ({"prompt_token_ids": ids}, {}),
                       (text, {"truncation": False}), (text, {"truncation": "do_not_truncate"})]:
        with pytest.raises(ValueError, match=rf"tokenization_kwargs: the prompt has {n} tokens, more than "
                                             rf"max_length \({n - 1}\)"):
            out(prompt, {"max_length": n - 1, **kw})
    assert out(text, {"max_length": 5, "truncate_prompt_tokens": 5}).prompt_token_ids == [ids[0]] + ids[-4:]
    assert out(text, {"max_length": 5, "truncate_prompt_tokens": -1}).prompt_token_ids == [ids[0]] + ids[-4:]
    assert out(ids, {"max_length": 5, "truncate_prompt_tokens": 3}).prompt_token_ids == ids[-3:]
    with pytest.raises(ValueError, match=r"tokenization_kwargs: truncate_prompt_tokens \(6\) must be at most "
                                         r"max_length \(5\)"):
        out(text, {"max_length": 5, "truncate_prompt_tokens": 6})
    for bad in (0, -1, "5", True, 5.0):
        with pytest.raises(ValueError, match="tokenization_kwargs: max_length must be a positive integer"):
            out(text, {"max_length": bad})
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("truncation", ["only_first", "only_second", "yes", 2])
def test_tokenization_kwargs_other_truncation_values_are_refused(llm, truncation):
    """vLLM 0.26's with_kwargs warns that such a truncation is not supported and ignores it (a falsy one, 0 or "",
    without a word). Here it is refused, naming the values taken, as an unknown key is: a script that asked to
    truncate is told it did not, rather than running on an uncut prompt."""
    with pytest.raises(ValueError, match="tokenization_kwargs: truncation must be True, False, 'longest_first' or "
                                         "'do_not_truncate'"):
        llm.generate("Once", GREEDY, use_tqdm=False, tokenization_kwargs={"truncation": truncation, "max_length": 5})
    assert not llm.engine.has_unfinished_requests()


def test_a_dict_prompts_empty_multimodal_keys_are_taken(llm):
    """vLLM's TextPrompt may carry multi_modal_data=None (a script building its prompts one way for every
    model): an empty multimodal key was refused; a non-empty one still is, by name."""
    [out] = llm.generate({"prompt": "Once", "multi_modal_data": None, "mm_processor_kwargs": {}}, GREEDY,
                         use_tqdm=False)
    assert out.outputs[0].text == " upon a time"
    with pytest.raises(ValueError, match=r"multi-modal inputs are not supported\), got \['multi_modal_data'\]"):
        llm.generate({"prompt": "Once", "multi_modal_data": {"image": object()}}, GREEDY, use_tqdm=False)


def test_max_tokens_past_the_context_ends_the_output_at_max_model_len():
    """vLLM's engine takes a prompt that leaves room for any output and ends it at max_model_len ("length"); a
    max_tokens past that room failed the whole generate() call here, the other prompts' outputs too."""
    llm = LLM(device="cpu", max_model_len=64)
    ids = llm.get_tokenizer().encode("Once upon a time")
    short, full = llm.generate([{"prompt_token_ids": ids}, {"prompt_token_ids": ids}],
                               [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                                SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)], use_tqdm=False)
    assert len(full.outputs[0].token_ids) == 64 - len(ids) and full.outputs[0].finish_reason == "length"
    assert full.outputs[0].token_ids[:5] == short.outputs[0].token_ids
    [last] = llm.generate({"prompt_token_ids": [1] + [7] * 62}, SamplingParams(max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    assert len(last.outputs[0].token_ids) == 1 and last.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"prompt \(64 tokens\) leaves no room .* max_model_len \(64\)"):
        llm.generate({"prompt_token_ids": [1] + [7] * 63}, use_tqdm=False)


def test_llm_engine_add_request_takes_vllms_parameters_and_output_kind(llm):
    """vLLM's LLMEngine.add_request(request_id, prompt, params, arrival_time, lora_request, tokenization_kwargs,
    trace_headers, priority, prompt_text) returning the id; step() gives an output every step unless
    params.output_kind is FINAL_ONLY. Here the 4th parameter was the output kind (a time.time() given there was
    taken as one, the arrival time lost), params.output_kind was not read (one output, at the end), and
    tokenization_kwargs / get_num_unfinished_requests() were a TypeError / an AttributeError."""
    import time

    from pagedllm.sampling_params import RequestOutputKind
    engine, prompt = llm.llm_engine, "Once upon a time"
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    arrival = time.time() - 100
    assert engine.add_request("c", prompt, params, arrival) == "c"
    assert engine.add_request("d", prompt, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)) == "d"
    assert engine.add_request("f", prompt, dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY),
                              None, None, {"truncate_prompt_tokens": 2}) == "f"
    assert engine.get_num_unfinished_requests() == 3
    seen = {"c": [], "d": [], "f": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert engine.get_num_unfinished_requests() == 0
    assert [o.outputs[0].token_ids for o in seen["c"]] == [want.token_ids[:i] for i in range(1, 5)]
    assert seen["c"][0].metrics.arrival_time == arrival
    assert [t for o in seen["d"] for t in o.outputs[0].token_ids] == want.token_ids and len(seen["d"]) == 4
    [final] = seen["f"]
    assert final.finished and len(final.prompt_token_ids) == 2
    with pytest.raises(TypeError, match="arrival_time must be a time.time"):
        engine.add_request("k", prompt, params, "kind")
    with pytest.raises(ValueError, match="tokenization_kwargs"):
        engine.add_request("k", prompt, params, tokenization_kwargs={"padding": True})
    assert not engine.has_unfinished_requests()


def test_beam_search_max_tokens_past_the_context_names_beam_search_params(llm):
    """LLM.beam_search's max_tokens past the context is refused naming BeamSearchParams.max_tokens, the field the
    caller set (it named SamplingParams.max_tokens, which the call has not)."""
    from pagedllm.beam_search import BeamSearchParams
    room = llm.engine.max_model_len - 3
    with pytest.raises(ValueError, match=rf"^BeamSearchParams\.max_tokens must be at most max_model_len "
                                         rf"\({llm.engine.max_model_len}\) - prompt length \(3\), got {room + 1}$"):
        llm.beam_search([[1, 5, 6]], BeamSearchParams(beam_width=2, max_tokens=room + 1))
