"""vLLM's repetition_detection: a request ends (finish_reason "repetition", stop_reason "repetition_detected")
when its output ends with one pattern of min_pattern_size..max_pattern_size tokens repeated min_count times
in a row, e.g. "abcabcabc" for a pattern of 3 and a count of 3."""
from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionDetectionParams:
    max_pattern_size: int = 0   # 0: off
    min_pattern_size: int = 0   # 0: 1
    min_count: int = 0          # >= 2 when max_pattern_size is set

    def __post_init__(self):
        for name in ("max_pattern_size", "min_pattern_size", "min_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SamplingParams.repetition_detection.{name} must be an integer >= 0, got "
                                 f"{value!r}")
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError(f"SamplingParams.repetition_detection.min_pattern_size must be <= max_pattern_size "
                             f"({self.max_pattern_size}), got {self.min_pattern_size}")
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError(f"SamplingParams.repetition_detection.min_count must be >= 2 with max_pattern_size "
                             f"set, got {self.min_count}")

    @classmethod
    def from_dict(cls, value) -> "RepetitionDetectionParams":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"SamplingParams.repetition_detection must be a dict or RepetitionDetectionParams, "
                             f"got {type(value).__name__}")
        unknown = sorted(set(value) - {"max_pattern_size", "min_pattern_size", "min_count"})
        if unknown:
            raise ValueError(f"SamplingParams.repetition_detection has unknown field {unknown[0]!r} (known: "
                             f"max_pattern_size, min_pattern_size, min_count)")
        return cls(**value)


def ends_repeating(tokens: list[int], p: RepetitionDetectionParams) -> bool:
    """Whether tokens end with a pattern of an allowed size repeated min_count times."""
    if p.max_pattern_size <= 0:
        return False
    for size in range(max(p.min_pattern_size, 1), p.max_pattern_size + 1):
        span = size * p.min_count
        if span > len(tokens):
            return False
        tail = tokens[-span:]
        if tail == tail[:size] * p.min_count:
            return True
    return False
