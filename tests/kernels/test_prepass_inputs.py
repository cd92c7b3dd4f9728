"""The pre-pass's input kernel (spec_decode/prepass_kernel.py) against its torch definition: on CPU through the
Triton interpreter in a subprocess, and on CUDA."""
import pytest
from kernel_checks import run_under_interpreter
from prepass_cases import buffers, check, make_case


def test_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("prepass_cases.py", timeout=300)
    assert "ok 48 cases" in stdout, stdout


def test_cases_have_rows_that_fit_and_rows_that_do_not():
    """The generator must give both kinds of row, or the kernel's no-slot branch goes untested."""
    import random

    from pagedllm.spec_decode.prepass_inputs import prepass_inputs_torch
    case = make_case(random.Random(0), 70, "cpu")
    out = buffers(140, "cpu")
    prepass_inputs_torch(out, *case[:-1], case[-1], 2, 16)
    assert (out.slot_mapping[:70] == -1).any() and (out.slot_mapping[:70] >= 0).any()


@pytest.mark.gpu
def test_kernel_on_cuda():
    from pagedllm.spec_decode.prepass_kernel import prepass_inputs_cuda
    assert check(prepass_inputs_cuda, "cuda", seed=1) == 48


def test_kernel_compiles_for_hopper():
    """Without a GPU: both layouts through Triton's compiler and ptxas for sm_90 (the interpreter checks the
    math only), with the engine's dtypes."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedllm.spec_decode.prepass_kernel import _BLOCK, prepass_inputs_kernel
    for pairs in (True, False):
        consts = dict(BLOCK_SIZE=16, PAIRS=pairs, BLOCK=_BLOCK)
        sig = {name: "constexpr" if name in consts else "*i32" if name in ("table_ptr", "seq_lens_ptr")
               else "*i64" if name.endswith("_ptr") else "i32" for name in prepass_inputs_kernel.arg_names}
        src = ASTSource(fn=prepass_inputs_kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert "ld.local" not in compiled.asm["ptx"]
