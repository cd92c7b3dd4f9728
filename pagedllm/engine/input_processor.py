"""InputProcessor: a user request where it enters: tokenize, validate, split into its n sequences.

Runs where the user's call is (the offline Engine, or AsyncLLM's API process), so that a request that can
never run is a ValueError at once and the engine core only ever sees valid token ids.
"""
import dataclasses
import numbers
import time
from dataclasses import dataclass

from pagedllm.engine.core import EngineCoreRequest
from pagedllm.engine.output_processor import child_request_id
from pagedllm.engine.tokenizer import load_eos_token_ids, num_added_tokens
from pagedllm.sampling_params import SEED_END, SamplingParams
from pagedllm.structured_output.grammar_spec import validate as validate_structured_outputs


@dataclass
class ProcessedRequest:
    prompt: str | None                 # the text, when the prompt came as text
    prompt_token_ids: list[int]
    params: SamplingParams             # with the engine's stop token ids filled in
    arrival_time: float
    core_requests: list[EngineCoreRequest]   # one per sequence (n)


class InputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], vocab_size: int, max_model_len: int,
                 block_size: int, num_blocks: int, enable_prefix_caching: bool, scheduling_policy: str = "fcfs", *,
                 max_logprobs: int, structured_outputs_config: dict | None = None):
        """max_logprobs: the most logprobs a request may ask for (EngineConfig.logprobs_bound). n has no bound
        but SamplingParams' (VLLM_MAX_N_SEQUENCES): sequences past max_num_seqs wait for a place, as vLLM's."""
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.scheduling_policy = scheduling_policy
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_kv_tokens = num_blocks * block_size   # the most one sequence can hold in the KV cache
        self.enable_prefix_caching = enable_prefix_caching
        # --structured-outputs-config's JSON options, which vLLM applies to every request's JSON constraint
        self.json_options = {k: True for k in ("disable_any_whitespace", "disable_additional_properties")
                             if (structured_outputs_config or {}).get(k)}

    @classmethod
    def for_engine(cls, config, tokenizer, vocab_size: int, max_model_len: int, num_blocks: int) -> "InputProcessor":
        """The offline Engine's and AsyncLLM's: the checkpoint's EOS ids, the config's limits."""
        eos = load_eos_token_ids(config.model, tokenizer, config.generation_config)
        return cls(tokenizer, eos, vocab_size, max_model_len, config.block_size, num_blocks,
                   config.enable_prefix_caching, config.scheduling_policy,
                   max_logprobs=config.logprobs_bound(vocab_size),
                   structured_outputs_config=config.structured_outputs_config)

    def process(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams,
                arrival_time: float | None = None, cache_salt: str | None = None,
                lora_request=None, kv_parent: str | None = None, hold_kv: bool = False,
                priority: int = 0) -> ProcessedRequest:
        """Raises ValueError, naming the field and the limit, for a request that can never run. prompt: text, token
        ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids} (prompt_value).
        cache_salt: only requests of the same salt share blocks (beam search: the beams of one search, even
        with prefix caching off); None: a dict prompt's own "cache_salt" (vLLM's) with prefix caching on, else the
        engine's rule below. kv_parent / hold_kv: see EngineCoreRequest."""
        # The outputs' prompt: the text, also a TokensPrompt's optional "prompt" (vLLM's; LLM.chat's rendering)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt if isinstance(prompt, str) else None
        if cache_salt is None and self.enable_prefix_caching:   # off, no request shares blocks: a salt changes nothing
            cache_salt = prompt_cache_salt(prompt)
        prompt = prompt_value(prompt)
        num_seqs = params.num_sequences
        self.check_priority(priority)
        if kv_parent is not None and not isinstance(kv_parent, str):
            raise ValueError(f"kv_parent must be a request id (str) or None, got {type(kv_parent).__name__}")
        if self.tokenizer is None:
            params = _without_tokenizer(prompt, params)
        # A text's truncation keeps the BOS its encoding added where no side is given (vLLM's: the tokenizer
        # truncates it); with a side, vLLM cuts the encoded tokens, BOS and all, as it cuts ids as given
        added = (num_added_tokens(self.tokenizer) if isinstance(prompt, str) and params.truncate_prompt_tokens
                 and params.truncation_side is None else (0, 0))
        prompt_ids = truncate_prompt(self._prompt_ids(prompt), params.truncate_prompt_tokens, self.max_model_len,
                                     params.truncation_side or "left", added)
        params.validate_vocab(self.vocab_size, self.max_logprobs)
        if params.structured_outputs is not None:   # a bad schema, regex or grammar: refused now, offline too
            so = params.structured_outputs
            if self.json_options and so.kind in ("json", "json_object"):
                params = dataclasses.replace(params, structured_outputs=dataclasses.replace(so, **self.json_options))
            validate_structured_outputs(params.structured_outputs)
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params)
        eos = set() if params.ignore_eos else self.eos_token_ids
        # vLLM's: the EOS ids besides the tokenizer's (the generation config's) are stop ids, so the one that
        # ends a request is its stop_reason
        primary = getattr(self.tokenizer, "eos_token_id", None)   # None: no tokenizer, every EOS id is one
        more_stop_ids = sorted(eos - {primary} - set(params.stop_token_ids))
        # vLLM checks the tokenizer's EOS before the stop ids: it ends a request with no stop_reason even where the
        # request lists it in stop_token_ids (unless ignore_eos, where only the stop ids end it)
        stop_ids = [t for t in params.stop_token_ids if t != primary or params.ignore_eos]
        params = dataclasses.replace(
            params, stop_token_ids=stop_ids + more_stop_ids,
            all_stop_token_ids=set(params.stop_token_ids) | eos,
            min_tokens_banned_ids=set(params.stop_token_ids) | self.eos_token_ids,
            top_k=0 if params.top_k >= self.vocab_size else params.top_k,   # all: no int64 overflow on the device
            # -1: the vocabulary (vLLM's), a count from here on
            logprobs=self.vocab_size if params.logprobs == -1 else params.logprobs,
            prompt_logprobs=self.vocab_size if params.prompt_logprobs == -1 else params.prompt_logprobs,
            bad_words_token_ids=self._bad_words_ids(params.bad_words))
        arrival_time = time.time() if arrival_time is None else arrival_time
        # Prefix caching off: a salt keeps other requests out of this one's blocks, but not its n siblings.
        salt = cache_salt if cache_salt is not None else None if self.enable_prefix_caching else request_id
        core_requests = []
        for i in range(num_seqs):
            # Siblings share the prompt's blocks through the block hashes; seeded siblings differ by index
            # (seed + i modulo 2**64: what position_seed makes of seed + i, and always in the seed's range).
            child_params = params if num_seqs == 1 else dataclasses.replace(
                params, n=1, best_of=None, seed=None if params.seed is None else (params.seed + i) % SEED_END,
                # best_of ranks by cumulative logprob: each sample's token logprob is needed
                logprobs=0 if params.logprobs is None and num_seqs > params.n else params.logprobs)
            core_requests.append(EngineCoreRequest(child_request_id(request_id, i, num_seqs), prompt_ids,
                                                   child_params, max_tokens, arrival_time, salt, lora_request,
                                                   kv_parent, hold_kv, priority))
        return ProcessedRequest(text, prompt_ids, params, arrival_time, core_requests)

    def check_priority(self, priority: int):
        """vLLM's rule: a priority other than 0 needs the priority scheduling policy."""
        if type(priority) is not int:
            raise ValueError(f"priority must be an integer, got {type(priority).__name__}")
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs scheduling_policy 'priority' (--scheduling-policy "
                             f"priority); this engine schedules {self.scheduling_policy}")

    def _prompt_ids(self, prompt: str | list) -> list[int]:
        """The prompt's token ids (a copy: later edits by the caller cannot reach us), numpy integers taken as
        ints. One C-speed scan of their types and bounds when they are plain ints, not a Python loop."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        plain = _all_int(ids)
        if not plain:
            ids = [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in ids]
            plain = _all_int(ids)
        if not (plain and min(ids) >= 0 and max(ids) < self.vocab_size):
            bad = [t for t in ids if not (type(t) is int and 0 <= t < self.vocab_size)]
            raise ValueError(f"prompt_token_ids must be integers in [0, {self.vocab_size}), got {bad[:5]}")
        return ids

    def _bad_words_ids(self, bad_words: list[str] | None) -> list[list[int]]:
        """Each word's tokens as vLLM finds them: the word alone, and after a space (mid-text) when that
        gives other tokens of the same count. Token ids out of the vocabulary are an error."""
        words = []
        for word in bad_words or ():
            alone = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if alone:
                words.append(alone)
            if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
                words.append(spaced)
        bad = [t for ids in words for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.bad_words must tokenize to ids < vocab size {self.vocab_size}, "
                             f"got {bad[:5]}")
        return words

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        """max_tokens, cut to what the prompt leaves of max_model_len: the output then ends there with
        finish_reason "length", as vLLM's engine ends it (its server refuses such a request with a 400, as ours)."""
        room = self.max_model_len - num_prompt
        if room < 1:
            raise ValueError(f"the prompt ({num_prompt} tokens) leaves no room for an output token in max_model_len "
                             f"({self.max_model_len})")
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if num_prompt + max_tokens > self.max_kv_tokens:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) is more than the KV cache "
                             f"holds ({self.num_blocks} KV blocks, {self.max_kv_tokens} tokens): lower max_tokens "
                             f"or raise kv_cache_memory")
        return max_tokens


