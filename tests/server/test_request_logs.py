"""--enable-log-requests and --max-log-len (vLLM's): a log line for each request the server takes. They were
accepted and did nothing (--enable-log-requests was refused: no request was ever logged)."""
import json
import logging
import os
import re
import subprocess
import sys

from server.server_utils import MODEL_NAME

from pagedllm.sampling_params import SamplingParams
from pagedllm.server.request_logger import RequestLogger


class _Tokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_the_id_and_params_at_info_and_the_prompt_cut_to_max_log_len_at_debug(caplog):
    log = RequestLogger(_Tokenizer(), max_log_len=3)
    with caplog.at_level(logging.INFO, logger="pagedllm"):
        log.log("cmpl-1-0", [0, 1, 2, 3, 4], SamplingParams(max_tokens=7))
    assert [r.levelname for r in caplog.records] == ["INFO"]   # no prompt without debug logging
    assert caplog.records[0].getMessage().startswith("Received request cmpl-1-0: params: SamplingParams(")
    assert "max_tokens=7" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pagedllm"):
        log.log("cmpl-2-0", [0, 1, 2, 3, 4], SamplingParams())
    assert caplog.records[1].getMessage() == "Request cmpl-2-0 details: prompt: 'abc', prompt_token_ids: [0, 1, 2]."
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pagedllm"):
        RequestLogger(None, max_log_len=None).log("cmpl-3-0", [0, 1, 2, 3, 4], SamplingParams())
    assert caplog.records[1].getMessage().endswith("prompt: None, prompt_token_ids: [0, 1, 2, 3, 4].")


def test_run_batch_logs_each_request_when_asked(tiny_model_dirs, tmp_path):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": body}) + "\n")
    args = [sys.executable, "-m", "pagedllm.cli", "run-batch", tiny_model_dirs["llama"], "-i", str(source),
            "-o", str(tmp_path / "out.jsonl"), "--served-model-name", MODEL_NAME, "--device", "cpu",
            "--max-model-len", "64", "--log-stats-interval", "0", "--log-level", "debug"]
    env = {**{k: v for k, v in os.environ.items() if k != "PAGEDLLM_API_KEY"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*args, "--enable-log-requests", "--max-log-len", "4"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    info = [line for line in done.stderr.splitlines() if "Received request cmpl-" in line]
    assert len(info) == 1 and "params: SamplingParams(" in info[0] and "max_tokens=3" in info[0], done.stderr
    debug = [line for line in done.stderr.splitlines() if "details: prompt:" in line]
    assert len(debug) == 1 and re.search(r"prompt: '.{1,4}', prompt_token_ids: \[\d+, \d+, \d+, \d+\]\.$", debug[0]), \
        debug   # 4 characters of text, 4 token ids
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)   # off by default
    assert done.returncode == 0 and "Received request" not in done.stderr, done.stderr[-3000:]
