"""`vllm serve` command lines as vLLM's docs and model cards write them: each flag is taken and honoured, or
refused at start naming the flag and why. Parsing only: serve() is replaced, no model loads."""
import json

import pytest

import pagedllm.server.launch as launch
from pagedllm.cli import main
from pagedllm.config import DEMO_MODEL


@pytest.fixture
def serve_args(monkeypatch):
    """parse(*flags) -> (engine_config, server_config) of `pagedllm serve DEMO_MODEL *flags`."""
    started = []
    monkeypatch.setattr(launch, "serve", lambda engine, server: started.append((engine, server)))

    def parse(*flags):
        assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 0
        return started.pop()
    return parse


def test_underscored_flags_are_vllms_dashed_ones(serve_args):
    """Mistral's model cards write --tokenizer_mode, --max_model_len: vLLM's parser takes underscores."""
    engine, server = serve_args("--max_model_len", "2048", "--gpu_memory_utilization=0.5", "--enable_prefix_caching",
                                "--served_model_name", "m")
    assert (engine.max_model_len, engine.gpu_memory_utilization, server.served_model_name) == (2048, 0.5, ["m"])
    engine, _ = serve_args("--no_enable_prefix_caching", "--override_generation_config", '{"top_k": 5}')
    assert engine.enable_prefix_caching is False and engine.override_generation_config == {"top_k": 5}


def test_help_with_vllms_search_term_prints_the_help(capsys):
    """vLLM's --help=all (or --help=<group>) searches its help; here it prints the whole help."""
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help=all"])
    assert e.value.code == 0 and "--max-model-len" in capsys.readouterr().out


def test_vllms_short_flags_tp_and_q(serve_args):
    engine, _ = serve_args("-tp", "1", "-q", "fp8")
    assert (engine.tensor_parallel_size, engine.quantization) == (1, "fp8")


def test_vllms_short_flag_sc_is_the_speculative_config(serve_args):
    """vLLM's -sc (short for --speculative-config) was 'unrecognized arguments'."""
    engine, _ = serve_args("-sc", '{"method": "ngram", "num_speculative_tokens": 2}')
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 2}


def test_max_logprobs_is_an_engine_setting(serve_args):
    """Was refused past 20 (the bound was fixed)."""
    assert serve_args("--max-logprobs", "50")[0].max_logprobs == 50
    assert serve_args("--max-logprobs", "-1")[0].max_logprobs == -1
    assert serve_args()[0].max_logprobs == 20


def test_hf_overrides_is_an_engine_setting(serve_args):
    """Was refused at start (changing the model's config at load was not built)."""
    engine, _ = serve_args("--hf-overrides", '{"max_position_embeddings": 1024, "rope_scaling": {"factor": 2}}')
    assert engine.hf_overrides == {"max_position_embeddings": 1024, "rope_scaling": {"factor": 2}}
    assert main(["serve", DEMO_MODEL, "--hf-overrides", "[1]"]) == 2


def test_request_logs_are_a_server_setting(serve_args):
    """--enable-log-requests was refused and --max-log-len ignored; --disable-log-requests is vLLM's old inverse."""
    _, server = serve_args("--enable-log-requests", "--max-log-len", "100")
    assert (server.enable_log_requests, server.max_log_len) == (True, 100)
    assert serve_args()[1].enable_log_requests is False
    assert serve_args("--enable-log-requests", "--disable-log-requests")[1].enable_log_requests is False


def test_kv_cache_memory_bytes_is_vllms_name_with_its_human_readable_sizes(serve_args):
    assert serve_args("--kv-cache-memory-bytes", "1G")[0].kv_cache_memory == 2**30
    assert serve_args("--kv-cache-memory", "500m")[0].kv_cache_memory == 500 * 10**6
    assert serve_args("--kv-cache-memory", "1048576")[0].kv_cache_memory == 2**20


@pytest.mark.parametrize("flags", [
    ["--trust-remote-code"], ["--revision", "main", "--code-revision", "v1", "--download-dir", "/tmp/models"],
    ["--tokenizer-mode", "auto"], ["--config-format", "hf"], ["--pipeline-parallel-size", "1", "-dp", "1"],
    ["--enable-chunked-prefill"], ["--async-scheduling"], ["--disable-log-requests"],
    ["--no-enable-log-requests", "--max-log-len", "100"], ["--limit-mm-per-prompt", '{"image": 0, "video": 0}'],
    ["--limit-mm-per-prompt", "image=0"], ["--structured-outputs-config", '{"backend": "xgrammar"}'],
    ["--guided-decoding-backend", "auto"], ["--disable-custom-all-reduce"], ["--runner", "generate"],
])
def test_vllm_flags_whose_value_means_what_pagedllm_does_are_taken(serve_args, flags):
    serve_args(*flags)


