"""Adapters are read off the step loop (lora/loader.py): a slow read holds its own request only, a failed read
fails its own request only, and the request that waited still gets transformers + PEFT's tokens."""
import logging
import threading
import time

import pytest

from pagedllm import LLM, LoRARequest
from pagedllm.lora.loader import LoRALoader
from test_lora import GREEDY, PROMPTS
from test_lora import setup as lora_setup

GATE_SECONDS = 60.0   # the longest a gated adapter read waits to be let through


# test_lora's module fixture: the tiny base model, its three adapters, their transformers + PEFT references
adapters = lora_setup


def _engine(adapters):
    base, loras, refs = adapters
    return LLM(base, dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=2).engine, loras, refs


def _run(engine, on_output=None) -> tuple[dict, dict]:
    """Steps to the end: each request's finished output and its time. on_output(done) after each step."""
    done, when, start = {}, {}, time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id], when[o.request_id] = o, time.perf_counter() - start
        if on_output:
            on_output(done)
    return done, when


def test_slow_adapter_read_does_not_hold_other_requests(adapters, monkeypatch):
    """The adapter read waits at a gate that opens only once both base requests have finished: they finish
    only if neither add_request nor a step waits for the read (else the gate times out). No wall-clock bound on
    the base requests, which a loaded machine stretched past a 1.5 s read (CI beside another server: 2.9 s)."""
    engine, loras, refs = _engine(adapters)
    read = LoRALoader.read
    gate, opened = threading.Event(), []

    def gated_read(self, req):
        opened.append(gate.wait(GATE_SECONDS))
        return read(self, req)
    monkeypatch.setattr(LoRALoader, "read", gated_read)

    def open_gate(done):
        if "base" in done and "base2" in done:
            gate.set()
    engine.add_request("base", PROMPTS[2], GREEDY)
    engine.step()   # the base request runs; then the adapter request arrives
    engine.add_request("slow", PROMPTS[1], GREEDY, lora_request=loras["rs"])
    engine.add_request("base2", PROMPTS[3], GREEDY)
    done, when = _run(engine, open_gate)
    assert opened == [True], "the base requests did not finish while the adapter was read"
    assert when["slow"] > max(when["base"], when["base2"])
    assert done["slow"].outputs[0].token_ids == refs["rs"][1][0]
    assert done["base"].outputs[0].token_ids == refs[None][2][0]
    assert engine.list_loras() == {1}


def test_failed_adapter_read_fails_its_request_alone(adapters, monkeypatch, tmp_path, caplog):
    engine, loras, refs = _engine(adapters)
    read = LoRALoader.read

    def flaky_read(self, req):
        if req.lora_name == "attn":
            raise OSError("the disk went away")
        return read(self, req)
    monkeypatch.setattr(LoRALoader, "read", flaky_read)
    engine.add_request("flaky", PROMPTS[0], GREEDY, lora_request=loras["attn"])
    engine.add_request("missing", PROMPTS[0], GREEDY, lora_request=LoRARequest("gone", 7, str(tmp_path / "no")))
    engine.add_request("ok", PROMPTS[1], GREEDY, lora_request=loras["rs"])
    engine.add_request("base", PROMPTS[2], GREEDY)
    with caplog.at_level(logging.ERROR, logger="pagedllm"):
        done, _ = _run(engine)
    for rid in ("flaky", "missing"):
        assert done[rid].outputs[0].finish_reason == "error"
    assert "LoRA adapter 'attn'" in caplog.text and "the disk went away" in caplog.text
    assert "LoRA adapter 'gone'" in caplog.text and "no adapter directory at that path" in caplog.text
    assert done["ok"].outputs[0].token_ids == refs["rs"][1][0]
    assert done["base"].outputs[0].token_ids == refs[None][2][0]
    assert engine.list_loras() == {1}
    stats = engine.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_requests_share_one_read_and_abort_while_reading(adapters, monkeypatch):
    """Two requests on one new adapter: one read; a request aborted while its adapter is read leaves nothing."""
    engine, loras, refs = _engine(adapters)
    reads = []
    read = LoRALoader.read

    def counted_read(self, req):
        reads.append(req.lora_name)
        time.sleep(0.3)
        return read(self, req)
    monkeypatch.setattr(LoRALoader, "read", counted_read)
    for rid, i in (("x", 4), ("y", 5), ("gone", 6)):
        engine.add_request(rid, PROMPTS[i], GREEDY, lora_request=loras["attn"])
    engine.abort_request(["gone"])
    done, _ = _run(engine)
    assert reads == ["attn"]
    assert done["x"].outputs[0].token_ids == refs["attn"][4][0]
    assert done["y"].outputs[0].token_ids == refs["attn"][5][0]
    assert "gone" not in done or done["gone"].outputs[0].finish_reason == "abort"
    assert engine.remove_lora(2)   # nothing holds it


def test_add_lora_async_in_step_loop(adapters):
    """EngineCore.add_lora_async (the core process's add_lora): answered by the step that puts it on the host."""
    engine, loras, _ = _engine(adapters)
    future = engine.core.add_lora_async(loras["rs"])
    assert not future.done() and engine.has_unfinished_requests()
    while not future.done():
        engine.step()
    assert future.result() is True and engine.list_loras() == {1}
    assert engine.core.add_lora_async(loras["rs"]).result() is True   # on the host: answered at once
    bad = engine.core.add_lora_async(LoRARequest("nowhere", 5, "/nonexistent/adapter"))
    while not bad.done():
        engine.step()
    from pagedllm.lora.request import LoRAAdapterNotFoundError
    with pytest.raises(LoRAAdapterNotFoundError, match="LoRA adapter 'nowhere'.*no adapter directory"):
        bad.result()   # its kind kept through the loader: the server answers it 404, as vLLM
    assert not engine.has_unfinished_requests()