def check_arrival_time(arrival_time):
    """vLLM's arrival_time (a time.time() value): the 4th argument of its add_request, where one of another type
    was taken here as the output kind."""
    if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(arrival_time, (int, float))):
        raise TypeError(f"arrival_time must be a time.time() value or None, got {type(arrival_time).__name__}")


def check_request_types(request_id, prompt, params):
    """A request's arguments of the wrong type, named (Engine.add_request and AsyncLLM check before anything
    reads them: a None would be an AttributeError far in, and a non-str id would run)."""
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    check_prompt_type(prompt)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")


def check_prompt_type(prompt):
    if not isinstance(prompt, (str, list, tuple, dict)):
        raise TypeError(f"prompt must be a string, token ids or a dict, got {type(prompt).__name__}")


# vLLM's TextPrompt / TokensPrompt; their multimodal keys only empty (None, {}): no multimodal inputs are built
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")
_MULTIMODAL_KEYS = ("multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids")


def prompt_value(prompt: str | list[int] | dict) -> str | list[int]:
    """vLLM's dict prompts as the text or the token ids they hold; any other prompt as it is."""
    if not isinstance(prompt, dict):
        return prompt
    unknown = [k for k in prompt if k not in _PROMPT_KEYS and not (k in _MULTIMODAL_KEYS and not prompt[k])]
    if unknown:
        raise ValueError(f"a dict prompt takes the keys {_PROMPT_KEYS} (multi-modal inputs are not supported), "
                         f"got {unknown}")
    if "prompt" in prompt and not isinstance(prompt["prompt"], str):
        raise ValueError(f"a dict prompt's 'prompt' must be a string, got {type(prompt['prompt'])}")
    prompt_cache_salt(prompt)
    if "prompt_token_ids" in prompt:   # with both keys, the ids run and the text is only the outputs' (vLLM's)
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"a dict prompt's 'prompt_token_ids' must be a list of token ids, got {type(ids)}")
        return list(ids)
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a dict prompt needs a 'prompt' or a 'prompt_token_ids' key")


