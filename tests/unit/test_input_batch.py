"""Persistent input buffers: the flat inputs of a step, block tables updated by diffs, graph padding."""
import numpy as np
import torch

from pagedllm.attention import triton_backend
from pagedllm.attention.shared_prefix import plan_shared_prefix
from pagedllm.runner.cuda_graph import CudaGraphs, capture_sizes, mixed_capture_sizes, mixed_graph_token_cap
from pagedllm.runner.input_batch import BlockTables, InputBuffers, RunnerRequestState
from pagedllm.sampling_params import SamplingParams

BS = 4


def make_req(tables, name, token_ids, block_ids, computed):
    return RunnerRequestState(name, token_ids, len(token_ids), SamplingParams(), tables.add(block_ids),
                              len(block_ids), computed, None)


def test_mixed_step_inputs():
    tables = BlockTables(max_blocks_per_req=8, num_rows=1)   # forces the table to grow
    a = make_req(tables, "a", list(range(100, 109)), [7, 3, 5], 6)    # 6 cached, runs 3 (positions 6..8)
    b = make_req(tables, "b", [200, 201, 202], [9], 2)               # decode of position 2
    c = make_req(tables, "c", [300, 301, 302, 303, 304], [2, 4], 0)  # prompt chunk: first 2 of 5
    buf = InputBuffers(max_tokens=16, max_reqs=4, max_blocks_per_req=8, device=torch.device("cpu"))
    inp = buf.build([a, b, c], [3, 1, 2], tables, BS)
    assert inp.input_ids.tolist() == [106, 107, 108, 202, 300, 301]
    assert inp.positions.tolist() == [6, 7, 8, 2, 0, 1]
    assert inp.attn_metadata.slot_mapping.tolist() == [3 * BS + 2, 3 * BS + 3, 5 * BS + 0, 9 * BS + 2,
                                                        2 * BS + 0, 2 * BS + 1]
    assert inp.attn_metadata.query_start_loc.tolist() == [0, 3, 4, 6]
    assert inp.attn_metadata.seq_lens.tolist() == [9, 3, 2]
    bt = inp.attn_metadata.block_tables
    assert bt[0, :3].tolist() == [7, 3, 5] and bt[1, :1].tolist() == [9] and bt[2, :2].tolist() == [2, 4]
    assert inp.sample_rows == [0, 1]                  # c's chunk does not reach the end of its prompt
    assert inp.sample_token_index.tolist() == [2, 3]


def test_tokens_in_flight_are_taken_from_the_previous_steps_samples():
    """A decode row's input may be the token the previous step is still sampling: it is copied from that
    step's device tensor, by the request's row there, in the same order or not."""
    tables = BlockTables(max_blocks_per_req=4)
    a = make_req(tables, "a", [1, 2, 3], [0], 3)         # runs position 3, whose token is in flight
    b = make_req(tables, "b", [5, 6], [1], 1)            # runs position 1 (known) and 2 (in flight)
    c = make_req(tables, "c", [7, 8, 9], [2], 2)         # runs position 2, known
    buf = InputBuffers(max_tokens=16, max_reqs=4, max_blocks_per_req=4, device=torch.device("cpu"))
    prev = torch.tensor([70, 80, 90])
    inp = buf.build([a, b, c], [1, 2, 1], tables, BS, in_flight={"b": 0, "a": 2}, in_flight_ids=prev)
    assert inp.input_ids.tolist() == [90, 6, 70, 9]
    assert inp.sample_rows == [0, 1, 2]
    inp = buf.build([a, c], [1, 1], tables, BS, in_flight={"a": 0}, in_flight_ids=prev)   # the same order
    assert inp.input_ids.tolist() == [70, 9]


def test_block_table_diffs_and_row_reuse():
    tables = BlockTables(max_blocks_per_req=4, num_rows=2)
    r0, r1 = tables.add([1, 2]), tables.add([3])
    tables.set(r0, 2, [8])
    assert tables.table[r0, :3].tolist() == [1, 2, 8]
    tables.release(r0)
    assert tables.add([5]) == r0
    assert tables.table[r1, 0] == 3


def test_padded_decode_rows_read_nothing():
    tables = BlockTables(max_blocks_per_req=8)
    reqs = [make_req(tables, str(i), [1] * (5 + i), [i, 10 + i], 4 + i) for i in range(3)]
    buf = InputBuffers(max_tokens=8, max_reqs=8, max_blocks_per_req=8, device=torch.device("cpu"))
    inp = buf.build(reqs, [1, 1, 1], tables, BS, pad_tokens=4, pad_rows=4, max_seq_len_bound=32)
    meta = inp.attn_metadata
    assert inp.input_ids.shape[0] == 4 and inp.sample_rows == [0, 1, 2]
    assert meta.slot_mapping.tolist()[3] == -1
    assert meta.seq_lens.tolist() == [5, 6, 7, 0]
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 3]     # the padding row has no token
    assert meta.max_seq_len == 32 and meta.max_query_len == 1
    assert np.array_equal(meta.block_tables[:3, :2].numpy(), [[0, 10], [1, 11], [2, 12]])


