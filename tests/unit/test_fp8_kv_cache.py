"""FP8 KV cache on CPU: torch_backend's write and read against float32 attention on K/V quantized and
dequantized the same way (K / k_scale, clamped to +-448, fp8, times k_scale); block bytes; block copies."""
import pytest
import torch
from transformers import LlamaConfig

from pagedllm.attention.kv_quant import dequantize, quantize, resolve_kv_cache_dtype
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention, write_kv
from pagedllm.layers.quantization.fp8 import FP8
from pagedllm.runner.kv_cache import allocate_kv_caches, bytes_per_block
from pagedllm.runner.kv_disk import model_identity
from pagedllm.runner.kv_offload import get_kv_from_block, put_kv_into_block

BS, BLOCKS, DIM = 4, 40, 16
REQUESTS = [(1, 1), (9, 1), (13, 13), (20, 5), (33, 1), (8, 3)]     # (seq_len, query_len)


def _qdq(x, scale):
    """What an fp8 cache gives back, computed independently of kv_quant: float32."""
    return (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def _dense(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("lhd,shd->hls", q.float(), k) * scale
    seq_len, query_len = k.shape[0], q.shape[0]
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - query_len, seq_len)[:, None]
    return torch.einsum("hls,shd->lhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def _step(hq, hkv, k_scale, v_scale, magnitude=1.0, seed=0):
    """Context K/V written in an earlier write_kv call, this step's tokens (and two padding tokens, slot -1)
    in one call, then paged_attention; -> out, reference, cache, real slots."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, BLOCKS, BS, hkv, DIM, dtype=FP8)
    free = torch.randperm(BLOCKS, generator=gen).tolist()
    tables = torch.zeros(len(REQUESTS), 10, dtype=torch.int32)
    qs, refs, new_k, new_v, new_slots, starts = [], [], [], [], [], [0]
    scale = DIM ** -0.5
    for i, (seq_len, query_len) in enumerate(REQUESTS):
        n = -(-seq_len // BS)
        tables[i, :n] = torch.tensor([free.pop() for _ in range(n)])
        k, v = (torch.randn(seq_len, hkv, DIM, generator=gen) * magnitude for _ in range(2))
        pos = torch.arange(seq_len)
        slots = tables[i].long()[pos // BS] * BS + pos % BS
        ctx = seq_len - query_len
        write_kv(cache, k[:ctx], v[:ctx], slots[:ctx], k_scale=k_scale, v_scale=v_scale)
        new_k.append(k[ctx:]), new_v.append(v[ctx:]), new_slots.append(slots[ctx:])
        q = torch.randn(query_len, hq, DIM, generator=gen)
        qs.append(q)
        refs.append(_dense(q, _qdq(k, k_scale), _qdq(v, v_scale), scale))
        starts.append(starts[-1] + query_len)
    pad = torch.full((2, hkv, DIM), 7.0)
    slot_mapping = torch.cat(new_slots + [torch.tensor([-1, -1])])
    write_kv(cache, torch.cat(new_k + [pad]), torch.cat(new_v + [pad]), slot_mapping, k_scale=k_scale,
             v_scale=v_scale)
    seq_lens = [s for s, _ in REQUESTS]
    meta = AttentionMetadata(slot_mapping, torch.tensor(starts, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), tables, max(q for _, q in REQUESTS),
                             max(seq_lens), starts, seq_lens)
    out = paged_attention(torch.cat(qs), cache, meta, scale, k_scale=k_scale, v_scale=v_scale)
    return out, torch.cat(refs), cache, tables


@pytest.mark.parametrize("hq,hkv", [(4, 2), (8, 1), (4, 4)])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.37, 2.5)])
def test_write_then_read_matches_quantized_reference(hq, hkv, k_scale, v_scale):
    out, ref, cache, _ = _step(hq, hkv, k_scale, v_scale)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_out_of_range_values_clamp_to_448_not_nan():
    out, ref, cache, _ = _step(4, 2, 1.0, 0.5, magnitude=400.0)   # many |K| > 448, |V| / 0.5 > 448
    values = cache.float()
    assert torch.isfinite(values).all() and values.abs().max() == 448
    # outputs near 448: float32 sums in another order (this CPU's kernels) differ by ~1.4e-4 relative
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)


def test_padding_slots_write_nothing():
    _, _, cache, tables = _step(4, 2, 1.0, 1.0)
    used = torch.zeros(BLOCKS, dtype=torch.bool)
    for row, (seq_len, _) in zip(tables, REQUESTS):
        used[row[:-(-seq_len // BS)].long()] = True
    assert (cache[:, ~used].view(torch.uint8) == 0).all()    # blocks of no request: zeros (the 7.0s went nowhere)


def test_quantize_helpers_and_dtype():
    x = torch.tensor([1.97, -1000.0, 0.3, 1e-4])
    assert quantize(x, 1.0).dtype == FP8
    assert dequantize(quantize(x, 2.0), 2.0).tolist() == _qdq(x, 2.0).tolist()
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == resolve_kv_cache_dtype("fp8_e4m3", torch.float16) \
        == torch.float8_e4m3fn


def test_block_bytes_half_of_bf16():
    assert 2 * bytes_per_block(28, 16, 8, 128, FP8) == bytes_per_block(28, 16, 8, 128, torch.bfloat16)


def test_fp8_blocks_copy_exactly_and_disk_identity_differs(tmp_path):
    caches = allocate_kv_caches(2, 8, BS, 2, DIM, FP8, torch.device("cpu"))
    for c in caches:
        c.view(torch.uint8).copy_(torch.randint(0, 256, c.shape, dtype=torch.uint8))
    kv = get_kv_from_block(caches, [5, 1])
    assert kv.dtype == FP8
    put_kv_into_block(caches, [2, 7], kv)
    for layer in caches:
        assert torch.equal(layer[:, [2, 7]].view(torch.uint8), layer[:, [5, 1]].view(torch.uint8))
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=64).to_json_file(tmp_path / "config.json")
    hf = LlamaConfig.from_pretrained(tmp_path)
    ids = {model_identity(str(tmp_path), hf, dtype, BS, "dummy", "cpu", quant)
           for dtype in (FP8, torch.bfloat16) for quant in (None, "fp8")}
    assert len(ids) == 4


def test_fp8_disk_identity_names_the_model_dtype(tmp_path):
    """An fp8 cache's blocks hold what the model computed in its own dtype, quantized: a bf16 engine's blocks
    are other values than a float32 engine's, so the two never read each other's block files."""
    LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=64).to_json_file(tmp_path / "config.json")
    hf = LlamaConfig.from_pretrained(tmp_path)
    ids = {model_identity(str(tmp_path), hf, FP8, BS, "dummy", "cpu", None, model_dtype)
           for model_dtype in (torch.bfloat16, torch.float32)}
    assert len(ids) == 2
    # a KV cache in the model's own dtype: the identity it always had (block files written before stay valid)
    assert model_identity(str(tmp_path), hf, torch.bfloat16, BS, "dummy", "cpu", None, torch.bfloat16) == \
        model_identity(str(tmp_path), hf, torch.bfloat16, BS, "dummy", "cpu")
