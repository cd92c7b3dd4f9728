"""Real `pagedllm serve` processes on localhost, started once per session (in parallel), with a tiny model."""
import json

import pytest
import torch
from server.server_utils import (API_KEY, CHAT_TEMPLATE, EDGE_API_KEY, EDGE_MAX_BODY, EDGE_MAX_MODEL_LEN,
                                 EDGE_ORIGIN, EDGE_ROOT_PATH, MAX_MODEL_LEN, NUM_BLOCKS, SMALL_API_KEY, Server,
                                 make_tls_cert, serving, start_server)


@pytest.fixture(scope="session")
def servers(tiny_model_dirs, tmp_path_factory):
    """"main": API key from PAGEDLLM_API_KEY, a chat template (and requests' own), tool_choice auto (hermes), the
    last 3 stored /v1/responses kept;
    "small": API key from --api-key, one running sequence and a waiting queue of one, for the 503, speculative
    decoding (the model as its own draft: every proposal accepted), logprobs' tokens named by id; "edge": what
    faces hostile clients (HTTPS with a self-signed certificate where openssl exists, CORS, a root path, a 1 MiB
    body limit, short requests for the fuzzers, priority scheduling).
    All start at once: start-up is most of their cost."""
    server_model_dir = tiny_model_dirs["llama"]
    logs = tmp_path_factory.mktemp("serve_logs")
    template = logs / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    started = {"main": start_server(server_model_dir, str(logs / "main.log"), API_KEY,
                                    "--chat-template", str(template), "--trust-request-chat-template",
                                    "--enable-auto-tool-choice",
                                    "--tool-call-parser", "hermes",
                                    "--responses-store", "3",
                                    # the first compile (xgrammar's tokenizer info) once passed 30 s while the
                                    # three servers started on two shared cores
                                    "--structured-outputs-compile-timeout", "120"),
               "small": start_server(server_model_dir, str(logs / "small.log"), SMALL_API_KEY, "--api-key",
                                     SMALL_API_KEY, "--max-num-seqs", "1", "--max-waiting-queue-length", "1",
                                     "--return-tokens-as-token-ids",
                                     "--speculative-config", json.dumps(
                                         {"method": "draft_model", "model": server_model_dir,
                                          "num_speculative_tokens": 3})),
               "edge": start_server(server_model_dir, str(logs / "edge.log"), EDGE_API_KEY, *_edge_flags(logs),
                                    "--chat-template", str(template))}
    with serving(started):
        yield started


def _edge_flags(logs) -> list[str]:
    tls = make_tls_cert(str(logs))
    return ["--api-key", EDGE_API_KEY, "--max-num-seqs", "4", "--max-model-len", str(EDGE_MAX_MODEL_LEN),
            "--scheduling-policy", "priority",
            "--max-request-body-bytes", str(EDGE_MAX_BODY), "--root-path", EDGE_ROOT_PATH,
            "--allowed-origins", f'["{EDGE_ORIGIN}"]', "--allow-credentials",
            *(["--ssl-keyfile", tls[0], "--ssl-certfile", tls[1]] if tls else [])]


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="session")
def edge(servers) -> Server:
    return servers["edge"]


@pytest.fixture(scope="session")
def _offline_llm(tiny_model_dirs):
    from pagedllm import LLM
    return LLM(tiny_model_dirs["llama"], num_gpu_blocks_override=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN,
               log_stats_interval=0, device="cpu")


@pytest.fixture
def offline_llm(_offline_llm):
    """The reference: offline LLM.generate on the same model, in this process, on one thread (the servers'
    processes share the cores: more threads would only wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _offline_llm
    torch.set_num_threads(threads)