def test_padded_mixed_step_keeps_real_tokens_first():
    """A mixed step padded to a graph's shape: rows with no tokens, and tokens of no row with slot -1."""
    tables = BlockTables(max_blocks_per_req=8)
    a = make_req(tables, "a", list(range(10, 16)), [3, 4], 0)     # prompt of 6
    b = make_req(tables, "b", [20, 21, 22], [5], 2)               # decode
    buf = InputBuffers(max_tokens=16, max_reqs=5, max_blocks_per_req=8, device=torch.device("cpu"))
    inp = buf.build([a, b], [6, 1], tables, BS, pad_tokens=16, pad_rows=5, max_seq_len_bound=64)
    meta = inp.attn_metadata
    assert inp.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 22] + [0] * 9
    assert meta.slot_mapping.tolist()[7:] == [-1] * 9
    assert meta.query_start_loc.tolist() == [0, 6, 7, 7, 7, 7]
    assert meta.seq_lens.tolist() == [6, 3, 0, 0, 0]
    assert inp.sample_rows == [0, 1] and inp.sample_token_index.tolist() == [5, 6]


def test_capture_sizes_cover_every_batch():
    sizes = capture_sizes(100)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 100
    mixed = mixed_capture_sizes(8192)
    assert mixed[:6] == [16, 32, 64, 128, 256, 512] and mixed[-1] == 8192
    assert all(b <= 1.25 * a for a, b in zip(mixed[5:], mixed[6:]))     # padding adds at most 25% above 512
    assert mixed_capture_sizes(100)[-1] == 100 and mixed_capture_sizes(65536)[-1] == 8192
    assert mixed_graph_token_cap(7_000_000_000) < 1024 and mixed_graph_token_cap(440_000_000) > 8192  # 8B, 0.6B
    graphs = CudaGraphs(sizes, mixed)
    assert [graphs.padded_size(n, False) for n in (1, 3, 9, 97, 100, 101)] == [1, 4, 16, 100, 100, None]
    assert [graphs.padded_size(n, True) for n in (2, 17, 513, 8192, 8193)] == [16, 32, 640, 8192, None]
    assert sorted(graphs.keys) == sorted([(n, False, False, False) for n in sizes]
                                         + [(n, True, False, False) for n in mixed])
    shared = CudaGraphs(sizes, mixed, shared=True).keys
    assert sorted(n for n, mixed, s, lora in shared if s) == [n for n in sizes if n >= 2]
    with_lora = CudaGraphs(sizes, mixed, shared=True, lora=True).keys   # each graph with the kernels and without
    assert sorted(with_lora) == sorted([k[:3] + (lora,) for k in shared for lora in (False, True)])


def test_decode_graphs_never_pad_across_the_small_batch_segments():
    """triton_backend.decode_partition picks shorter segments for decode steps of at most SMALL_BATCH_ROWS rows;
    a decode graph must make the same choice as the eager step it replaces, so padding never crosses it."""
    small = triton_backend.SMALL_BATCH_ROWS
    for max_num_seqs in range(1, 300):
        graphs = CudaGraphs(capture_sizes(max_num_seqs), [])
        for n in range(1, max_num_seqs + 1):
            assert (graphs.padded_size(n, False) <= small) == (n <= small), (max_num_seqs, n)


def _plan(tables, query_lens, seq_lens, rows_per_item=2, max_items=64, block_size=BS):
    n = len(seq_lens)
    first_seg, items, rows = np.zeros(n, np.int32), np.zeros((max_items, 4), np.int32), np.zeros(n, np.int32)
    k = plan_shared_prefix(np.asarray(tables, np.int32), np.asarray(query_lens), np.asarray(seq_lens), block_size,
                           rows_per_item, max_items, first_seg, items, rows)
    return first_seg.tolist(), items[:k].tolist(), rows.tolist()


def test_shared_prefix_plan(monkeypatch):
    """Whole segments that a group's tables agree on, before every row's last token; decode rows only."""
    monkeypatch.setattr(triton_backend, "PARTITION", 2 * BS)      # segments of 2 blocks
    monkeypatch.setattr(triton_backend, "MAX_SEGMENTS", 8)
    common = [50, 51, 52, 53, 54]
    tables = [common + [60, 0], [70, 71, 72, 73, 0, 0, 0], common + [61, 0], common[:3] + [99, 62, 63, 0],
              [70, 71, 72, 73, 74, 0, 0], common + [64, 0], [70, 71, 72, 73, 0, 0, 0]]
    query_lens = [1, 1, 1, 1, 1, 1, 5]
    seq_lens = [23, 13, 24, 27, 17, 22, 16]
    first_seg, items, rows = _plan(tables, query_lens, seq_lens)
    # rows 0, 2, 3, 5 start with block 50 and agree on 3 blocks (row 3 differs at the 4th): 1 segment;
    # rows 1 and 4 agree on 4 blocks, but row 1's last token is at position 12, in its 4th block: 1 segment;
    # row 6 is a prefill chunk.
    assert first_seg == [1, 1, 1, 1, 1, 1, 0]
    assert rows[:6] == [0, 2, 3, 5, 1, 4]
    assert items == [[0, 0, 2, 0], [0, 2, 2, 0], [0, 4, 2, 1]]
    # items past max_items: that group is left to decode_partition
    first_seg, items, _ = _plan(tables, query_lens, seq_lens, max_items=2)
    assert first_seg == [1, 0, 1, 1, 0, 1, 0] and len(items) == 2
    # too long for PARTITION-token segments (8 segments of 2 blocks = 64 tokens): no plan
    assert _plan(tables, query_lens, [65] * 7)[1] == []


