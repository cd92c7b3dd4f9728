"""`--speculative-config`: vLLM's keys, checked once; an unknown key is an error, never ignored."""
import json
import os
from dataclasses import dataclass, fields

from pagedllm.config import QUANTIZATIONS
from pagedllm.field_types import check_types
from pagedllm.spec_decode.vllm_keys import take_vllm_keys, vllm_method

_METHODS = ("ngram", "draft_model")
_REJECTION_METHODS = ("standard", "synthetic")   # vLLM 0.26's names; its "block" is not built here

# The policy's defaults (see Speculator): speculation makes steps synchronous and multiplies each row's tokens by
# k + 1, which is free only while the step is bound by reading the weights. Measured on one H200 (Qwen3-8B shape,
# benchmarks/RESULTS.md): past these, verify steps cost more than the tokens they save.
DEFAULT_MAX_BATCH = 16          # speculate only while at most this many requests run or wait
DEFAULT_MAX_STEP_TOKENS = 64    # rows x (k + 1) of a step at most: fewer proposals per row beyond it


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None                 # draft_model: the draft checkpoint (same tokenizer and vocabulary)
    # draft_model: the draft's own quantization (fp8: quantized at load); None: its checkpoint's quantization_config
    # if any, else none. As vLLM's, the target's --quantization is not the draft's
    quantization: str | None = None
    prompt_lookup_min: int | None = None     # ngram: shortest suffix matched
    prompt_lookup_max: int | None = None     # ngram: longest suffix matched (tried first)
    rejection_sample_method: str = "standard"  # synthetic: accept with fixed rates (benchmarks on dummy weights)
    synthetic_acceptance_rate: float | None = None        # each position, given the one before accepted
    synthetic_acceptance_rates: list[float] | None = None  # per position, unconditional (vLLM's)
    synthetic_acceptance_length: float | None = None      # mean accepted length (vLLM's): rates set from it
    disable_by_batch_size: int = DEFAULT_MAX_BATCH
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    # vLLM's: None is the target's tensor_parallel_size, the one value built (check_ranks)
    draft_tensor_parallel_size: int | None = None

    def __post_init__(self):
        check_types(self, "speculative_config: ")   # JSON types before ranges
        k = self.num_speculative_tokens
        _check(self.method in _METHODS, "method", f"one of {_METHODS}", self.method)
        _check(1 <= k <= 16, "num_speculative_tokens", "an integer in [1, 16]", k)
        if self.method == "ngram":
            _check(self.model is None, "model", "unset with method ngram", self.model)
            # vLLM's defaults: one given sets the other; neither gives 5 and 5
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            self.prompt_lookup_min = lo if lo is not None else (hi if hi is not None else 5)
            self.prompt_lookup_max = hi if hi is not None else self.prompt_lookup_min
            _check(1 <= self.prompt_lookup_min <= self.prompt_lookup_max, "prompt_lookup_min",
                   f"in [1, prompt_lookup_max={self.prompt_lookup_max}]", self.prompt_lookup_min)
        else:
            _check(bool(self.model) and os.path.isdir(self.model), "model",
                   "the draft checkpoint's directory (an existing one) with method draft_model", self.model)
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                _check(getattr(self, name) is None, name, "unset with method draft_model", getattr(self, name))
        # vLLM ignores it without a draft model; here a key that changes nothing is refused
        _check(self.quantization is None or (self.method == "draft_model" and self.quantization in QUANTIZATIONS),
               "quantization", f"None, or one of {QUANTIZATIONS} with method draft_model", self.quantization)
        if self.rejection_sample_method == "strict":   # pagedllm's name for it before vLLM's
            self.rejection_sample_method = "standard"
        _check(self.rejection_sample_method in _REJECTION_METHODS, "rejection_sample_method",
               f"one of {_REJECTION_METHODS}", self.rejection_sample_method)
        synthetic = self.rejection_sample_method == "synthetic"
        self._rates_of_length(synthetic)
        given = (self.synthetic_acceptance_rate is not None) + (self.synthetic_acceptance_rates is not None)
        _check(given == (1 if synthetic else 0), "synthetic_acceptance_rate",
               "given (or synthetic_acceptance_rates), exactly one, with rejection_sample_method synthetic only",
               self.synthetic_acceptance_rate)
        if self.synthetic_acceptance_rate is not None:
            _check(0 <= self.synthetic_acceptance_rate <= 1, "synthetic_acceptance_rate", "in [0, 1]",
                   self.synthetic_acceptance_rate)
        rates = self.synthetic_acceptance_rates
        if rates is not None:
            _check(len(rates) == k and all(0 <= r <= 1 for r in rates)
                   and all(b <= a for a, b in zip(rates, rates[1:])), "synthetic_acceptance_rates",
                   f"{k} non-increasing rates in [0, 1] (one per speculative position)", rates)
        _check(self.disable_by_batch_size >= 1, "disable_by_batch_size", ">= 1", self.disable_by_batch_size)
        _check(self.max_step_tokens >= 2, "max_step_tokens", ">= 2", self.max_step_tokens)

    def _rates_of_length(self, synthetic: bool):
        """vLLM's synthetic_acceptance_length L: per-position rates of mean L - 1 accepted drafts with the least
        variance (1.0 while whole drafts remain, the fraction, then 0.0), in place of synthetic_acceptance_rates."""
        length, k = self.synthetic_acceptance_length, self.num_speculative_tokens
        if length is None:
            return
        _check(synthetic and self.synthetic_acceptance_rate is None and self.synthetic_acceptance_rates is None,
               "synthetic_acceptance_length", "given with rejection_sample_method synthetic only, and not with "
               "synthetic_acceptance_rate(s)", length)
        _check(1 <= length <= k + 1, "synthetic_acceptance_length", f"in [1, {k + 1}]", length)
        whole = int(length - 1)
        self.synthetic_acceptance_rates = ([1.0] * whole + [length - 1 - whole] + [0.0] * k)[:k]

    @classmethod
    def parse(cls, value: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config must be a JSON object: {e}") from None
        _check(isinstance(value, dict), "speculative_config", "a JSON object", value)
        value = take_vllm_keys(vllm_method(value))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        _check(not unknown, "speculative_config", f"made of the keys {sorted(known)}", unknown)
        _check("method" in value and "num_speculative_tokens" in value, "speculative_config",
               "given method and num_speculative_tokens", value)
        return cls(**value)

    def check_ranks(self, tensor_parallel_size: int):
        """draft_tensor_parallel_size: vLLM's default, the target's size (the draft sharded over the target's
        ranks), is what runs; vLLM's other choice, 1 under a larger target, is not built."""
        n, asked = tensor_parallel_size, self.draft_tensor_parallel_size
        _check(asked in (None, n), "draft_tensor_parallel_size", f"None or {n} (the target's tensor_parallel_size: "
               f"the draft is sharded over the target's ranks; a draft on one rank of several is not built)", asked)

    def conditional_rates(self) -> list[float] | None:
        """Synthetic mode: acceptance probability of each position given the one before accepted."""
        if self.synthetic_acceptance_rate is not None:
            return [self.synthetic_acceptance_rate] * self.num_speculative_tokens
        if self.synthetic_acceptance_rates is None:
            return None
        rates, prev = [], 1.0
        for r in self.synthetic_acceptance_rates:
            rates.append(r / prev if prev > 0 else 0.0)
            prev = r
        return rates


def _check(ok: bool, name: str, limit: str, value):
    if not ok:
        raise ValueError(f"speculative_config: {name} must be {limit}, got {value!r}")
