"""Per-request sampling parameters, validated where they enter (field names and meanings as in vLLM)."""
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1                       # independent completions of the same prompt (prompt KV shared)
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0               # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                   # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0               # drop tokens with probability < min_p * max probability
    seed: int | None = None          # per-request generator: same seed, same output, whatever the batch
    max_tokens: int | None = 16      # None = up to max_model_len
    min_tokens: int = 0              # EOS and stop_token_ids are masked until this many tokens
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None      # top-N logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Filled by the engine from the tokenizer / generation config, not by users.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self):
        _require(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _require(self.temperature >= 0.0, "temperature", ">= 0", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "-1, 0 (all) or a positive integer",
                 self.top_k)
        _require(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _require(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None", self.seed)
        _require(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                 "max_tokens", "an integer >= 1 or None", self.max_tokens)
        _require(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                 f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        # Stop strings are matched on text; without detokenization they would be silently ignored.
        _require(self.detokenize or not self.stop, "stop", "empty when detokenize is False", self.stop)
        _require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 "a list of non-negative token ids", self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _require(v is None or (isinstance(v, int) and v >= 0), name, "None or an integer >= 0", v)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate_vocab(self, vocab_size: int, max_logprobs: int = 20):
        """Checks that need the model: token ids in the vocabulary, logprobs count within the limit."""
        for t in self.stop_token_ids:
            _require(t < vocab_size, "stop_token_ids", f"< vocab size {vocab_size}", t)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _require(v is None or v <= max_logprobs, name, f"<= {max_logprobs}", v)


def _require(ok: bool, name: str, allowed: str, value):
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")