def test_small_decode_steps_share_only_long_contexts(monkeypatch):
    """Decode-only steps of at most SMALL_BATCH_ROWS rows (a speculative verify: k + 1 rows of one request)
    run per row at SMALL_BATCH_PARTITION while their contexts sum to fewer than SMALL_BATCH_SHARE_FROM tokens:
    no plan there; larger steps, steps with a prefill chunk and longer contexts plan as before."""
    monkeypatch.setattr(triton_backend, "PARTITION", 2 * BS)
    monkeypatch.setattr(triton_backend, "SMALL_BATCH_ROWS", 4)
    monkeypatch.setattr(triton_backend, "SMALL_BATCH_SHARE_FROM", 87)
    common = [50, 51, 52, 53]
    verify = ([common + [60 + i] for i in range(4)], [1] * 4, [20, 21, 22, 23])   # 86 tokens in all
    assert _plan(*verify)[1] == []
    longer = (verify[0], verify[1], [21, 22, 23, 24])
    assert _plan(*longer)[0] == [2, 2, 2, 2]       # 4 common blocks: 2 segments of 2
    mixed = (verify[0], [1, 1, 1, 3], [20, 21, 22, 23])          # a prefill chunk: not a small decode step
    assert _plan(*mixed)[0] == [2, 2, 2, 0]
    five = ([common + [60 + i] for i in range(5)], [1] * 5, [20, 21, 22, 23, 20])  # more rows than SMALL_BATCH_ROWS
    assert _plan(*five)[0] == [2] * 5


def test_build_plans_shared_segments_and_pads_the_graph_grid(monkeypatch):
    monkeypatch.setattr(triton_backend, "PARTITION", 2 * BS)
    monkeypatch.setattr(triton_backend, "SMALL_BATCH_SHARE_FROM", 0)   # its 3 rows plan too
    tables = BlockTables(max_blocks_per_req=8)
    reqs = [make_req(tables, str(i), [1] * (13 + i), [5, 6, 7, 10 + i], 12 + i) for i in range(3)]
    buf = InputBuffers(max_tokens=8, max_reqs=4, max_blocks_per_req=8, device=torch.device("cpu"),
                       shared_rows_per_item=2)
    plan = buf.build(reqs, [1, 1, 1], tables, BS, share=True).attn_metadata.shared
    assert plan.first_seg.tolist() == [1, 1, 1] and plan.rows_per_item == 2
    assert plan.items.tolist() == [[0, 0, 2, 0], [0, 2, 1, 0]] and plan.rows[:3].tolist() == [0, 1, 2]
    graph = buf.build(reqs, [1, 1, 1], tables, BS, pad_tokens=4, pad_rows=4, share=True, share_grid=6)
    plan = graph.attn_metadata.shared
    assert plan.first_seg.tolist() == [1, 1, 1, 0] and plan.items.shape == (6, 4)
    assert plan.items[2:, 2].tolist() == [0] * 4                 # spare programs see count 0
    assert buf.build(reqs, [1, 1, 1], tables, BS).attn_metadata.shared is None          # share off
    lone = buf.build(reqs[:1], [1], tables, BS, share=True).attn_metadata.shared
    assert lone is None


def test_slots_past_int32_with_large_block_ids():
    """A slot is block_id * block_size + offset in int64: block ids near the top of int32 give slots past
    2^31 (a cache of more than 2^31 token slots), which int32 arithmetic would wrap to negative (padding)."""
    tables = BlockTables(max_blocks_per_req=4, num_rows=2)
    big = (1 << 31) // 16 + 5                              # slot ~2^31 + 80 at block size 16
    a = make_req(tables, "a", list(range(40)), [big, 2**31 - 1, 7], 10)     # runs positions 10..29
    buf = InputBuffers(max_tokens=32, max_reqs=2, max_blocks_per_req=4, device=torch.device("cpu"))
    inp = buf.build([a], [20], tables, 16)
    expected = [big * 16 + p for p in range(10, 16)] + [(2**31 - 1) * 16 + p - 16 for p in range(16, 30)]
    assert inp.attn_metadata.slot_mapping.tolist() == expected
    assert inp.positions.tolist() == list(range(10, 30))
