"""A few trials of the engine's differential fuzz (engine_fuzz.py; run it for longer by hand): random engine
configurations and request mixes, each request's output equal to a plain engine's, no block left."""
import numpy as np
import pytest

from engine_fuzz import check_trial, make_models, random_trial

TRIALS = 40


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
