"""`pagedllm serve`'s start (server/launch.py): the engine core starts before the API process imports the server,
the API processes run the config the core derived (no CUDA context of their own), and a failure after the core
started stops it."""
import multiprocessing
import subprocess
import sys
import time

import pytest

from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM


def test_the_cli_and_launch_import_no_torch_transformers_or_fastapi():
    """What makes the overlap: the core process is spawned before any of these is imported (and its spawn
    re-imports the CLI module, which must stay light too; with several API processes the supervisor starts the core
    and them without importing them at all)."""
    code = ("import sys, pagedllm.cli, pagedllm.server.launch, pagedllm.server.api_servers, "
            "pagedllm.engine.core_process; "
            "print(sorted({'torch', 'transformers', 'fastapi', 'uvicorn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _core_processes() -> set[int]:
    """Live core processes of this one (other tests' session fixtures may hold some)."""
    return {p.pid for p in multiprocessing.active_children() if p.name == "pagedllm-engine-core"}


def test_the_api_process_runs_the_cores_config(tiny_model_dirs):
    config = EngineConfig(tiny_model_dirs["llama"], num_gpu_blocks_override=64, max_model_len=256, device="cpu",
                          log_stats_interval=0)
    assert config.max_num_seqs is None and config.max_num_batched_tokens is None
    before = _core_processes()
    engine = AsyncLLM(config)
    try:
        assert engine.config == config.with_batch_defaults(False, serving=True)
        assert engine.input_processor is not None and engine.core.process.is_alive()
    finally:
        engine.shutdown()
    assert _core_processes() == before


def test_a_failure_after_the_core_started_stops_it(tiny_model_dirs, tmp_path):
    """The tokenizer is loaded while the core loads the model: a bad one raises, and the core does not stay."""
    (tmp_path / "tokenizer_config.json").write_text("{ not json")
    config = EngineConfig(tiny_model_dirs["llama"], tokenizer=str(tmp_path), num_gpu_blocks_override=64,
                          max_model_len=256, device="cpu", log_stats_interval=0)
    before, start = _core_processes(), time.monotonic()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        AsyncLLM(config)
    assert _core_processes() == before and time.monotonic() - start < 10   # killed, not waited for


def test_serve_with_a_missing_model_exits_2_and_leaves_no_core(tmp_path, capsys):
    from pagedllm.cli import main
    before = _core_processes()
    assert main(["serve", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert _core_processes() == before


def test_serve_with_a_chat_template_that_does_not_parse_exits_2_naming_it(capsys):
    """The operator's mistake at start-up (a fuzz found every chat request then a 400 blaming the client)."""
    from pagedllm.cli import main
    before = _core_processes()
    assert main(["serve", "--device", "cpu", "--chat-template", "{% for x in %}"]) == 2
    assert "--chat-template (its text) does not parse" in capsys.readouterr().err
    assert _core_processes() == before


def test_a_bad_log_level_is_argparse_s_error(capsys):
    from pagedllm.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--log-level", "nonsense"])
    assert e.value.code == 2 and "invalid choice: 'NONSENSE'" in capsys.readouterr().err


def test_serve_with_a_host_that_is_no_address_exits_2_naming_it(capsys):
    from pagedllm.cli import main
    assert main(["serve", "--device", "cpu", "--host", "999.1.1.1"]) == 2
    assert "--host '999.1.1.1' is not an IPv4 address" in capsys.readouterr().err


def test_serve_on_a_port_in_use_exits_2_naming_it_before_the_core_starts(capsys):
    """The port is bound before the model loads (as with several API processes, and as vLLM does): a port in use
    was uvicorn's error line after the whole load, exit code 3, after a 'serving at' line."""
    import socket
    from pagedllm.cli import main
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    before, start = _core_processes(), time.monotonic()
    try:
        assert main(["serve", "--device", "cpu", "--port", str(port)]) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err
    assert _core_processes() == before and time.monotonic() - start < 5


def test_serve_on_an_address_not_of_this_machine_exits_2_naming_host(capsys):
    from pagedllm.cli import main
    assert main(["serve", "--device", "cpu", "--host", "192.0.2.1", "--port", "0"]) == 2   # TEST-NET-1
    assert "cannot listen on 192.0.2.1:0: Cannot assign requested address (check --host)" in capsys.readouterr().err
