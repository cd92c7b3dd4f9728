"""`pagedllm serve` with faults injected, run as a script by tests/server/test_faults.py:
- a request with seed INJECT_SEED loses its prompt token ids after the checks at the edge (as a gap in them would
  let through), so that the engine core raises for its data as it makes the request (`TypeError: 'NoneType'
  object is not iterable`);
- a request with a seed of SLOW_SEEDS holds the engine core's loop for that many seconds while it is read
  there (unpickled), as a long step would."""
import time

from pagedllm.engine.input_processor import InputProcessor
from pagedllm.sampling_params import SamplingParams

INJECT_SEED = 4242
SLOW_SEEDS = {4300: 3.5, 4301: 12.0}
_process = InputProcessor.process


class SlowToLoad(SamplingParams):
    """Sleeps in the engine core process as it is unpickled (the class pickles as __main__'s, which spawn
    maps to this script there too)."""

    def __setstate__(self, state):
        time.sleep(SLOW_SEEDS[state["seed"]])
        self.__dict__.update(state)


def _process_then_break(self, request_id, prompt, params, *args, **kwargs):
    req = _process(self, request_id, prompt, params, *args, **kwargs)
    if params.seed == INJECT_SEED:
        for r in req.core_requests:
            object.__setattr__(r, "prompt_token_ids", None)
    if params.seed in SLOW_SEEDS:
        for r in req.core_requests:
            slow = SlowToLoad.__new__(SlowToLoad)
            slow.__dict__.update(r.sampling_params.__dict__)
            r.sampling_params = slow
    return req


InputProcessor.process = _process_then_break

if __name__ == "__main__":
    from pagedllm.cli import main
    main()
