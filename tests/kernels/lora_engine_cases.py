"""The engine with LoRA through the Triton kernels on CPU (TRITON_INTERPRET=1, a process of its own): three
adapters and the base mixed in one generate call, prompts in chunks beside decode rows, give the first NEW greedy
tokens of transformers + PEFT (tests/e2e/test_lora.py's references) and their logprobs within 1e-4.
Exercises what the kernel cases do not: the manager's slot order, padding, and the layers' shard bounds.
`python lora_engine_cases.py fused wide`: one engine a path, on one model, adapters and references (made once);
prints "ok engine <path>" for each path that passes, the failure of one that does not, and exits 1 if any did."""
import dataclasses
import importlib.util
import sys
import tempfile
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
NEW = 4   # tokens a prompt: the interpreter runs each kernel program in Python
sys.path.insert(0, str(TESTS))


def main():
    from conftest import make_tiny_model
    from pagedllm import LoRARequest
    from pagedllm.lora.layers import LoRALinear
    spec = importlib.util.spec_from_file_location("lora_e2e", TESTS / "e2e" / "test_lora.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    failed = False
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        base = make_tiny_model(root / "base")
        loras = {name: LoRARequest(name, i + 1, e2e.make_adapter(base, root / name, i, **kw))
                 for i, (name, kw) in enumerate(e2e.ADAPTERS.items())}
        refs = e2e._references(base, loras)
        LoRALinear.kernels_on_cpu = True
        names = e2e.assignment(loras)
        for path in sys.argv[1:]:
            try:
                check_path(path, base, loras, names, refs, e2e)
                print(f"ok engine {path}", flush=True)
            except Exception:
                failed = True
                print(f"FAILED engine {path}:\n{traceback.format_exc()}", flush=True)
    sys.exit(1 if failed else 0)


def check_path(path: str, base, loras, names, refs, e2e):
    """fused: the fused kernel; wide: the slots' A rows in the base GEMM, then the expand."""
    import numpy as np

    from pagedllm import LLM
    from pagedllm.lora import layers   # read when the engine's layers are built and at each call
    layers.LORA_KERNEL = path
    llm = LLM(base, device="cpu", dtype="float32", log_stats_interval=0, enable_lora=True, max_loras=3,
              max_num_batched_tokens=24)   # small: the start-up profile step runs the kernels too
    try:
        outs = llm.generate(e2e.PROMPTS, dataclasses.replace(e2e.GREEDY, max_tokens=NEW), use_tqdm=False,
                            lora_request=[loras.get(n) for n in names])
        for i, (out, name) in enumerate(zip(outs, names)):
            ids, lps = refs[name][i]
            comp = out.outputs[0]
            assert comp.token_ids == ids[:NEW], f"prompt {i} under {name}: {comp.token_ids} != {ids[:NEW]}"
            got = [next(iter(pos.values())).logprob for pos in comp.logprobs]
            np.testing.assert_allclose(got, lps[:NEW], atol=e2e.TOL, rtol=0)
        assert all(m.wide is not None for m in llm.engine.runner.lora.layers.values()) == (path == "wide")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
