"""Reshape-and-cache: copy each token's K and V (num_kv_heads x head_dim) into its cache slot.

One program per token; slot -1 (padding, e.g. the unused rows of a CUDA-graph batch) returns at once, so
padding costs no mask gather and no host sync.

An fp8 cache (compile-time: the cache pointer's element type) gets K * k_inv and V * v_inv (1 / scale) in
float32, clamped to +-448, cast with round-to-nearest: the bytes torch_backend.write_kv writes.
"""
import triton
import triton.language as tl


@triton.jit
def reshape_and_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_inv, v_inv,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_ELEMS: tl.constexpr, NUM_ELEMS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)      # token * stride passes 2^31 for wide models at 100k+ tokens a step
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    idx = tl.arange(0, NUM_ELEMS_PAD)            # flat (head, dim) index of one token
    mask = idx < NUM_ELEMS
    head, dim = idx // HEAD_DIM, idx % HEAD_DIM
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot + head * stride_c_head + dim
    k = tl.load(k_ptr + token * stride_k_tok + head * stride_k_head + dim, mask=mask)
    v = tl.load(v_ptr + token * stride_v_tok + head * stride_v_head + dim, mask=mask)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv, -448.0), 448.0)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
