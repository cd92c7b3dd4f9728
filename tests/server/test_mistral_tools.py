"""--tool-call-parser mistral through a real server, on a tiny model that writes what Mistral models write: its
tokenizer has [TOOL_CALLS] and [ARGS] as special tokens (the server must keep them in the text for the parser)
and the pieces of a call as added tokens, and its weights make each token's successor certain (a bigram chain,
see _script). Streamed and not, the calls come out with 9-character ids and finish_reason "tool_calls"."""
import json

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from server.server_utils import API_KEY, MODEL_NAME, start_server, stop_server, wait_healthy

BOT, ARGS = "[TOOL_CALLS]", "[ARGS]"
# Mistral-7B-Instruct-v0.3 (tokenizer before v11): content, then a JSON list of calls
PRE_V11 = ["<pre>", "Sure.", BOT, ' [{"name": "get_weather", "arguments": ', '{"city": ', '"Paris"}}, ',
           '{"name": "now", "arguments": {}}]']
# Mistral-Small-3.2 (tokenizer v11 and later): name[ARGS]arguments
V11 = ["<v11>", BOT, "get_weather", ARGS, '{"city":', ' "Oslo"}']
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]


def _script(path: str, chains: list[list[str]], special: tuple[str, ...] = (BOT, ARGS)):
    """Each chain's token is followed by the next (the last by EOS), whatever came before: the layers add
    nothing to the residual stream (o_proj, down_proj zero), so the logits read the last token's embedding
    alone; the chain's embeddings are orthonormal and each lm_head row is its predecessor's embedding. A token
    in two chains (BOT) has two successors, of equal logit: a request's logit_bias picks one. special: the
    tokens added as special tokens (the others of the chains are added tokens)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.add_tokens(sorted({t for chain in chains for t in chain} - set(special)))
    tok.save_pretrained(path)
    weights = load_file(f"{path}/model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name].zero_()
    weights["model.norm.weight"].fill_(1.0)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    ids = {t: tok.convert_tokens_to_ids(t) for chain in chains for t in chain}
    basis = torch.linalg.qr(torch.randn(embed.shape[1], embed.shape[1], generator=torch.Generator().manual_seed(0)))[0]
    head.zero_()
    for i, token in enumerate(ids):
        embed[ids[token]] = basis[:, i]
    for chain in chains:
        for token, successor in zip(chain, [*chain[1:], None]):
            head[tok.eos_token_id if successor is None else ids[successor]] += 4.0 * embed[ids[token]]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    return tok


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from conftest import make_tiny_model
    root = tmp_path_factory.mktemp("mistral")
    path = make_tiny_model(root / "model", vocab_size=540, seed=7)
    tok = _script(path, [PRE_V11, V11])
    (root / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    server = start_server(path, str(root / "serve.log"), API_KEY, "--chat-template", str(root / "template.jinja"),
                          "--enable-auto-tool-choice", "--tool-call-parser", "mistral")
    try:
        wait_healthy(server)
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60), tok
    finally:
        stop_server(server)


def _kw(tok, chain: list[str], **kw) -> dict:
    successor = tok.convert_tokens_to_ids(chain[chain.index(BOT) + 1])
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": chain[0]}], "tools": TOOLS,
            "temperature": 0, "max_tokens": 20, "logit_bias": {str(successor): 1.0}, **kw}


def _streamed(client, **kw):
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:   # the first delta: id and name, before any argument
                    calls[d.index] = [d.id, d.function.name, ""]
                calls[d.index][2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, list(calls.values()), finish


@pytest.mark.parametrize("chain, content, calls", [
    (PRE_V11, "Sure.", [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
    (V11, None, [("get_weather", '{"city": "Oslo"}')]),
])
def test_mistral_calls_streamed_and_not(mistral, chain, content, calls):
    client, tok = mistral
    choice = client.chat.completions.create(**_kw(tok, chain)).choices[0]
    assert (choice.message.content, choice.finish_reason) == (content, "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == calls
    assert all(len(c.id) == 9 and c.id.isalnum() for c in choice.message.tool_calls)
    got_content, got_calls, finish = _streamed(client, **_kw(tok, chain))
    assert (got_content, finish) == (content, "tool_calls")
    assert [(name, arguments) for _, name, arguments in got_calls] == calls
    assert all(len(i) == 9 and i.isalnum() for i, _, _ in got_calls)
    json.loads(got_calls[0][2])


def test_tool_choice_none_shows_the_text_without_special_tokens(mistral):
    """Only the parser needs [TOOL_CALLS]: without it, the text is as it always was (special tokens skipped)."""
    client, tok = mistral
    choice = client.chat.completions.create(**_kw(tok, PRE_V11, tool_choice="none")).choices[0]
    assert choice.message.content == "".join(PRE_V11[1:]).replace(BOT, "") and choice.finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "now"}}])
def test_forced_calls_have_mistral_ids(mistral, tool_choice):
    """tool_choice required or a named function: the enforced call's id is Mistral's 9 letters and digits too
    (as vLLM gives them with a Mistral tokenizer), so the conversation can go back through the chat template."""
    client, tok = mistral
    kw = {**_kw(tok, PRE_V11, tool_choice=tool_choice), "max_tokens": 40, "tools": TOOLS[1:]}
    calls = client.chat.completions.create(**kw).choices[0].message.tool_calls
    _, streamed, _ = _streamed(client, **kw)
    ids = [c.id for c in calls] + [i for i, _, _ in streamed]
    assert [c.function.name for c in calls] == ["now"] and len(ids) == 2
    assert all(len(i) == 9 and i.isalnum() for i in ids)
