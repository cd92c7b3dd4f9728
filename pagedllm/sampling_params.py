"""Per-request sampling parameters, validated where they enter (field names and meanings as in vLLM)."""
import copy
import enum
import logging
import math
import os
from dataclasses import dataclass, field

from pagedllm.core.repetition import RepetitionDetectionParams
from pagedllm.field_types import is_int
from pagedllm.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2   # vLLM's: a temperature in (0, this) samples at this (smaller ones risk inf/NaN)
# Seeds are taken modulo 2**64 (sampler.position_seed): negatives as their two's complement
SEED_MIN, SEED_END = -2**63, 2**64
MAX_LOGPROB_TOKEN_IDS = 128   # vLLM's bound on logprob_token_ids

logger = logging.getLogger("pagedllm")
_BIAS = "a map of token ids to finite biases (or -inf)"
_DEFAULT_WHEN_NONE = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p")


def clamped_logit_bias(bias: dict) -> dict:
    """Each bias clamped into [-100, 100], as vLLM's server clamps them (SamplingParams.from_optional): -inf and
    +inf (JSON's 1e400) too. NaN is no bias: left for SamplingParams to refuse by name (vLLM's max/min made it
    -100)."""
    return {k: min(100.0, max(-100.0, v)) if _number(v) and v == v else v   # v == v: not NaN
            for k, v in bias.items()}


class SamplingType(enum.IntEnum):
    """vLLM's: how a request's tokens are drawn (SamplingParams.sampling_type)."""
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    """vLLM's: what AsyncLLM's outputs of a request hold (LLM.generate returns the final ones whatever it is)."""
    CUMULATIVE = 0   # every step: the full text so far
    DELTA = 1        # every step: only what is new
    FINAL_ONLY = 2   # one output, when every sequence has finished


