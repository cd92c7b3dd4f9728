"""Checks of the fused Gumbel-max sampling kernel, shared by the CUDA tests and the Triton-interpreter run
(python tests/kernels/sampling_cases.py with TRITON_INTERPRET=1)."""
import torch

from pagedllm.sample.gumbel_kernel import BLOCK, CHUNK, draw_seeds, gumbel_sample


def check_distribution(device: str, vocab: int = 40, num_draws: int = 4000, temperature: float = 0.7,
                       tolerance: float = 0.035, **sizes) -> float:
    """Many rows of the same logits, one seed each: token frequencies match softmax(logits / T). Returns the
    largest absolute difference of a frequency from its probability (tolerance: about 4 standard errors
    of the draws plus the ~1% that bf16 logits shift probabilities by)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 2
    logits[3] = float("-inf")                       # masked: never drawn
    probs = torch.softmax(logits / temperature, dim=-1)
    rows = logits.expand(num_draws, vocab).to(device=device, dtype=torch.bfloat16)
    seeds = torch.randint(0, 2**62, (num_draws,), generator=gen).to(device)
    temps = torch.full((num_draws,), temperature, device=device)
    drawn = gumbel_sample(rows, seeds, temps, **sizes).cpu()
    freq = torch.bincount(drawn, minlength=vocab).double() / num_draws
    assert freq[3] == 0, "a masked token was drawn"
    err = (freq - probs.double()).abs().max().item()
    assert err < tolerance, f"frequencies differ from softmax by {err:.3f}"
    return err


def check_chunks_and_seeds(device: str, chunk: int = CHUNK, block: int = BLOCK) -> float:
    """Across vocab chunks: a dominant token in the last chunk always wins; the same seed gives the same
    draw whatever the other rows are, and NaN logits are never drawn."""
    vocab = 2 * chunk + 123
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, vocab, generator=gen)
    logits[0, vocab - 5] = 60.0
    logits[1, :] = float("nan")
    logits[1, 7] = 0.0                              # the only finite entry of row 1
    logits = logits.to(device)
    seeds = torch.arange(6, dtype=torch.int64, device=device) * 7919
    drawn = gumbel_sample(logits, seeds, chunk=chunk, block=block).cpu()
    assert drawn[0] == vocab - 5 and drawn[1] == 7, drawn
    assert ((drawn >= 0) & (drawn < vocab)).all()
    alone = gumbel_sample(logits[4:5], seeds[4:5], chunk=chunk, block=block).cpu()
    assert alone[0] == drawn[4], "a row's draw depends on its batch"
    other = gumbel_sample(logits[4:5], seeds[4:5] + 1, chunk=chunk, block=block).cpu()
    again = gumbel_sample(logits[4:5], seeds[4:5], chunk=chunk, block=block).cpu()
    assert again[0] == alone[0]
    return float(other[0] != alone[0])


def check_row_seeds(device: str) -> float:
    """Seeded rows take their own seed (sampler.position_seed), the others one from the engine's generator."""
    def seeds():
        return draw_seeds(3, {1: 42}, torch.Generator(device).manual_seed(0), torch.device(device))
    a, b = seeds(), seeds()
    assert torch.equal(a, b) and a[1] == 42 and a[0] != a[2]
    return 0.0


def interpreter_cases():
    # Small chunks and blocks: the interpreter runs Philox in numpy, element by element of each block.
    yield "distribution", lambda: check_distribution("cpu", vocab=6, num_draws=500, tolerance=0.1, chunk=64, block=16)
    yield "chunks-and-seeds", lambda: check_chunks_and_seeds("cpu", chunk=256, block=32)
    yield "row-seeds", lambda: check_row_seeds("cpu")


if __name__ == "__main__":
    for name, check in interpreter_cases():
        print(f"ok {name} {check():.3f}", flush=True)
