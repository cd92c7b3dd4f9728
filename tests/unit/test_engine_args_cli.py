"""vLLM scripts' own parsers: `EngineArgs.add_cli_args(parser)`, `EngineArgs.from_cli_args(args)` (and
AsyncEngineArgs'), with an argparse parser or vLLM's FlexibleArgumentParser. Neither method existed."""
import argparse

import pytest

from pagedllm import AsyncEngineArgs, EngineArgs, FlexibleArgumentParser
from pagedllm.engine.engine_args import engine_config


def test_async_engine_args_from_a_scripts_own_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=3)   # the script's own flag, left where it is
    AsyncEngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--model", "m", "--max-model-len", "64", "-q", "fp8", "--trust-remote-code",
                              "--enable-log-requests", "--stream-interval", "4", "--disable-log-stats"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    assert (config.model, config.max_model_len, config.quantization, config.log_stats_interval,
            config.stream_interval) == ("m", 64, "fp8", 0, 4)
    assert engine_args.async_llm_kwargs() == {"log_requests": True}
    assert args.num_prompts == 3


def test_a_vllm_flag_asking_for_what_is_not_built_is_refused_naming_it():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    engine_args = EngineArgs.from_cli_args(parser.parse_args(["--model", "m", "-pp", "2"]))
    with pytest.raises(ValueError, match="pipeline_parallel_size=.*pipeline parallelism is not built"):
        engine_args.create_engine_config()


def test_engine_args_flags_are_llms_keyword_arguments():
    """vLLM's examples build LLM(**vars(parser.parse_args())) on EngineArgs.add_cli_args's parser; LLM's
    arguments are engine_config's. The AsyncLLM's own flags are not EngineArgs'; --stream-interval is (vLLM's
    EngineArgs', kept on the config: create_engine_config() dropped it)."""
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    kwargs = vars(parser.parse_args(["--model", "m", "--max-model-len", "64", "--trust-remote-code",
                                     "--disable-log-stats", "--stream-interval", "4"]))
    config = engine_config(kwargs.pop("model"), kwargs)
    assert (config.max_model_len, config.log_stats_interval, config.stream_interval) == (64, 0, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--enable-log-requests"])
    assert EngineArgs("m", stream_interval=4).create_engine_config().stream_interval == 4
    with pytest.raises(ValueError, match="stream_interval must be an integer >= 1"):
        EngineArgs("m", stream_interval=0).create_engine_config()


def test_flexible_argument_parser_reads_vllms_forms(tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text("max_model_len: 128\nenforce_eager: true\n")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--config", str(config), "--max_model_len", "64", "--speculative-config.method",
                              "ngram", "--speculative-config.num_speculative_tokens", "2"])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert (config.max_model_len, config.enforce_eager) == (64, True)   # the command line's wins over the file's
    assert (config.speculative.method, config.speculative.num_speculative_tokens) == ("ngram", 2)


def test_flexible_argument_parser_refuses_a_bad_config_file_as_argparse_does(tmp_path, capsys):
    with pytest.raises(SystemExit):
        FlexibleArgumentParser().parse_args(["--config", str(tmp_path / "engine.json")])
    assert "must be YAML" in capsys.readouterr().err


def test_vllm_flags_that_scripts_compare_read_as_vllms_defaults():
    """vLLM's benchmarks/throughput.py checks `args.data_parallel_size > 1` on EngineArgs.add_cli_args's parser:
    None there made it a TypeError before any engine was built. data_parallel_size, tokenizer_mode and
    trust_remote_code read as vLLM's defaults (1, auto, False) in the parser and EngineArgs, and an LLM takes them."""
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "m"])
    assert (args.data_parallel_size, args.tokenizer_mode, args.trust_remote_code) == (1, "auto", False)
    assert parser.parse_args(["-dp", "1"]).data_parallel_size == 1
    engine_args = EngineArgs("m")
    assert (engine_args.data_parallel_size, engine_args.tokenizer_mode, engine_args.trust_remote_code) == (1, "auto",
                                                                                                       False)
    EngineArgs.from_cli_args(args).create_engine_config()
    with pytest.raises(ValueError, match="data parallelism is not built"):
        EngineArgs.from_cli_args(parser.parse_args(["--model", "m", "-dp", "2"])).create_engine_config()