def test_disable_log_stats_turns_the_statistics_lines_off(serve_args):
    assert serve_args("--disable-log-stats")[0].log_stats_interval == 0
    assert serve_args()[0].log_stats_interval > 0


@pytest.mark.parametrize("flags, words", [
    (["--tokenizer_mode", "mistral"], "--tokenizer-mode mistral: pagedllm loads the model's Hugging Face tokenizer"),
    (["-pp", "2"], "--pipeline-parallel-size 2: pipeline parallelism is not built"),
    (["--data-parallel-size", "4"], "--data-parallel-size 4: data parallelism is not built"),
    (["--no-enable-chunked-prefill"], "--no-enable-chunked-prefill: a prompt longer than a step's token budget"),
    (["--enable-log-outputs"], "--enable-log-outputs: outputs are not logged here"),
    (["-O3"], "--optimization-level 3: pagedllm does not use torch.compile"),
    (["--compilation-config", '{"cudagraph_mode": "FULL"}'], "--compilation-config {\"cudagraph_mode\": \"FULL\"}: "),
    (["--cuda-graph-sizes", "1", "2"], "--cuda-graph-sizes 1 2: pagedllm does not use torch.compile"),
    (["--limit-mm-per-prompt", '{"image": 2}'], "--limit-mm-per-prompt {\"image\": 2}: multimodal inputs are not"),
    (["--structured-outputs-config", '{"backend": "guidance"}'], "structured output runs on xgrammar here"),
    (["--kv-transfer-config", "{}"], "--kv-transfer-config {}: moving KV between engines"),
    (["--disable-frontend-multiprocessing"], "the engine core always runs in its own process here"),
])
def test_vllm_flags_not_built_here_stop_the_start_naming_the_flag_and_why(serve_args, capsys, flags, words):
    """Were 'unrecognized arguments' (no why), or a start that ignored them."""
    assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err, err


def test_kv_offloading_flags_are_vllms_for_the_kv_cache_cpu_tier(serve_args, capsys):
    engine, _ = serve_args("--kv-offloading-size", "0.5", "--kv-offloading-backend", "native")
    assert (engine.kv_offloading_size, engine.kv_offloading_backend, engine.kv_tiers_enabled) == (0.5, "native", True)
    assert serve_args()[0].kv_offloading_size is None
    assert main(["serve", DEMO_MODEL, "--device", "cpu", "--kv-offloading-size", "0"]) == 2
    assert "kv_offloading_size must be > 0 GiB, or None (off), got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", DEMO_MODEL, "--kv-offloading-backend", "lmcache"])
    assert ("--kv-offloading-backend: invalid choice: 'lmcache' (choose from 'native'): vLLM's lmcache is not "
            "built" in capsys.readouterr().err)   # why, as LLM(kv_offloading_backend="lmcache") says


