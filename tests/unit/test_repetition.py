"""repetition_detection (vLLM's): the output's tail repeats a pattern min_count times."""
import pytest

from pagedllm.core.repetition import RepetitionDetectionParams, ends_repeating
from pagedllm.sampling_params import SamplingParams


@pytest.mark.parametrize("tokens, params, repeats", [
    ([1, 2, 3, 3, 3], (1, 0, 3), True),
    ([1, 2, 3, 3], (1, 0, 3), False),
    ([9, 1, 2, 1, 2, 1, 2], (2, 0, 3), True),
    ([9, 1, 2, 1, 2, 1, 2], (3, 0, 3), True),          # size 2 found before 3 is tried
    ([9, 1, 2, 1, 2, 1, 2], (3, 3, 3), False),         # size 3 only: 1 2 1 | 2 1 2 differ
    ([5, 6, 7, 5, 6, 7], (3, 3, 2), True),
    ([5, 6, 7, 5, 6, 8], (3, 1, 2), False),
    ([4, 4, 4, 4], (0, 0, 0), False),                  # off
    ([4, 4], (1, 1, 3), False),                        # shorter than a pattern times the count
])
def test_ends_repeating(tokens, params, repeats):
    assert ends_repeating(tokens, RepetitionDetectionParams(*params)) is repeats


@pytest.mark.parametrize("value, message", [
    ({"max_pattern_size": 2, "min_count": 1}, "min_count must be >= 2"),
    ({"max_pattern_size": 1, "min_pattern_size": 2, "min_count": 2}, "min_pattern_size must be <= max_pattern_size"),
    ({"max_pattern_size": -1}, "max_pattern_size must be an integer >= 0"),
    ({"max_size": 3}, "unknown field 'max_size'"),
    ([3, 2], "must be a dict"),
])
def test_bad_params_name_the_field(value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.repetition_detection.*{message}"):
        SamplingParams(repetition_detection=value)
