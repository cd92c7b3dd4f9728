"""A few trials of the engine's differential fuzz (engine_fuzz.py; run it for longer by hand): random engine
configurations and request mixes, each request's output equal to a plain engine's, no block left; offline,
through the server's AsyncLLM, and on a GPU."""
import numpy as np
import pytest

from engine_fuzz import check_trial, make_models, random_trial

TRIALS = 20   # the CPU suite's share (its 15-minute budget); engine_fuzz.py runs any number by hand


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("start", range(0, TRIALS, 10))
def test_engine_fuzz(models, tmp_path, start):
    failures = {}
    for t in range(start, start + 10):
        trial = random_trial(np.random.default_rng(t), models)
        errors, _ = check_trial(trial, models, tmp_path)
        if errors:
            failures[t] = (trial.config, errors[:3])
    assert not failures, failures


def test_engine_fuzz_async(models, tmp_path):
    """The server's engine (AsyncLLM, its core process): requests as tasks that start at their arrivals, stream
    in the three output kinds and leave early (aborts)."""
    failures = {}
    for t in range(100, 103):
        trial = random_trial(np.random.default_rng(t), models)
        errors, _ = check_trial(trial, models, tmp_path, use_async=True)
        if errors:
            failures[t] = (trial.config, errors[:3])
    assert not failures, failures


@pytest.mark.gpu
def test_engine_fuzz_cuda(models, tmp_path):
    """The same on the GPU, CUDA graphs on (padded decode and mixed steps, graphs with and without LoRA rows):
    float32 there too, both engines on the device."""
    failures = {}
    for t in range(12):
        trial = random_trial(np.random.default_rng(t), models)
        errors, _ = check_trial(trial, models, tmp_path, device="cuda")
        if errors:
            failures[t] = (trial.config, errors[:3])
    assert not failures, failures
