"""The fused Gumbel-max sampling kernel: draws follow softmax(logits / T), across vocab chunks, per-row seeds.
On CUDA, and on CPU through the Triton interpreter in a subprocess."""
import pytest
import torch
from kernel_checks import run_under_interpreter
from sampling_cases import check_chunks_and_seeds, check_distribution, check_row_seeds, interpreter_cases

from pagedllm.sample.sampler import Sampler, SamplingMetadata
from pagedllm.sampling_params import SamplingParams


def test_kernel_under_triton_interpreter():
    pytest.importorskip("triton")
    stdout = run_under_interpreter("sampling_cases.py", timeout=300)
    assert stdout.count("ok ") == len(list(interpreter_cases())), stdout


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_distribution(temperature):
    check_distribution("cuda", vocab=300, num_draws=20000, temperature=temperature)


@pytest.mark.gpu
def test_chunks_and_seeds():
    check_chunks_and_seeds("cuda")
    check_row_seeds("cuda")


@pytest.mark.gpu
def test_sampler_on_cuda_uses_the_kernel_and_keeps_seeded_rows_independent():
    """Through Sampler: plain, temperature and top-p rows; a seeded row's token does not depend on its batch."""
    vocab = 151_936
    logits = torch.randn(8, vocab, device="cuda", dtype=torch.bfloat16) * 3
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.6),
              SamplingParams(temperature=0.0)] + [SamplingParams(temperature=1.0, top_p=0.9)] * 5

    def sample(rows):
        meta = SamplingMetadata.build([params[i] for i in rows], [params[i].seed for i in rows], [[]] * len(rows),
                                      "cuda")
        return Sampler()(logits[rows], meta, torch.Generator("cuda").manual_seed(0)).sampled_token_ids.tolist()

    everything = sample(list(range(8)))
    assert everything[2] == logits[2].float().argmax().item()      # the greedy row
    assert sample([0])[0] == everything[0]
    assert sample([0, 2, 1])[0] == everything[0]
