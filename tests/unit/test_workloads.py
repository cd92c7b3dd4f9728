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
