"""Contexts to the model's limit on CUDA: kernel offsets past int32, and a 120k-token prompt whose output is the
same with CUDA graphs and without (benchmarks/long_prompt.py's run, on a tiny model)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm.attention import torch_backend
from pagedllm.attention.metadata import AttentionMetadata

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def _long_prompt_module():
    spec = importlib.util.spec_from_file_location("long_prompt", ROOT / "benchmarks" / "long_prompt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metadata(rows, tables, block_size, device) -> AttentionMetadata:
    slots, starts = [], [0]
    for (seq_len, query_len), ids in zip(rows, tables):
        pos = torch.arange(seq_len - query_len, seq_len)
        slots += (ids[pos // block_size] * block_size + pos % block_size).tolist()
        starts.append(starts[-1] + query_len)
    width = max(len(t) for t in tables)
    bt = torch.zeros((len(rows), width), dtype=torch.int32)
    for i, ids in enumerate(tables):
        bt[i, :len(ids)] = ids
    seq_lens = [s for s, _ in rows]
    return AttentionMetadata(torch.tensor(slots, device=device), torch.tensor(starts, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), bt.to(device),
                             max(q for _, q in rows), max(seq_lens), starts, seq_lens)


def test_kernels_read_and_write_past_2_31_elements():
    """A cache whose K half holds more than 2^31 elements (8.6 GB in bf16), rows in its last blocks: every
    offset past int32 must be computed in int64 (reshape_and_cache, prefill, decode)."""
    from pagedllm.attention import triton_backend
    first_past = (1 << 31) // (16 * 8 * 128)                 # the first block whose K offset passes 2^31
    slot_max = check_top_blocks(triton_backend, first_past + 400, 16, 32, 8, 128, torch.bfloat16, "cuda",
                                top_n=400)
    assert slot_max * 8 * 128 >= 1 << 31


def check_top_blocks(backend, num_blocks, block_size, heads, kv_heads, dim, dtype, device, top_n) -> int:
    """Rows whose blocks are the cache's last top_n, against torch_backend on a compact copy of those blocks;
    returns the largest slot written."""
    cache = torch.empty((2, num_blocks, block_size, kv_heads, dim), dtype=dtype, device=device)
    rows = [(700, 100), (3001, 1), (300, 300), (1200, 1)]     # chunk after context, decode, fresh, decode
    gen = torch.Generator().manual_seed(0)
    top = torch.randperm(top_n, generator=gen) + num_blocks - top_n
    tables, k = [], 0
    for n in (-(-s // block_size) for s, _ in rows):
        tables.append(top[k:k + n])
        k += n
    assert k <= top_n
    used = top.to(device)
    cache[:, used] = torch.randn((2, top_n, block_size, kv_heads, dim), generator=gen).to(device, dtype)
    meta = _metadata(rows, tables, block_size, device)
    num_tokens = sum(q for _, q in rows)
    q, new_k, new_v = (torch.randn((num_tokens, h, dim), generator=gen).to(device, dtype)
                       for h in (heads, kv_heads, kv_heads))
    ref_cache = cache[:, used].clone()                         # the oracle's compact copy of the same blocks
    remap = {int(b): i for i, b in enumerate(top)}
    ref_meta = _metadata(rows, [torch.tensor([remap[int(b)] for b in t]) for t in tables], block_size, device)
    backend.write_kv(cache, new_k, new_v, meta.slot_mapping)
    torch_backend.write_kv(ref_cache, new_k, new_v, ref_meta.slot_mapping)
    assert torch.equal(cache[:, used], ref_cache)             # written to the right slots
    out = backend.paged_attention(q, cache, meta, dim ** -0.5)
    ref = torch_backend.paged_attention(q, ref_cache, ref_meta, dim ** -0.5)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-2, err
    return int(meta.slot_mapping.max())


def test_120k_prompt_same_tokens_with_and_without_cuda_graphs(tmp_path):
    """benchmarks/long_prompt.py on a tiny Llama-3.1-shaped model (llama3 rope, max_position 131072)."""
    from conftest import make_tiny_model
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = make_tiny_model(tmp_path / "m", max_position_embeddings=131072, rope_parameters=llama3)
    bench = _long_prompt_module()
    prompt = np.random.default_rng(0).integers(3, 512, size=120000).tolist()
    kw = {"model": model, "dtype": "bfloat16", "max_num_seqs": 4, "num_gpu_blocks_override": 7600,
          "log_stats_interval": 0}
    runs = [bench.run_prompt({**kw, "enforce_eager": eager}, prompt, 16, logprobs=2) for eager in (False, True)]
    assert [len(r["output_ids"]) for r in runs] == [16, 16]
    ids = [r["output_ids"] for r in runs]
    first = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), None)
    # where they part, both runs' two best tokens and logprobs: a near tie of the random model or a real fault
    assert first is None, f"graphs {ids[0]}, eager {ids[1]}; at {first}: {runs[0]['top'][first]} vs " \
                          f"{runs[1]['top'][first]}"
    assert all(r["ttft_s"] > 0 for r in runs)


def test_prompt_chunks_that_sample_nothing_read_their_own_inputs(tmp_path):
    """A 64k-token float32 prompt in 8k chunks: seven steps sample nothing, so the engine has no sampled ids to
    wait for and the host builds the next steps while the device is behind. The host arrays a step's inputs
    are copied from must not be rewritten before those copies ran (InputBuffers): the first token's logprobs
    match the prompt's run in one chunk (H100: failed twice before the fix)."""
    from conftest import make_tiny_model
    from pagedllm import LLM, SamplingParams
    model = make_tiny_model(tmp_path / "m", max_position_embeddings=65600)
    prompt = np.random.default_rng(0).integers(3, 512, size=65536).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    tops = []
    for chunk in (8192, 65536, 8192):
        llm = LLM(model=model, dtype="float32", enforce_eager=True, max_num_batched_tokens=chunk,
                  max_model_len=65600, log_stats_interval=0)
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        tops.append({t: lp.logprob for t, lp in out.logprobs[0].items()})
        del llm
        torch.cuda.empty_cache()
    for top in (tops[0], tops[2]):
        assert top.keys() == tops[1].keys()
        assert max(abs(top[t] - tops[1][t]) for t in top) < 2e-3, (top, tops[1])
