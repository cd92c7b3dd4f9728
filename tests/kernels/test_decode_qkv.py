"""triton_backend.decode_qkv (q/k norm, rotary and the K/V store inside the decode kernel) against the torch code:
on CUDA (fresh random decode steps), and on CPU through the Triton interpreter in a subprocess."""
import random

import pytest
import torch
from decode_qkv_cases import check_decode_qkv, decode_rows, interpreter_cases
from kernel_checks import run_under_interpreter


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("decode_qkv_cases.py", timeout=300)
    assert stdout.count("ok ") == len(list(interpreter_cases())), stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,cache_dtype,kv_scales", [
    (torch.float32, None, (1.0, 1.0)), (torch.bfloat16, None, (1.0, 1.0)), (torch.float16, None, (1.0, 1.0)),
    (torch.bfloat16, torch.float8_e4m3fn, (1.0, 1.0)), (torch.float16, torch.float8_e4m3fn, (0.43, 2.7))], ids=str)
@pytest.mark.parametrize("heads,head_dim", [((16, 8), 128), ((32, 8), 128), ((14, 2), 64), ((8, 8), 128)], ids=str)
@pytest.mark.parametrize("num_rows", [1, 5, 20])   # 20: more rows than a small step (PARTITION)
@pytest.mark.parametrize("norm", ["qk_norm", "rope_only", "gemma_qk_norm"])   # gemma: Gemma 3's (1 + weight)
def test_decode_qkv_matches_torch(dtype, cache_dtype, kv_scales, heads, head_dim, num_rows, norm):
    rng = random.Random(num_rows * 1000 + head_dim + heads[0])
    rows = [(rng.randint(2, 3000), 1) for _ in range(num_rows)] if num_rows < 5 else decode_rows(rng, num_rows, 2000)
    check_decode_qkv(rows, *heads, head_dim, 16, dtype, "cuda", norm == "qk_norm", cache_dtype, kv_scales,
                     seed=rng.randrange(1 << 16), gemma=norm == "gemma_qk_norm")