def test_cpu_offload_gb_is_vllms_weights_offload_and_is_refused(serve_args, capsys):
    """vLLM's --cpu-offload-gb keeps model weights in CPU memory; here it sized a CPU tier of the KV cache."""
    assert serve_args("--cpu-offload-gb", "0")[0].kv_offloading_size is None
    assert main(["serve", DEMO_MODEL, "--device", "cpu", "--cpu-offload-gb", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cpu_offload_gb must be 0: offloading model weights to CPU memory (vLLM's "
                          "--cpu-offload-gb) is not built; a CPU tier of the KV cache is kv_offloading_size "
                          "(--kv-offloading-size), got 20.0"), err


def test_swap_space_without_swap_preemption_is_refused_not_ignored(serve_args, capsys):
    """vLLM 0.17's --swap-space was taken and ignored (V1 never swapped), and 0.18 dropped it: a command line
    that still has it now says what the flag does here."""
    assert serve_args("--preemption-mode", "swap", "--swap-space", "8")[0].swap_space == 8.0
    assert main(["serve", DEMO_MODEL, "--device", "cpu", "--swap-space", "8"]) == 2
    assert "swap_space must be None (unset) unless preemption_mode is swap" in capsys.readouterr().err


def test_uvicorn_log_level_and_access_log_flags_reach_uvicorn(serve_args):
    from pagedllm.server.api_server import uvicorn_config
    _, server = serve_args("--uvicorn-log-level", "warning", "--disable-uvicorn-access-log")
    config = uvicorn_config(None, server)
    assert config.log_level == "warning" and config.access_log is False
    config = uvicorn_config(None, serve_args("--log-level", "error")[1])
    assert config.log_level == "error" and config.access_log is True   # the defaults: --log-level's, logged


@pytest.mark.parametrize("value", ["auto", "-1"])
def test_max_model_len_auto_says_it_is_not_built(capsys, value):
    """vLLM 0.26 takes auto / -1 (fit to memory); here that was 'expected an integer such as 32768'."""
    with pytest.raises(SystemExit):
        main(["serve", DEMO_MODEL, "--max-model-len", value])
    assert "(the longest that fits in memory) is not built here" in capsys.readouterr().err


def test_another_size_flag_given_auto_is_not_told_about_max_model_len(capsys):
    """The refusal belongs to --max-model-len's values, not to the size parser every such flag shares."""
    with pytest.raises(SystemExit):
        main(["serve", DEMO_MODEL, "--max-num-batched-tokens", "auto"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-num-batched-tokens: expected an integer" in error and "max-model-len" not in error


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "vllm.yaml"
    path.write_text(text)
    return str(path)


def test_config_file_is_vllms_yaml_of_flags(serve_args, tmp_path):
    """Helm charts and the production-stack pass `vllm serve MODEL --config FILE.yaml`: was 'unrecognized'."""
    engine, server = serve_args("--config", _yaml(tmp_path, """
port: 8123
max_model_len: 2048               # underscores too
enable-prefix-caching: false      # --no-enable-prefix-caching
trust-remote-code: true           # a vLLM flag, taken
served-model-name: [a, b]         # several values
allowed-origins: ["https://x.y"]  # a JSON list flag
tensor-parallel-size: 1
max-log-len: null                 # left out
speculative-config:
  method: ngram
  num_speculative_tokens: 3
  prompt_lookup_max: 4
"""))
    assert (server.port, engine.max_model_len, engine.enable_prefix_caching) == (8123, 2048, False)
    assert (server.served_model_name, server.allowed_origins, server.max_log_len) == (["a", "b"], ["https://x.y"],
                                                                                       None)
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 3,
                                                     "prompt_lookup_max": 4}


def test_the_command_line_wins_over_the_config_file(serve_args, tmp_path):
    """vLLM's order: command line, then file, then defaults; a list flag is replaced, not added to."""
    path = _yaml(tmp_path, "port: 8123\nserved-model-name: [a, b]\nenforce-eager: true\nmax-num-seqs: 8\n")
    engine, server = serve_args("--port", "9000", "--config", path, "--served_model_name", "c",
                                "--no-enforce-eager")
    assert (server.port, server.served_model_name, engine.enforce_eager, engine.max_num_seqs) == (9000, ["c"],
                                                                                                 False, 8)


def test_vllms_spec_flags_fill_the_speculative_config(serve_args):
    """vLLM 0.26's --spec-method / --spec-model / --spec-tokens (aliases of --speculative-config's keys): were
    'unrecognized arguments'. The weight-offload flags at their defaults are taken."""
    engine, _ = serve_args("--spec-method", "ngram", "--spec-tokens", "3", "--offload-group-size", "0",
                           "--offload-params")
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 3}
    engine, _ = serve_args("--speculative-config", '{"method": "ngram"}', "--spec-tokens", "2")
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 2}


def test_vllms_logging_level_variable_sets_the_log_level(serve_args, monkeypatch, capsys):
    """VLLM_LOGGING_LEVEL (vLLM's request logger says to set it to see prompts) was ignored; --log-level wins."""
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    assert serve_args()[1].log_level == "debug"
    assert serve_args("--log-level", "warning")[1].log_level == "warning"
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "LOUD")
    assert main(["serve", DEMO_MODEL, "--device", "cpu"]) == 2
    assert "VLLM_LOGGING_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err


def test_an_optional_flag_takes_none_for_unset_as_vllms(serve_args):
    """vLLM's optional flags take the text None (and "") for unset, which templated command lines write
    (`--max-log-len None`); they were 'invalid int value' / 'invalid choice'."""
    engine, server = serve_args("--max-log-len", "None", "--quantization", "None", "--tokenizer", "",
                                "--tool-call-parser", "None")
    assert (server.max_log_len, engine.quantization, engine.tokenizer, server.tool_call_parser) == (None,) * 4
    with pytest.raises(SystemExit):
        serve_args("--block-size", "None")   # not optional: an int


