"""Fused Triton kernels of the CUDA path: one launch where the torch code runs a chain of elementwise ops.

The torch code in pagedllm/layers stays the CPU path and the test oracle (`forward_native`). Every kernel
keeps the torch op order and rounds to the activations' dtype where torch does, so half-precision results
match torch's up to the last-bit effects of a different reduction order. All launches are CUDA-graph safe:
grid sizes depend only on shapes, and nothing reads device data on the host.
"""
