"""A script written for vLLM's LLM(...), run here: each vLLM argument is taken with vLLM's meaning, or refused
naming it and why; none is an unexpected-keyword TypeError."""
import pytest

from pagedllm import LLM
from pagedllm.vllm_flags import check_vllm_kwargs


def test_vllms_usual_llm_arguments_are_taken():
    llm = LLM(trust_remote_code=True, revision=None, tokenizer_revision="main", download_dir="/tmp/models",
              tokenizer_mode="auto", hf_token=True, pipeline_parallel_size=1, enable_chunked_prefill=True,
              max_logprobs=20, runner="generate", limit_mm_per_prompt={"image": 0}, allowed_local_media_path="",
              structured_outputs_config={"backend": "xgrammar"}, kv_cache_memory_bytes=2**20, device="cpu")
    assert llm.engine.config.kv_cache_memory == 2**20


def test_the_rest_of_vllms_named_llm_arguments_are_taken_or_refused_naming_them(tmp_path):
    """vLLM 0.26's LLM(...) names these in its signature: each was an EngineConfig TypeError here, even at its
    default. spec_method / spec_model / spec_tokens fill speculative_config (vLLM's aliases); chat_template is
    chat()'s template where a call gives none (a file or the text)."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    llm = LLM(device="cpu", chat_template=str(template), offload_group_size=0, offload_num_in_group=1,
              offload_prefetch_step=1, offload_params=set(), profiler_config=None, quantization_config=None,
              spec_method="ngram", spec_tokens=2)
    spec = llm.engine.config.speculative
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 2)
    [out] = llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
    assert out.prompt == "[hi]"
    [out] = llm.chat([{"role": "user", "content": "hi"}], chat_template="<{{ messages[0]['content'] }}>",
                     use_tqdm=False)
    assert out.prompt == "<hi>"
    with pytest.raises(ValueError, match="spec_tokens must be left out where speculative_config gives "
                                         "num_speculative_tokens"):
        LLM(device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": 2}, spec_tokens=3)
    with pytest.raises(FileNotFoundError, match="chat_template 'chatml': no such file"):
        LLM(device="cpu", chat_template="chatml")
    for kwargs, words in (({"offload_group_size": 4}, "offloading model weights"),
                          ({"quantization_config": {"x": 1}}, "quantization")):
        with pytest.raises(ValueError, match=rf"LLM\({next(iter(kwargs))}=.*{words}"):
            check_vllm_kwargs(kwargs)


def test_statistics_log_lines_are_off_unless_asked_for_as_vllms_llm():
    assert LLM(device="cpu").engine.config.log_stats_interval == 0
    assert LLM(device="cpu", disable_log_stats=False).engine.config.log_stats_interval == 10.0
    assert LLM(device="cpu", log_stats_interval=5).engine.config.log_stats_interval == 5


@pytest.mark.parametrize("kwargs, words", [
    ({"pipeline_parallel_size": 2}, "pipeline parallelism"), ({"compilation_config": {"level": 3}}, "torch.compile"),
    ({"tokenizer_mode": "mistral"}, "mistral_common"), ({"limit_mm_per_prompt": {"image": 1}}, "multimodal"),
    ({"logits_processors": ["my.Processor"]}, "logits processor"), ({"pooler_config": {}}, "pooling"),
])
def test_vllm_arguments_not_built_here_are_refused_naming_them(kwargs, words):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"LLM\({name}=.*{words}"):
        check_vllm_kwargs(kwargs)


def test_an_unknown_argument_stays_a_type_error_naming_it():
    with pytest.raises(TypeError, match="no_such_arg"):
        LLM(no_such_arg=1, device="cpu")


@pytest.mark.parametrize("method", ["encode", "embed", "classify", "score", "reward"])
def test_vllms_pooling_methods_are_refused_naming_them(method):
    """They were AttributeErrors; vLLM answers them on a generative model with a ValueError too."""
    llm = LLM.__new__(LLM)   # no engine is needed to refuse
    with pytest.raises(ValueError, match=rf"LLM\.{method}\(\) needs a pooling model"):
        getattr(llm, method)(["a"], ["b"]) if method == "score" else getattr(llm, method)("a")


def test_tokenization_and_processor_kwargs_are_taken_empty_and_refused_otherwise():
    """vLLM 0.26's generate(tokenization_kwargs=) and chat(tokenization_kwargs=, mm_processor_kwargs=) were
    unexpected-keyword TypeErrors."""
    from pagedllm import SamplingParams
    llm = LLM(device="cpu")
    params = SamplingParams(max_tokens=2, temperature=0)
    assert llm.generate("Once", params, use_tqdm=False, tokenization_kwargs={})[0].finished
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert llm.chat([{"role": "user", "content": "Hi"}], params, use_tqdm=False, chat_template=template,
                    tokenization_kwargs=None, mm_processor_kwargs=None)[0].finished
    with pytest.raises(ValueError, match="tokenization_kwargs .*'padding'.*truncate_prompt_tokens"):
        llm.generate("Once", params, use_tqdm=False, tokenization_kwargs={"padding": "max_length"})
    with pytest.raises(ValueError, match="mm_processor_kwargs .*multimodal"):
        llm.chat([{"role": "user", "content": "Hi"}], params, chat_template=template, mm_processor_kwargs={"a": 1})


def test_vllms_old_rope_arguments_are_hf_overrides_keys_as_their_flags():
    """LLM(rope_theta=..., rope_scaling=...) (vLLM's, before hf_overrides took them) was an unexpected-keyword
    TypeError; --rope-theta / --rope-scaling were already --hf-overrides keys."""
    scaling = {"rope_type": "linear", "factor": 2.0}
    _, rest = check_vllm_kwargs({"rope_theta": 1e6, "rope_scaling": scaling})
    assert rest == {"hf_overrides": {"rope_theta": 1e6, "rope_scaling": scaling}}
    _, rest = check_vllm_kwargs({"rope_theta": 1e6, "hf_overrides": '{"max_position_embeddings": 4096, '
                                                                    '"rope_theta": 1.0}'})
    assert rest == {"hf_overrides": {"max_position_embeddings": 4096, "rope_theta": 1e6}}
    assert check_vllm_kwargs({"rope_theta": None, "rope_scaling": None})[1] == {}
    llm = LLM(device="cpu", rope_theta=12345.0, hf_overrides={"max_position_embeddings": 256})
    assert llm.engine.config.hf_overrides == {"max_position_embeddings": 256, "rope_theta": 12345.0}


def test_vllms_llm_engine_attribute_is_the_engine_with_vllms_names_or_says_what_instead():
    """llm.llm_engine (vLLM's LLM attribute) was an AttributeError; so was its get_tokenizer(). Its model_config
    is test_vllm_config_views.py's; get_model_config() is not vLLM 0.26's either (its V0 engine's)."""
    llm = LLM(device="cpu")
    assert llm.llm_engine is llm.engine and llm.llm_engine.get_tokenizer() is llm.get_tokenizer()
    assert llm.llm_engine.model_config.max_model_len == llm.engine.max_model_len
    with pytest.raises(AttributeError, match="no attribute 'get_model_config'$"):
        llm.llm_engine.get_model_config()
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'$"):
        llm.engine.no_such_name


@pytest.mark.parametrize("method, words", [("collective_rpc", "llm.engine.runner"),
                                           ("get_metrics", "llm.engine.get_stats")])
def test_vllms_llm_methods_not_built_say_why(method, words):
    llm = LLM.__new__(LLM)   # no engine is needed to refuse
    with pytest.raises(NotImplementedError, match=rf"LLM\.{method}\(\), vLLM's: .*{words}"):
        getattr(llm, method)("x") if method == "collective_rpc" else getattr(llm, method)()


def test_logprobs_mode_is_vllms_default_raw_logprobs_or_refused_naming_it():
    """Was an EngineConfig TypeError; a processed or logits mode would have to change what logprobs hold."""
    assert check_vllm_kwargs({"logprobs_mode": "raw_logprobs", "use_fp64_gumbel": False}) == ({}, {})
    for mode in ("processed_logprobs", "raw_logits", "processed_logits"):
        with pytest.raises(ValueError, match=rf"LLM\(logprobs_mode='{mode}'\): .*raw_logprobs"):
            check_vllm_kwargs({"logprobs_mode": mode})
    with pytest.raises(ValueError, match=r"LLM\(use_fp64_gumbel=True\): .*float32"):
        check_vllm_kwargs({"use_fp64_gumbel": True})