def test_a_list_flag_given_again_replaces_the_earlier_values(serve_args, caplog):
    """vLLM keeps the last --api-key (and says so): argparse's extend kept both here, so a wrapper's
    `--api-key OLD "$@"` left OLD working beside the user's NEW, and an old --served-model-name still served."""
    _, server = serve_args("--api-key", "old", "older", "--served-model-name", "a", "--api_key", "new",
                           "--served-model-name=b", "--port", "9000")
    assert (server.api_key, server.served_model_name, server.port) == (["new"], ["b"], 9000)
    assert "--api-key was given 2 times: the last one's values are taken" in caplog.text
    _, server = serve_args("--api-key", "k1", "k2")
    assert server.api_key == ["k1", "k2"]


def test_config_file_model_and_the_positional_model(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(launch, "serve", lambda engine, server: started.append(engine))
    path = _yaml(tmp_path, f"model: {DEMO_MODEL}\ndevice: cpu\nserved-model-name: [a]\n")
    assert main(["serve", "--config", path]) == 0 and started.pop().model == DEMO_MODEL
    # MODEL after --config: the file's list flag does not take it as one more value
    assert main(["serve", "--config", path, "/elsewhere/model"]) == 0 and started.pop().model == "/elsewhere/model"


@pytest.mark.parametrize("text, name, words", [
    ("pipeline-parallel-size: 2\n", "vllm.yaml", "--pipeline-parallel-size 2: pipeline parallelism is not built"),
    ("- port\n", "vllm.yaml", "expected a mapping of flag: value, got list"),
    ("port: [\n", "vllm.yaml", "not valid YAML"),
    ("port: 1\n", "vllm.json", "the config file must be YAML (.yaml or .yml)"),
])
def test_a_bad_config_file_stops_the_start_saying_why(capsys, tmp_path, text, name, words):
    path = tmp_path / name
    path.write_text(text)
    assert main(["serve", DEMO_MODEL, "--device", "cpu", "--config", str(path)]) == 2
    assert words in capsys.readouterr().err


def test_config_file_missing_or_twice_is_an_error(capsys, tmp_path):
    assert main(["serve", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err
    path = _yaml(tmp_path, "port: 1\n")
    assert main(["serve", "--config", path, "--config=" + path]) == 2
    assert "one config file at most" in capsys.readouterr().err
    assert main(["serve", "--config"]) == 2
    assert "--config: expected a YAML file" in capsys.readouterr().err


def test_dotted_keys_of_json_flags_are_vllms(serve_args):
    """`--speculative-config.method ngram`, as vLLM's parser takes JSON flags: was 'unrecognized arguments'."""
    engine, server = serve_args(
        "--speculative-config.method", "ngram", "--speculative_config.num_speculative_tokens=4",
        "--hf-overrides.rope_theta", "1e6", "--hf-overrides.rope_scaling.rope_type", "yarn",
        "--hf-overrides.rope_scaling.factor=2", "--override-generation-config.temperature", "0.5",
        "--default-chat-template-kwargs.enable_thinking", "false",
        "--structured-outputs-config.backend", "xgrammar")
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 4}
    assert engine.speculative.num_speculative_tokens == 4
    assert engine.hf_overrides == {"rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 2}}
    assert engine.override_generation_config == {"temperature": 0.5}
    assert server.default_chat_template_kwargs == {"enable_thinking": False}


def test_dotted_values_lists_and_a_whole_value(serve_args, tmp_path):
    """A value is JSON, else a human-readable int (32k), else text; `+` appends to a list; dotted keys merge into
    the flag's whole JSON, from the command line or a config file."""
    engine, _ = serve_args("--hf-overrides.max_position_embeddings", "32k", "--hf-overrides.name", "text",
                           "--hf-overrides.ids+", "1", "--hf-overrides.ids+=2,3")
    assert engine.hf_overrides == {"max_position_embeddings": 32000, "name": "text", "ids": ["1", "2", "3"]}
    engine, _ = serve_args("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
                           "--speculative-config.num_speculative_tokens", "5")
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 5}
    path = _yaml(tmp_path, "speculative-config: {method: ngram, num_speculative_tokens: 2}\n"
                           "hf-overrides.rope_theta: 500000\n")
    engine, _ = serve_args("--config", path, "--speculative-config.prompt_lookup_max", "3")
    assert json.loads(engine.speculative_config) == {"method": "ngram", "num_speculative_tokens": 2,
                                                     "prompt_lookup_max": 3}
    assert engine.hf_overrides == {"rope_theta": 500000}


@pytest.mark.parametrize("flags, words", [
    (["--compilation-config.level", "3"], '--compilation-config {"level": 3}: pagedllm does not use torch.compile'),
    (["-O.level", "3"], '--optimization-level {"level": 3}: pagedllm does not use torch.compile'),
    (["--kv-transfer-config.kv_connector", "LMCacheConnectorV1"], "--kv-transfer-config {\"kv_connector\": "),
    (["--structured-outputs-config.backend", "guidance"], "structured output runs on xgrammar here"),
    (["--speculative-config", "ngram", "--speculative-config.x", "1"], "--speculative-config ngram: not a JSON "
                                                                       "object, so its dotted keys"),
    (["--hf-overrides.rope_theta"], "--hf-overrides.rope_theta: expected a value"),
])
def test_dotted_keys_of_a_refused_flag_name_the_flag(capsys, flags, words):
    assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 2
    assert words in capsys.readouterr().err


def test_dotted_keys_of_a_flag_vllm_lacks_too_are_unrecognized(capsys):
    with pytest.raises(SystemExit):
        main(["serve", DEMO_MODEL, "--no-such-config.key", "1"])
    assert "unrecognized arguments: --no-such-config" in capsys.readouterr().err


def test_flags_vllm_dropped_are_answered(serve_args, capsys):
    """Were 'unrecognized arguments' (as in vLLM 0.26): older deployments still pass them."""
    serve_args("--num-scheduler-steps", "1", "--task", "generate", "--use-v2-block-manager")
    engine, _ = serve_args("--rope-theta", "1e6", "--rope_scaling", '{"rope_type": "yarn", "factor": 2.0}',
                           "--hf-overrides", '{"max_position_embeddings": 4096}')
    assert engine.hf_overrides == {"max_position_embeddings": 4096, "rope_theta": 1e6,
                                   "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    for flags, words in [(["--num-scheduler-steps", "8"], "--num-scheduler-steps 8: vLLM V0's multi-step"),
                         (["--task", "embed"], "--task embed: vLLM 0.26 has no --task: for embedding, reranking or "
                                               "reward models it says to use --runner pooling"),
                         (["--max-seq-len-to-capture", "8192"], "--max-seq-len-to-capture 8192: vLLM removed it")]:
        assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 2
        assert words in capsys.readouterr().err


def test_rare_vllm_flags_are_answered(serve_args, capsys):
    """Were 'unrecognized arguments'."""
    serve_args("--prefix-caching-hash-algo", "sha256", "--max-parallel-loading-workers", "2",
               "--no-enable-server-load-tracking", "--performance-mode", "balanced")
    for flags, words in [(["--prefix-caching-hash-algo", "xxhash"], "--prefix-caching-hash-algo xxhash: block "
                                                                    "hashes are sha256 here"),
                         (["--enable-server-load-tracking"], "--enable-server-load-tracking: /load's count"),
                         (["--performance-mode", "throughput"], "--performance-mode throughput: pagedllm picks"),
                         (["--pooler-config", "{}"], "--pooler-config {}: pagedllm runs generative models only")]:
        assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 2
        assert words in capsys.readouterr().err


def test_logprobs_mode_and_fp64_gumbel_take_what_pagedllm_does_and_refuse_the_rest(serve_args, capsys):
    """vLLM 0.26's sampler flags: logprobs are always raw log-softmax here (vLLM's default raw_logprobs), the
    draw's noise float32. Were 'unrecognized arguments', even at vLLM's defaults."""
    serve_args("--logprobs-mode", "raw_logprobs", "--no-use-fp64-gumbel")
    for flags, words in ((["--logprobs-mode", "processed_logprobs"], "--logprobs-mode processed_logprobs: "),
                         (["--logprobs-mode", "raw_logits"], "--logprobs-mode raw_logits: "),
                         (["--use-fp64-gumbel"], "--use-fp64-gumbel: ")):
        assert main(["serve", DEMO_MODEL, "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + words), err
        assert ("float32" if "gumbel" in words else "raw_logprobs") in err, err
