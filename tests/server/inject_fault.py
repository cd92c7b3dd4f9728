"""`pagedllm serve` with a fault injected: a request with seed INJECT_SEED gets a seed of 2**70 after the
checks at the edge (as a gap in them would let through), so that the engine core raises for its data
(`Overflow when unpacking long long` making its generator). Run as a script by tests/server/test_faults.py."""
from pagedllm.engine.input_processor import InputProcessor

INJECT_SEED = 4242
_process = InputProcessor.process


def _process_then_break(self, request_id, prompt, params, *args):
    req = _process(self, request_id, prompt, params, *args)
    if params.seed == INJECT_SEED:
        for r in req.core_requests:
            object.__setattr__(r.sampling_params, "seed", 2**70)
    return req


InputProcessor.process = _process_then_break

if __name__ == "__main__":
    from pagedllm.cli import main
    main()
