"""The engine with LoRA through the Triton kernels on CPU (TRITON_INTERPRET=1, a process of its own): three
adapters and the base mixed in one generate call, whole prompts and prompts in chunks beside decode rows, give
transformers + PEFT's greedy tokens and logprobs (tests/e2e/test_lora.py's check: tokens equal, within 1e-4).
Exercises what the kernel cases do not: the manager's slot order, padding, and the layers' shard bounds."""
import importlib.util
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))


def main():
    from conftest import make_tiny_model
    from pagedllm import LoRARequest
    from pagedllm.lora.layers import LoRALinear
    spec = importlib.util.spec_from_file_location("lora_e2e", TESTS / "e2e" / "test_lora.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        base = make_tiny_model(root / "base")
        loras = {name: LoRARequest(name, i + 1, e2e.make_adapter(base, root / name, i, **kw))
                 for i, (name, kw) in enumerate(e2e.ADAPTERS.items())}
        setup = (base, loras, e2e._references(base, loras))
        LoRALinear.kernels_on_cpu = True
        for kw in ({"max_num_batched_tokens": 24},):   # small: the start-up profile step runs the kernels too
            e2e.run(setup, **kw)
            print(f"ok engine {kw}", flush=True)


if __name__ == "__main__":
    main()