def prompt_cache_salt(prompt) -> str | None:
    """A dict prompt's "cache_salt" (vLLM's): only requests of the same salt share cached blocks; an empty one or
    None is none (vLLM's)."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and not isinstance(salt, str):
        raise ValueError(f"a dict prompt's 'cache_salt' must be a string, got {type(salt).__name__}")
    return salt or None


def truncate_prompt(ids: list[int], k: int | None, max_model_len: int, side: str = "left",
                    added: tuple[int, int] = (0, 0)) -> list[int]:
    """truncate_prompt_tokens (vLLM's): the prompt's last k tokens (side "left": the left end is cut), or its
    first k ("right"); -1 = max_model_len. None, or a k that SamplingParams refuses (the server checks lengths
    before it builds them), keeps them all. added: the special tokens the tokenizer put before and after a text's
    own (num_added_tokens), kept as the tokenizer's own truncation keeps them: k - 1 text tokens after a BOS."""
    if k == -1:
        k = max_model_len
    if k is None or k < 1:
        return ids
    if k > max_model_len:   # vLLM refuses it too: no prompt that long could run
        raise ValueError(f"SamplingParams.truncate_prompt_tokens must be -1 or at most max_model_len "
                         f"({max_model_len}), got {k}")
    if k >= len(ids):
        return ids
    front, back = added
    body = ids[front:len(ids) - back]
    n = max(k - front - back, 0)
    body = body[:n] if side == "right" else body[len(body) - n:]
    return ids[:front] + body + ids[len(ids) - back:]


def _without_tokenizer(prompt, params: SamplingParams) -> SamplingParams:
    """skip_tokenizer_init: token-id prompts only, no stop strings (they are matched on text), no text out."""
    if isinstance(prompt, str):
        raise ValueError("prompt must be token ids when skip_tokenizer_init is set (there is no tokenizer), "
                         "got text")
    if params.stop:
        raise ValueError(f"stop must be empty when skip_tokenizer_init is set (stop strings are matched on "
                         f"text), got {len(params.stop)} stop string(s)")
    if params.bad_words:
        raise ValueError(f"bad_words must be empty when skip_tokenizer_init is set (the words are tokenized by "
                         f"the engine), got {len(params.bad_words)} word(s)")
    if params.structured_outputs is not None:
        raise ValueError("structured_outputs must be None when skip_tokenizer_init is set (a constraint is "
                         "compiled against the tokenizer's vocabulary)")
    return dataclasses.replace(params, detokenize=False)


def _all_int(values: list) -> bool:
    return set(map(type, values)) == {int}     # exact type: bool (an int subclass) is not a token id
