"""The benchmark workloads match the checksums of shared/benchmarks.md."""
import pytest

from pagedllm.bench import workloads


@pytest.mark.parametrize("name,total_in,total_out,first", [
    ("W1", 148_894, 148_756, [140, 8775, 9693, 868, 8180]),
    ("W2", 1_180_620, 292_020, [7421, 130, 5162, 8277, 7745]),
    ("W3", 1_075_200, 32_768, [8506, 6369, 5111, 2697, 3078]),
])
def test_workload_checksums(name, total_in, total_out, first):
    w = workloads.build(name)
    assert sum(map(len, w.prompts)) == total_in and sum(w.output_lens) == total_out
    assert w.prompts[0][:5] == first


def test_random_workload_ids_stay_below_a_small_vocabulary():
    """bench serve's random workload: ids below 10,000 (W1-W3's), or below a smaller model's vocabulary, whose
    server refuses ids past it (the demo model's 512: every request failed)."""
    from pagedllm.bench.workloads import random_workload
    small = random_workload(20, 64, 4, range_ratio=0.5, vocab_size=300)
    assert max(max(p) for p in small.prompts) < 300
    default = random_workload(20, 64, 4, range_ratio=0.5)
    assert max(max(p) for p in default.prompts) >= 9000     # the whole [0, 10000) range is drawn
    assert random_workload(20, 64, 4, range_ratio=0.5, vocab_size=151936).prompts == default.prompts
    assert [len(p) for p in small.prompts] == [len(p) for p in default.prompts]