@dataclass
class SamplingParams:
    n: int = 1                       # independent completions of the same prompt (prompt KV shared)
    presence_penalty: float = 0.0    # subtracted once from each token already in the output
    frequency_penalty: float = 0.0   # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # tokens in prompt or output: positive logits / p, negative * p
    temperature: float = 1.0         # in [0, 2]; 0 = greedy; (0, 0.01) is raised to 0.01, as vLLM does
    top_p: float = 1.0               # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                   # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0               # drop tokens with probability < min_p * max probability
    seed: int | None = None          # same seed, same output, whatever the batch (sampler.position_seed);
                                     # -1 = None (vLLM's: a random draw, as UIs send "no seed")
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16      # None = up to max_model_len
    min_tokens: int = 0              # EOS and stop_token_ids are masked until this many tokens
    logprobs: int | None = None      # top-N logprobs per generated token (plus the sampled one); -1 = the vocabulary
    prompt_logprobs: int | None = None   # as logprobs, for each prompt token after the first
    # vLLM's: the logprobs of these ids (not the top-N) at each generated position, beside the sampled token's;
    # logprobs becomes their number. Their ranks are not computed (None).
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False      # vLLM's: logprobs and prompt_logprobs come as FlatLogprobs (outputs.py)
    detokenize: bool = True
    skip_special_tokens: bool = True
    # vLLM's; taken and not used: fast tokenizers (AutoTokenizer's choice when there is one) join special tokens
    # as their decoder does, and vLLM's fast detokenizer ignores it too
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    skip_clone: bool = False         # vLLM's: clone() makes a shallow copy (the caller vouches it is not shared)
    structured_outputs: StructuredOutputsParams | None = None   # JSON schema, regex, choice, grammar, ...
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit (str keys, as JSON sends them)
    allowed_token_ids: list[int] | None = None   # only these may be sampled
    extra_args: dict | None = None   # vLLM's: for the caller's own code (plugins); nothing here reads it
    # vLLM's: with --enable-return-routed-experts, the prompt tokens whose expert routing is left out; that flag
    # is refused here (no mixture-of-experts model is built), so no routing is returned to trim
    routed_experts_prompt_start: int = 0
    bad_words: list[str] | None = None           # never generated (tokenized by the engine)
    # vLLM's: the request reads no cached prefix (its whole prompt is computed); None: True with prompt_logprobs,
    # which need every prompt position (so they skip it whatever this says)
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    # vLLM's: end (finish_reason "repetition") when the output ends with a pattern repeated (core/repetition.py)
    repetition_detection: RepetitionDetectionParams | None = None
    # vLLM's fields above, in vLLM 0.26's order (a positional SamplingParams(n, presence_penalty, ...) means the
    # same); pagedllm's own below
    best_of: int | None = None       # vLLM v0's: run best_of samples, return the n of highest cumulative logprob
    truncate_prompt_tokens: int | None = None    # keep k of the prompt's tokens; -1 = max_model_len
    # which end truncate_prompt_tokens cuts (vLLM's): left keeps the last k tokens, right the first k, of the
    # tokens a text encodes to, its BOS among them; None (vLLM's unset): the tokenizer's own truncation, left,
    # which keeps the special tokens it adds (BOS, then the text's last k - 1)
    truncation_side: str | None = None
    # Reasoning (the server sets these from --reasoning-parser): the token that ends the output's reasoning
    # (`</think>`): structured_outputs applies only after it. thinking_token_budget (vLLM's): once the open
    # reasoning block holds this many tokens, the end token is the next one. The block opens after the last
    # reasoning_start_token_id (`<think>`) of the prompt and output not followed by an end token; without a
    # start id, at the output's start (until an end token comes).
    reasoning_end_token_id: int | None = None
    reasoning_start_token_id: int | None = None
    # mistral's rule where the prompt holds no start token: the output's first token decides; the start token opens
    # the reasoning (the constraint waits for the end token), else it is the constraint's first token. vLLM's first
    # token is free there (its grammar starts after it), so its answer may open with a token the constraint refuses
    reasoning_first_token_decides: bool = False
    # Filled by the engine from the tokenizer / generation config, not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)   # the ids that end the request
    # What min_tokens bans: the stop ids and the EOS ids, also with ignore_eos (vLLM's: ignore_eos only keeps
    # EOS from ending the request)
    min_tokens_banned_ids: set[int] = field(default_factory=set, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(self.stop is None or isinstance(self.stop, (list, tuple)), "stop",
                 "a string, a list of strings or None", self.stop)
        _require(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple, set)),
                 "stop_token_ids", "a list of token ids or None", self.stop_token_ids)
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name in ("logprobs", "prompt_logprobs"):   # vLLM's: True asks for one (the sampled token's and top 1)
            if getattr(self, name) is True:
                setattr(self, name, 1)
        if is_int(self.thinking_token_budget) and self.thinking_token_budget == -1:   # vLLM's: -1 is unlimited
            self.thinking_token_budget = None
        if is_int(self.seed) and self.seed == -1:   # vLLM's "no seed": a fixed seed here would repeat outputs
            self.seed = None
        if self.logit_bias is not None:
            self.logit_bias = _int_keys(self.logit_bias)
        for name in ("allowed_token_ids", "bad_words"):
            value = getattr(self, name)
            _require(value is None or isinstance(value, (list, tuple, set)), name, "None or a list", value)
            setattr(self, name, None if value is None else list(value))
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self._take_logprob_token_ids()
        if self.repetition_detection is not None:
            self.repetition_detection = RepetitionDetectionParams.from_dict(self.repetition_detection)
        self._validate()
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = self.prompt_logprobs is not None
        # vLLM's: the stop ids are among them from the start (the engine adds the EOS ids)
        self.all_stop_token_ids = set(self.all_stop_token_ids) | set(self.stop_token_ids)
        if 0 < self.temperature < _MIN_TEMPERATURE:   # vLLM's: sampled at 0.01, not greedy
            logger.warning("temperature %s is below %s, which may give inf or NaN: it is raised to %s",
                           self.temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE

    def _take_logprob_token_ids(self):
        ids = self.logprob_token_ids
        _require(ids is None or (isinstance(ids, (list, tuple)) and all(is_int(t) and t >= 0 for t in ids)),
                 "logprob_token_ids", "None or a list of non-negative token ids", ids)
        # vLLM's: logprobs, when set beside them, is the number of ids as given (repeats and an empty list too)
        _require(ids is None or self.logprobs is None or self.logprobs == len(ids), "logprobs",
                 f"None or the number of logprob_token_ids ({len(ids or ())}) when both are set", self.logprobs)
        if not ids:   # vLLM's: an empty list asks for nothing
            self.logprob_token_ids = None
            return
        _require(len(ids) <= MAX_LOGPROB_TOKEN_IDS, "logprob_token_ids", f"at most {MAX_LOGPROB_TOKEN_IDS} ids",
                 ids)
        ids = self.logprob_token_ids = list(dict.fromkeys(ids))   # each id's logprob once
        self.logprobs = len(ids)

    def _validate(self):
        _require(is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        max_n = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))   # vLLM's bound, and its variable
        _require(self.n <= max_n, "n", f"at most {max_n} (raise the VLLM_MAX_N_SEQUENCES environment variable "
                 "for more)", self.n)
        _require(self.best_of is None or (is_int(self.best_of) and self.best_of >= self.n), "best_of",
                 f"None or an integer >= n ({self.n})", self.best_of)
        # vLLM's bound since 0.24 (OpenAI's): a larger temperature is refused, not sampled
        _require(_finite(self.temperature) and 0.0 <= self.temperature <= 2.0, "temperature", "in [0, 2]",
                 self.temperature)
        _require(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _require(is_int(self.top_k) and self.top_k >= 0, "top_k", "-1, 0 (all) or a positive integer", self.top_k)
        _require(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _require(self.seed is None or (is_int(self.seed) and SEED_MIN <= self.seed < SEED_END), "seed",
                 "an integer in [-2**63, 2**64) or None", self.seed)
        self._validate_penalties()
        _require(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
                 "max_tokens", "an integer >= 1 or None", self.max_tokens)
        _require(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0",
                 self.min_tokens)
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                 f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        # Stop strings are matched on text; without detokenization they would be silently ignored.
        _require(self.detokenize or not self.stop, "stop", "empty when detokenize is False", self.stop)
        _require(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "a list of non-negative token ids", self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _require(v is None or (is_int(v) and v >= -1), name, "None, -1 (the vocabulary) or an integer >= 0", v)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize",
                     "spaces_between_special_tokens", "skip_clone", "flat_logprobs"):
            _require(isinstance(getattr(self, name), bool), name, "True or False", getattr(self, name))
        t = self.truncate_prompt_tokens
        _require(t is None or (is_int(t) and (t >= 1 or t == -1)), "truncate_prompt_tokens",
                 "an integer >= 1, -1 (max_model_len) or None", t)
        _require(isinstance(self.output_kind, RequestOutputKind), "output_kind",
                 "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)", self.output_kind)
        _require(is_int(self.routed_experts_prompt_start) and self.routed_experts_prompt_start >= 0,
                 "routed_experts_prompt_start", "an integer >= 0", self.routed_experts_prompt_start)
        _require(self.skip_reading_prefix_cache is None or isinstance(self.skip_reading_prefix_cache, bool),
                 "skip_reading_prefix_cache", "None, True or False", self.skip_reading_prefix_cache)
        _require(self.extra_args is None or isinstance(self.extra_args, dict), "extra_args", "None or a dict",
                 self.extra_args)
        _require(self.truncation_side in (None, "left", "right"), "truncation_side", "None, left or right",
                 self.truncation_side)
        for name in ("reasoning_end_token_id", "reasoning_start_token_id"):
            v = getattr(self, name)
            _require(v is None or (is_int(v) and v >= 0), name, "None or an integer >= 0", v)
        decides = self.reasoning_first_token_decides
        _require(isinstance(decides, bool) and not (
            decides and None in (self.reasoning_start_token_id, self.reasoning_end_token_id)),
            "reasoning_first_token_decides", "a bool, True only with reasoning_start_token_id and "
            "reasoning_end_token_id", self.reasoning_first_token_decides)
        v = self.thinking_token_budget
        _require(v is None or (is_int(v) and v >= 0), "thinking_token_budget",
                 "None, -1 (unlimited) or an integer >= 0", v)
        _require(self.thinking_token_budget is None or self.reasoning_end_token_id is not None,
                 "thinking_token_budget", "set with reasoning_end_token_id (the token it forces)",
                 self.thinking_token_budget)

    def _validate_penalties(self):
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _require(_finite(v) and -2.0 <= v <= 2.0, name, "in [-2, 2]", v)
        _require(_finite(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
                 "a finite number > 0", self.repetition_penalty)
        # vLLM's SamplingParams adds each bias as given (from_optional, the server's path, clamps it into
        # [-100, 100]): -1e9 or -inf bans a token. +inf and NaN would make every probability NaN.
        _require(self.logit_bias is None or all(_finite(b) or b == -math.inf for b in self.logit_bias.values()),
                 "logit_bias", _BIAS, self.logit_bias)
        _require(self.allowed_token_ids is None or (self.allowed_token_ids and all(
            is_int(t) and t >= 0 for t in self.allowed_token_ids)), "allowed_token_ids",
                 "None or a non-empty list of non-negative token ids", self.allowed_token_ids)
        _require(self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words),
                 "bad_words", "a list of non-blank strings", self.bad_words)

    @classmethod
    def from_optional(cls, **fields) -> "SamplingParams":
        """vLLM's: None for n, a penalty, temperature or top_p means its default (a request's JSON null); other
        fields are taken as given (max_tokens=None: up to max_model_len). Each logit_bias value is clamped into
        [-100, 100], as vLLM's is (its keys may be JSON's strings)."""
        if isinstance(fields.get("logit_bias"), dict):
            fields["logit_bias"] = clamped_logit_bias(fields["logit_bias"])
        return cls(**{k: v for k, v in fields.items() if v is not None or k not in _DEFAULT_WHEN_NONE})

    def clone(self) -> "SamplingParams":
        """vLLM's: a deep copy, to change for one request without touching the others' (with skip_clone, a
        shallow one)."""
        return copy.copy(self) if self.skip_clone else copy.deepcopy(self)

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def reads_prefix_cache(self) -> bool:
        """Whether cached KV may stand for the prompt's leading blocks: not with skip_reading_prefix_cache, nor
        with prompt_logprobs (they need every position computed)."""
        return not self.skip_reading_prefix_cache and self.prompt_logprobs is None

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs: best_of of them when set, else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def sampling_type(self) -> SamplingType:
        """vLLM's: greedy (temperature below 1e-5), else seeded or not."""
        if self.greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def num_logprobs(self) -> int | None:
        """vLLM's: the logprobs asked per generated token (logprob_token_ids' number when they are named), or
        None."""
        return self.logprobs

    def validate_vocab(self, vocab_size: int, max_logprobs: int):
        """Checks that need the model: token ids in the vocabulary, logprobs count within the engine's
        max_logprobs (-1, the vocabulary, only where that is the vocabulary: vLLM's --max-logprobs -1)."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            for t in getattr(self, name) or ():
                _require(t < vocab_size, name, f"< vocab size {vocab_size}", t)
        for name in ("reasoning_end_token_id", "reasoning_start_token_id"):
            t = getattr(self, name)
            _require(t is None or t < vocab_size, name, f"< vocab size {vocab_size}", t)
        for t in self.logit_bias or ():
            _require(t < vocab_size, "logit_bias", f"keyed by token ids < vocab size {vocab_size}", t)
        for t in self.logprob_token_ids or ():
            _require(t < vocab_size, "logprob_token_ids", f"token ids < vocab size {vocab_size}", t)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if name == "logprobs" and self.logprob_token_ids is not None:
                continue   # their own bound
            whole = f" (-1 is the vocabulary: {vocab_size} tokens)" if v == -1 else ""
            _require(v is None or (vocab_size if v == -1 else v) <= max_logprobs, name,
                     f"<= max_logprobs ({max_logprobs}){whole}", v)


def _require(ok: bool, name: str, allowed: str, value):
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {_short(value)}")


def _short(value) -> str:
    """Errors echo the value, cut short: a 5 MB field must not make a 5 MB error."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _number(v) -> bool:   # an int or float, not a bool
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    """A real number that is not inf or NaN (bool and huge ints, which overflow float, are not)."""
    if not _number(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _int_keys(bias) -> dict:
    """OpenAI's logit_bias arrives as JSON, so with str keys ("50256"): both forms become int token ids."""
    _require(isinstance(bias, dict), "logit_bias", _BIAS, bias)
    out = {}
    for k, v in bias.items():
        try:
            t = int(k) if is_int(k) or (isinstance(k, str) and k.strip().lstrip("+-").isdigit()) else None
        except ValueError:
            t = None
        _require(t is not None and t >= 0, "logit_bias", "keyed by non-negative token ids", k)
        out[t] = v
    return out


def __getattr__(name: str):
    """vLLM's module holds BeamSearchParams too (its benchmarks' `from vllm.sampling_params import
    BeamSearchParams`); it lives in beam_search.py, which imports this module, so it is read on first use."""
    if name == "BeamSearchParams":
        from pagedllm.beam_search import BeamSearchParams
        return BeamSearchParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
