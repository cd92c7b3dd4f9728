"""python3 benchmarks/decode_qkv_ab.py on|off SCRIPT.py|-m MODULE ARGS...: runs a benchmark with decode_qkv taken where
it serves (on) or never (off: the unfused path, as before it), in one checkout, for A/B figures from one machine."""
import runpy
import sys

if sys.argv[1] == "off":
    import pagedllm.attention.triton_backend as t
    t.takes_qkv = lambda meta, head_dim: False
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3]] + sys.argv[4:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
