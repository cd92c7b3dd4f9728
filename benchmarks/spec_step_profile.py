"""Where a speculative step's time goes (batch 1, W5 shape, synthetic acceptance 0.8): host time of each part
of EngineCore._spec_step (no added syncs), then a torch profiler table of the same steps.

    python benchmarks/spec_step_profile.py TARGET_DIR DRAFT_DIR
"""
import collections
import functools
import sys
import time

import numpy as np
import torch

from pagedllm import LLM, SamplingParams

TIMES = collections.defaultdict(float)
COUNTS = collections.Counter()


def timed(obj, name, label):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[label] += time.perf_counter() - start
            COUNTS[label] += 1
    setattr(obj, name, wrapper)


def main():
    target, draft = sys.argv[1:3]
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 4,
            "rejection_sample_method": "synthetic", "synthetic_acceptance_rates": [0.8, 0.64, 0.512, 0.4096]}
    llm = LLM(target, load_format="dummy", max_model_len=4096, log_stats_interval=0, skip_tokenizer_init=True,
              speculative_config=spec)
    prompt = np.random.default_rng(1).integers(0, 10000, size=1000).tolist()
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    core = llm.engine.core
    runner = core.runner
    timed(core, "_spec_step", "spec_step (all)")
    timed(core.scheduler, "schedule", "schedule")
    timed(core.scheduler, "update_from_output", "update_from_output")
    timed(core.speculator, "propose", "propose (policy)")
    timed(runner, "execute_async", "execute_async (all launches)")
    timed(runner.draft, "propose", "draft.propose (launches)")
    timed(runner.draft, "_wait_for_host_arrays", "draft: wait for host arrays")
    timed(runner.buffers, "build", "target build")
    timed(runner, "_verify", "rejection sample launch")
    timed(runner.draft.model, "compute_logits", "draft logits")
    import pagedllm.runner.model_runner as mr
    timed(mr.PendingOutput, "result", "result (waits for the device)")
    start = time.perf_counter()
    out = llm.generate([prompt[:-1] + [7]], params, use_tqdm=False)
    wall = time.perf_counter() - start
    steps = COUNTS["spec_step (all)"]
    print(f"wall {wall:.3f} s, {len(out[0].outputs[0].token_ids)} tokens, {steps} spec steps, "
          f"{wall / steps * 1e3:.2f} ms a step")
    for label, t in sorted(TIMES.items(), key=lambda x: -x[1]):
        print(f"{label:40s} {t / steps * 1e3:8.3f} ms a step  ({COUNTS[label]} calls)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt[:-1] + [8]], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                     use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
