"""Host cost of the speculative-decoding pieces on CPU, µs per call (median of repeats):
the n-gram proposer at 1k and 30k tokens (a list growing by one token a call, as in decoding; a new list
each call; a numpy array), and the rejection sampler at R rows, s drafts, V = 152k, next to the plain
Sampler drawing one token for each of the R rows.

    OMP_NUM_THREADS=1 python benchmarks/spec_decode_cost.py
"""
import json
import random
import statistics
import time

import numpy as np
import torch

from pagedllm.sample.sampler import Sampler, SamplingMetadata
from pagedllm.sampling_params import SamplingParams
from pagedllm.spec_decode.ngram import NgramProposer
from pagedllm.spec_decode.rejection_sampler import rejection_sample


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def token_streams(num_tokens: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    zipf = np.random.default_rng(0).zipf(1.3, num_tokens) % 151_000   # a few very frequent tokens
    return {
        "random 152k vocab (no match: a full scan)": [rng.randrange(152_000) for _ in range(num_tokens)],
        "zipf (frequent tokens: many candidates)": zipf.tolist(),
    }


def bench_ngram(repeats: int = 200):
    proposer = NgramProposer(min_n=1, max_n=4, k=4)
    for num_tokens in (1_000, 30_000):
        for name, stream in token_streams(num_tokens + repeats).items():
            ids = stream[:num_tokens]
            decode = iter(stream[num_tokens:])
            cached = median_us(lambda: (ids.append(next(decode)), proposer.propose(ids, 4)), repeats)
            fresh = median_us(lambda: proposer.propose(list(ids), 4), 30)   # a new list: full conversion
            array = np.array(ids)
            numpy_in = median_us(lambda: proposer.propose(array, 4), repeats)
            print(json.dumps(dict(bench="ngram", tokens=num_tokens, stream=name, us_growing_list=cached,
                                  us_new_list=fresh, us_numpy=numpy_in)))


def bench_rejection(num_rows: int, s: int, vocab: int = 152_000, repeats: int = 30):
    logits = torch.randn(num_rows * (s + 1), vocab)
    drafts = torch.randint(vocab, (num_rows * s,))
    for name, params in (("greedy", SamplingParams(temperature=0.0)),
                         ("temperature 0.7", SamplingParams(temperature=0.7)),
                         ("top_p 0.9", SamplingParams(top_p=0.9)), ("top_k 50", SamplingParams(top_k=50))):
        meta = SamplingMetadata.build([params] * num_rows, [None] * num_rows, [[]] * num_rows, "cpu")
        us = median_us(lambda: rejection_sample(logits, [s] * num_rows, drafts, meta, None), repeats)
        plain = median_us(lambda: Sampler()(logits[:num_rows], meta), repeats)   # one token a row, no drafts
        print(json.dumps(dict(bench="rejection", rows=num_rows, s=s, vocab=vocab, params=name, us=us,
                              us_plain_sampler=plain)))


if __name__ == "__main__":
    torch.manual_seed(0)
    bench_ngram()
    bench_rejection(1, 4)
    bench_rejection(8, 4, repeats=10)
