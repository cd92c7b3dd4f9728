"""`pagedllm chat` and `pagedllm complete`: vLLM's command-line clients of a running server (its `vllm chat` and
`vllm complete`, the same flags): a conversation or a prompt at a time, the answer streamed as it arrives; -q sends
one and exits. They speak the OpenAI API over HTTP, so they work against any such server."""
import argparse
import json
import os
import sys
import time


def add_cli_args(parser: argparse.ArgumentParser, command: str):
    parser.add_argument("--url", default="http://localhost:8000/v1", help="the server's OpenAI API base URL")
    parser.add_argument("--model-name", default=None, help="the model to ask (default: the server's first)")
    parser.add_argument("--api-key", default=None, help="the server's API key (default: $OPENAI_API_KEY)")
    if command == "chat":
        parser.add_argument("--system-prompt", default=None, help="a system message that opens the conversation")
    else:
        parser.add_argument("--max-tokens", type=int, default=None, help="most tokens of each completion")
    parser.add_argument("-q", "--quick", metavar="MESSAGE", default=None,
                        help="send this one message (chat) or prompt (complete), print the answer and exit")
    parser.add_argument("--stats", action="store_true", help="print time to first token and tokens/s after each")


def main(args: argparse.Namespace):
    """Raises httpx.TransportError (the server cannot be reached) or ValueError (it refused a request: its
    message)."""
    import httpx
    key = args.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
    with httpx.Client(base_url=args.url.rstrip("/") + "/", headers={"Authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(30.0, read=None)) as client:
        model = args.model_name or _first_model(client)
        print(f"Using model: {model}")
        conversation = None   # complete: each prompt on its own
        if args.command == "chat":
            conversation = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        for text in [args.quick] if args.quick is not None else _lines(args.command):
            if conversation is None:
                body = {"model": model, "prompt": text, **({"max_tokens": args.max_tokens} if args.max_tokens else {})}
                _stream(client, "completions", body, args.stats, lambda choice: choice.get("text"))
                continue
            conversation.append({"role": "user", "content": text})
            answer = _stream(client, "chat/completions", {"model": model, "messages": conversation}, args.stats,
                             lambda choice: choice.get("delta", {}).get("content"))
            conversation.append({"role": "assistant", "content": answer})


def _first_model(client) -> str:
    models = _checked(client.get("models")).json()["data"]
    if not models:
        raise ValueError("the server lists no model (GET /v1/models)")
    return models[0]["id"]


def _lines(command: str):
    print("Please enter a message for the chat model:" if command == "chat" else "Please enter prompt to complete:")
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def _stream(client, path: str, body: dict, stats: bool, piece) -> str:
    """Prints the streamed answer as it comes; returns its text."""
    body = {**body, "stream": True, **({"stream_options": {"include_usage": True}} if stats else {})}
    start, first, tokens, text = time.perf_counter(), None, 0, []
    with client.stream("POST", path, json=body) as response:
        _checked(response)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:   # a stream that fails after its start says so in an event
                raise ValueError(chunk["error"].get("message", chunk["error"]))
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            content = piece(chunk["choices"][0]) if chunk.get("choices") else None
            if content:
                first = first if first is not None else time.perf_counter()
                text.append(content)
                print(content, end="", flush=True)
    print()
    if stats:
        seconds = time.perf_counter() - start
        print(f"TTFT: {((first or start) - start) * 1e3:.2f} ms")
        print(f"TPS:  {tokens / seconds:.2f} tokens/s" if seconds > 0 else "TPS:  -")
    return "".join(text)


def _checked(response):
    """The response, or its error message as a ValueError."""
    if response.status_code >= 400:
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise ValueError(f"the server answered {response.status_code}: {message}")
    return response


def run(args: argparse.Namespace) -> int:
    import httpx
    try:
        main(args)
    except httpx.TransportError as e:
        print(f"error: cannot reach {args.url} ({e or type(e).__name__}): is `pagedllm serve` running there?",
              file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0
