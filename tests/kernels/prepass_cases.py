"""prepass_inputs' Triton kernel against its torch definition (spec_decode/prepass_inputs.py): random verify
results (every row's emitted count from 1 to s + 1, some rows past their slots), both layouts and every pass
index, over the whole buffers (rows past the layout's must stay as they were). Run as a script under the
Triton interpreter on CPU (test_prepass_inputs.py), or through check() on CUDA."""
import random
import types

import torch

from pagedllm.spec_decode.prepass_inputs import prepass_inputs_torch

BLOCK_SIZE = 16


def make_case(rng: random.Random, num_rows: int, device: str, emitted_dtype=torch.int64):
    k = 4
    spec = [rng.randint(1, k) for _ in range(num_rows)]
    emitted = [rng.randint(1, s + 1) for s in spec]
    base = [rng.randint(1, 3000) for _ in range(num_rows)]
    # most rows have slots for all their lookahead; some end early (a pass past them feeds nothing)
    limits = [(-(-(b + s + rng.choice([0, 0, 1, -s, -s - 1])) // BLOCK_SIZE)) * BLOCK_SIZE for b, s in zip(base, spec)]
    max_blocks = max(lim // BLOCK_SIZE for lim in limits) + rng.randint(0, 2)
    table = torch.randint(0, 10_000, (num_rows, max_blocks), dtype=torch.int32)
    tokens = torch.randint(0, 150_000, (num_rows, k + 1), dtype=torch.int64)
    prev_ids = torch.randint(0, 150_000, (num_rows,), dtype=torch.int64)
    as_tensor = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt)  # noqa: E731
    inputs = (tokens, as_tensor(emitted, emitted_dtype), as_tensor(base), as_tensor(spec), as_tensor(limits), table,
              prev_ids)
    return tuple(t.to(device) for t in inputs)


def buffers(n: int, device: str):
    fill = lambda dt: torch.full((n,), 777, dtype=dt, device=device)  # noqa: E731
    return types.SimpleNamespace(input_ids=fill(torch.int64), positions=fill(torch.int64),
                                 slot_mapping=fill(torch.int64), seq_lens=fill(torch.int32))


def check(kernel, device: str, seed: int) -> int:
    """Cases run; raises on the first difference."""
    rng, runs = random.Random(seed), 0
    for num_rows in (1, 2, 3, 8, 33, 70):
        for emitted_dtype in (torch.int64, torch.int32):
            case = make_case(rng, num_rows, device, emitted_dtype)
            for j in range(4):
                want, got = buffers(2 * num_rows + 5, device), buffers(2 * num_rows + 5, device)
                prev = None if j == 0 else case[-1]
                k_want = prepass_inputs_torch(want, *case[:-1], prev, j, BLOCK_SIZE)
                k_got = kernel(got, *case[:-1], prev, j, BLOCK_SIZE)
                assert k_got == k_want
                for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
                    assert torch.equal(getattr(got, name), getattr(want, name)), \
                        f"{name} differs: {num_rows} rows, pass {j}, num_emitted {emitted_dtype}"
                runs += 1
    return runs


if __name__ == "__main__":
    from pagedllm.spec_decode.prepass_kernel import prepass_inputs_cuda
    print(f"ok {check(prepass_inputs_cuda, 'cpu', seed=0)} cases", flush=True)
