"""Logprob token texts of tokens that hold part of a UTF-8 character (byte-level BPE, SentencePiece byte
fallback), as vLLM 0.26 gives them: "" while the character is incomplete, the whole character at the token that
completes it (its decode after the sequence's tokens before it). Their bytes (chat's `bytes`) then join to the
text; each token's own decode was "\ufffd", whose bytes rebuild nothing."""
import pytest

from pagedllm.core.messages import EngineCoreOutput, TokenLogprobs
from pagedllm.engine.output_processor import OutputKind, OutputProcessor
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.sampling_params import SamplingParams

CONFIGS = "/work/shared/model-configs"


@pytest.mark.parametrize("model", ["Qwen--Qwen3-0.6B", "mistralai--Mistral-7B-v0.1"])
def test_partial_utf8_tokens_read_empty_until_the_character_completes(model):
    tok = load_tokenizer(f"{CONFIGS}/{model}")
    text = "ok 🦙 猫"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids)   # split characters
    lps = [TokenLogprobs([t, t], [-0.5, -0.5], 1) for t in ids]   # each also its own top-1
    op = OutputProcessor(tok)
    op.add_request("r", None, ids[:1], SamplingParams(max_tokens=99, logprobs=1), OutputKind.FINAL, 0.0)
    outs, _, _ = op.process([EngineCoreOutput("r", ids, lps, finish_reason="length")])
    texts = [position[t].decoded_token for t, position in zip(ids, outs[0].outputs[0].logprobs)]
    assert "\ufffd" not in "".join(texts)
    # (SentencePiece: the first token keeps its leading space)
    assert b"".join(t.encode() for t in texts).decode().lstrip() == outs[0].outputs[0].text.lstrip() == text
    assert {"🦙", "猫"} <= {t.strip() for t in texts}
