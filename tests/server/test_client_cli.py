"""`pagedllm chat` / `pagedllm complete` against a running server, as vLLM's `vllm chat` / `vllm complete`
(same flags): they were "invalid choice". A one-shot (-q) and an interactive session (lines on stdin)."""
import subprocess
import sys

from server.server_utils import MODEL_NAME


def _client(server, *args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedllm.cli", *args, "--url", server.url + "/v1",
                           "--api-key", server.api_key], input=stdin, capture_output=True, text=True, timeout=120)


def test_complete_and_chat_stream_answers_from_the_server(server):
    done = _client(server, "complete", "-q", "Once upon a time", "--max-tokens", "6", "--stats")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Using model: {MODEL_NAME}" and lines[1].strip() and lines[2].startswith("TTFT:")
    assert lines[3].startswith("TPS:")
    # one message (the tiny model's answer runs to the context's end: a second turn would not fit)
    chat = _client(server, "chat", "--system-prompt", "Be brief.", stdin="Hello\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.splitlines()[:2] == [f"Using model: {MODEL_NAME}", "Please enter a message for the chat model:"]
    # the answer after the first prompt, then the prompt that met the end of input
    assert chat.stdout.splitlines()[2].startswith("> ") and chat.stdout.endswith("\n> ")


def test_a_refusal_or_no_server_is_an_error_naming_it(server):
    refused = _client(server, "complete", "-q", "Once", "--max-tokens", "-1")
    assert refused.returncode == 2 and "the server answered 400" in refused.stderr and "max_tokens" in refused.stderr
    unknown = _client(server, "chat", "-q", "hi", "--model-name", "nope")
    assert unknown.returncode == 2 and "404" in unknown.stderr
    gone = subprocess.run([sys.executable, "-m", "pagedllm.cli", "complete", "-q", "x", "--url",
                           "http://127.0.0.1:9/v1"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in gone.stderr
