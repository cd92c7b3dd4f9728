"""The OpenAI request shapes (pydantic), and how each becomes SamplingParams.

Every field a request may carry is declared here, with OpenAI's and vLLM's names, and each is one of:
- honoured: it changes the output as OpenAI/vLLM define it (SamplingParams fields, chat template options);
- a documented no-op: it cannot change the output (_NO_OPS below; README's Serve section lists them);
- accepted only at its neutral value (one that changes nothing, as vLLM accepts), any other value a 400 naming
  the field: features not implemented yet (the deprecated functions API), see `unsupported`.
Beam search (use_beam_search, n = beam width, length_penalty) takes BeamSearchParams' fields only: a sampling
field it would not use is a 400 naming it (`_check_beam_search`).
Structured output fields (response_format, structured_outputs, guided_*) are read by structured_fields.py.
Tools (tools, tool_choice, parallel_tool_calls) are checked here and planned by chat_tools.py.
A field not declared is a 400 naming it ("Unrecognized request argument supplied: ..."), as OpenAI's.
Types are checked here; values by SamplingParams and the engine, which name the field and the limit.
Responses are plain dicts built in completions.py/chat.py.
"""
import os
from typing import Any, Literal, get_args

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from pagedllm import content_parts
from pagedllm.sampling_params import SamplingParams, clamped_logit_bias
from pagedllm.server.errors import APIError, shorten
from pagedllm.server.structured_fields import constraint_field, structured_outputs

# Accepted and without effect on the output (OpenAI's and vLLM's bookkeeping fields):
#   user, metadata, store, service_tier, safety_identifier, prompt_cache_key: the client's labels;
#   prompt_cache_retention: PromptCacheRetention's;
#   request_id: vLLM's, here it names the response (its id) and nothing else;
#   return_token_offsets: vLLM's, answered by its /render endpoints only (its generation endpoints ignore it).
_NO_OPS = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "request_id", "return_token_offsets")

# OpenAI's most a prompt's cached prefix may be kept (chat completions and responses). The prefix cache keeps blocks
# while the KV cache (and its CPU / disk tiers, where configured) has room for them, evicting the least recently
# used: never by age, so neither value changes it. vLLM takes the field and ignores it.
PromptCacheRetention = Literal["in_memory", "24h"]

# Request fields passed to SamplingParams under the same name, and only when the client set them (None =
# unset), so SamplingParams' defaults and the generation config's apply to the rest.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                    "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "truncation_side", "best_of",
                    "repetition_detection")
# What beam search uses besides n, max_tokens and length_penalty (vLLM's BeamSearchParams).
_BEAM_FIELDS = ("temperature", "ignore_eos", "include_stop_str_in_output")
# BeamSearchParams' fields under the request's names (the others are the same)
_BEAM_PARAMS = {"beam_width": "n"}
_DEFAULTS = SamplingParams()   # a sampling field at its default changes nothing, beam search or not


def _left_unset(name: str, value) -> bool:
    """Whether a field beam search does not use asks for nothing: not sent, or a sampling field at what leaving it
    out gives (top_p 1.0, a penalty 0, stop [], ...; a seed changes nothing in a search without randomness), or
    top_logprobs 0. logprobs 0 and prompt_logprobs 0 ask for the chosen tokens' and the prompt's logprobs."""
    if value is None:
        return True
    if name not in _SAMPLING_FIELDS:   # chat's logprobs false; top_logprobs 0
        return value is False or (name == "top_logprobs" and value == 0)
    default = getattr(_DEFAULTS, name)   # skip_special_tokens false is not its default: it would be ignored
    return (value == default or name == "seed" or (value in ([], {}) and default in (None, [], {}))
            or (name == "top_k" and value == -1) or (name == "truncation_side" and value == "left"))


def validated(cls, body: dict):
    """cls.model_validate(body) for a request built from another (the Anthropic and Responses routes, a batch's
    conversations, /invocations): its errors reach the client as a request body's do, naming the field."""
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e


class _Strict(BaseModel):
    """Unknown fields are a 400 (pydantic's extra_forbidden names the field's path)."""
    model_config = ConfigDict(extra="forbid")


def fields_of_its_type(model, allowed: dict, kind: str):
    """A model that holds several types of item in one (a Responses input item, an Anthropic content block): the
    fields it sets must be its type's (another type's field would be accepted and do nothing). allowed: type ->
    the fields it takes besides `type` (None: a Responses message item); a type not in allowed is checked where
    it is read. kind names the model with its article ("a content block")."""
    fields = allowed.get(model.type)
    extra = [] if fields is None else sorted(model.model_fields_set - set(fields) - {"type"})
    if extra:
        raise ValueError(f"{kind} of type {model.type or 'message'} does not take {', '.join(extra)}")
    return model


class _Request(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, data):
        # An APIError, not a ValueError: pydantic lets it through, so the 400 is OpenAI's and names the field.
        if isinstance(data, dict):
            for name in data:
                if name not in cls.model_fields:
                    raise APIError(400, f"Unrecognized request argument supplied: {shorten(str(name))}",
                                   shorten(str(name)), "unrecognized_argument")
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, neutral, feature in self.unsupported():
            if not neutral:
                raise _unsupported(name, feature)
        return self

    def unsupported(self) -> list[tuple[str, bool, str]]:
        """(field, whether its value is neutral, the feature it needs) for the fields not implemented yet."""
        return []


def _unsupported(name: str, feature: str) -> APIError:
    return APIError(400, f"{name} is not supported yet ({feature})", name, "unsupported_parameter")


class StreamOptions(_Strict):
    include_usage: bool | None = False   # null: false (vLLM's)
    continuous_usage_stats: bool | None = False   # vLLM's: with include_usage, each chunk its choice's usage so far


def _check_beam_top(name: str, asked: int, n: int, beside: int = 0):
    """A beam search's logprobs (vLLM's): each generated token's and the top ones of its step, which ranks
    MIN_CANDIDATES_PER_BEAM * n tokens a beam at least: a position holds no more. beside: the entries shown
    besides the asked ones (completions' chosen token)."""
    from pagedllm.beam_search import MIN_CANDIDATES_PER_BEAM
    most = MIN_CANDIDATES_PER_BEAM * n - beside
    if asked == -1 or asked > most:
        raise APIError(400, f"{name} must be at most {most} with use_beam_search and n {n} (each step ranks "
                            f"{MIN_CANDIDATES_PER_BEAM * n} tokens a beam), got {asked}", name, "invalid_value")


class _SamplingRequest(_Request):
    """Fields that completions and chat share (names and meanings as OpenAI's and vLLM's)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None     # token id (a JSON key: a string) -> bias
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None      # keep k of the prompt's tokens (-1: max_model_len)
    truncation_side: Literal["left", "right"] | None = None   # vLLM's: left (the default) keeps the last k
    repetition_detection: dict[str, Any] | None = None   # vLLM's: end when the output repeats (core/repetition.py)
    prompt_logprobs: int | None = None
    # vLLM's: these ids' logprobs at each generated position instead of the top ones (needs logprobs)
    logprob_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    return_token_ids: bool = False   # vLLM's: the prompt's and each choice's token ids beside the text
    return_tokens_as_token_ids: bool | None = None   # logprobs' tokens as "token_id:<id>" (None: the server's)
    cache_salt: str | None = Field(None, min_length=1)   # vLLM's: only requests of one salt share cached blocks
    # Structured output (structured_fields.py): at most one constraint.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None    # only null: xgrammar takes no whitespace pattern
    priority: int = 0                # lower first, with --scheduling-policy priority (else only 0)
    # vLLM's detokenizer option. The text never has spaces put between special tokens (transformers 5's decode,
    # and vLLM's of a fast tokenizer, put none either way): what false asks, and true's text is vLLM's.
    spaces_between_special_tokens: bool = True
    # Documented no-ops (_NO_OPS).
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: PromptCacheRetention | None = None
    request_id: str | None = None
    return_token_offsets: bool | None = False
    # vLLM's fields for what is not built here: taken only empty (unsupported)
    vllm_xargs: dict[str, Any] | None = None          # SamplingParams.extra_args, read by plugins' code only
    kv_transfer_params: dict[str, Any] | None = None  # a KV connector's (disaggregated serving)
    ec_transfer_params: dict[str, Any] | None = None  # an encoder cache connector's

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """null for a field that has no null value (n, stream, echo, chat's logprobs, ...) is its default, as README
        says and vLLM takes n, stream, logprobs, echo, return_token_ids (a client that writes every field sends
        null for those it leaves unset)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()
                    or type(None) in get_args(fields[k].annotation)}
        return data

    @model_validator(mode="after")
    def _check_prompt_logprobs(self):
        # vLLM's rule: they come with the whole response. 0 is taken (it asks for no alternatives; a stream carries
        # no prompt_logprobs, and an echo's logprobs only the prompt's own tokens).
        if self.stream and self.prompt_logprobs is not None and (self.prompt_logprobs > 0
                                                                 or self.prompt_logprobs == -1):
            raise APIError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs",
                           "invalid_value")
        return self

    @model_validator(mode="after")
    def _check_stream_options(self):
        # vLLM's rule and message: options of a stream need one (an empty object asks for nothing)
        if not self.stream and self.stream_options is not None and self.stream_options.model_fields_set:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options",
                           "invalid_value")
        return self

    @model_validator(mode="after")
    def _check_beam_search(self):
        if not self.use_beam_search:
            if self.length_penalty != 1.0:
                raise APIError(400, "length_penalty applies only with use_beam_search", "length_penalty",
                               "invalid_value")
            return self
        unused = [*(f for f in _SAMPLING_FIELDS if f not in _BEAM_FIELDS), "logprob_token_ids", "prompt_logprobs",
                  constraint_field(self)]
        for name in filter(None, unused):
            if not _left_unset(name, getattr(self, name, None)):
                raise APIError(400, f"{name} is not used by beam search (use_beam_search takes n as the beam "
                                    f"width, max_tokens, temperature, ignore_eos, include_stop_str_in_output, "
                                    f"length_penalty and logprobs)", name, "invalid_value")
        return self

    def to_beam_search_params(self, max_tokens: int | None, max_model_len: int):
        """max_tokens None: up to max_model_len (each prompt's search caps it at what its prompt leaves)."""
        from pagedllm.beam_search import BeamSearchParams
        if max_tokens is not None and max_tokens < 1:   # a search of no step: vLLM answers the prompt's one beam
            param = "max_completion_tokens" if getattr(self, "max_completion_tokens", None) is not None else \
                "max_tokens"
            raise APIError(400, f"{param} must be at least 1 with use_beam_search, got {max_tokens}", param,
                           "invalid_value")
        try:
            return BeamSearchParams(beam_width=self.n,
                                    max_tokens=max_tokens if max_tokens is not None else max_model_len,
                                    ignore_eos=bool(self.ignore_eos), temperature=self.temperature or 0.0,
                                    length_penalty=self.length_penalty,
                                    include_stop_str_in_output=bool(self.include_stop_str_in_output))
        except ValueError as e:   # its checks name BeamSearchParams' fields: the client sent the request's
            field, _, rest = str(e).removeprefix("BeamSearchParams.").partition(" ")
            param = _BEAM_PARAMS.get(field, field)
            raise APIError(400, f"{param}{' (the beam width)' if field == 'beam_width' else ''} {rest}", param,
                           "invalid_value") from None

    def unsupported(self) -> list[tuple[str, bool, str]]:
        return [*super().unsupported(),
                ("vllm_xargs", not self.vllm_xargs, "custom logits processors and plugins, the code that reads them, "
                                                    "are not loaded"),
                ("kv_transfer_params", not self.kv_transfer_params, "moving KV between engines: --kv-transfer-config "
                                                                    "is not built"),
                ("ec_transfer_params", not self.ec_transfer_params, "moving the encoder cache between engines: "
                                                                    "multimodal models are not built")]

    # not a request field: the server's --enable-force-include-usage (a usage chunk ends every stream)
    _force_usage: bool = PrivateAttr(False)

    @property
    def include_usage(self) -> bool:
        return self._force_usage or (self.stream_options is not None and bool(self.stream_options.include_usage))

    @property
    def continuous_usage(self) -> bool:
        """Each chunk carries its choice's usage so far: continuous_usage_stats with include_usage, or the server's
        --enable-force-include-usage, which turns both on (vLLM's should_include_usage)."""
        return self._force_usage or (self.stream_options is not None and self.include_usage
                                     and bool(self.stream_options.continuous_usage_stats))

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                           defaults: dict | None = None) -> SamplingParams:
        """The fields the client set, over `defaults` (the generation config's), over SamplingParams' own;
        invalid values raise ValueError naming the field."""
        given = {name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None}
        if self.logit_bias:   # vLLM's server clamps each bias into [-100, 100] (SamplingParams.from_optional)
            given["logit_bias"] = clamped_logit_bias(self.logit_bias)
        constraint, _ = structured_outputs(self)
        named = self.logprob_token_ids or None   # vLLM's: [] names none; ids replace the top-N
        return SamplingParams(**{**(defaults or {}), **given, "n": self.n, "max_tokens": max_tokens,
                                 "logprobs": None if named else logprobs, "logprob_token_ids": named,
                                 "prompt_logprobs": prompt_logprobs, "structured_outputs": constraint})


_EMBEDDINGS = "prompt embeddings as input"
_PROMPT_FORMS = ((str, "strings"), (int, "token ids"), (list, "lists of token ids"))   # a list prompt's items


def _check_prompt_count(prompt: list):
    """vLLM's bound on the prompts of one request (a list of token ids is one prompt): each becomes a request in
    the engine, so a client could fan one body out without end."""
    most = int(os.environ.get("VLLM_MAX_COMPLETION_PROMPTS", "1024"))   # vLLM's bound, and its variable
    if len(prompt) > most and not all(isinstance(item, int) for item in prompt):
        raise APIError(400, f"prompt is a list of {len(prompt)} prompts, more than the {most} one request may carry "
                            f"(raise the VLLM_MAX_COMPLETION_PROMPTS environment variable for more)", "prompt",
                       "invalid_value")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16   # null too (vLLM 0.26's normalize_null_max_tokens): never "up to the context"
    logprobs: int | None = Field(None, ge=0)   # vLLM's: -1 (the vocabulary) is prompt_logprobs' and chat's only
    echo: bool = False
    add_special_tokens: bool = True    # vLLM's: BOS (etc.) added to text prompts
    suffix: str | None = None
    prompt_embeds: str | list[str] | None = None   # vLLM's (base64 tensors): null accepted, embeddings refused
    # vLLM's: at most this many tokens in a `<think>` block, then `</think>` is forced (-1: no limit)
    thinking_token_budget: int | None = Field(None, ge=-1)

    @model_validator(mode="before")
    @classmethod
    def _one_form_of_prompt(cls, data):
        """A list prompt's items are all of one form. pydantic's error for a mix names one item as it fails one
        form ("prompt.0: Input should be a valid string" for [1, "a"], whose 1 is a valid token id)."""
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if prompt is None and isinstance(data, dict) and data.get("prompt_embeds") is not None:
            # vLLM's embeddings-only request: refused for its embeddings, not as a request without a prompt
            raise _unsupported("prompt_embeds", _EMBEDDINGS)
        if isinstance(prompt, list):
            _check_prompt_count(prompt)
            forms = dict.fromkeys(next((name for kind, name in _PROMPT_FORMS if isinstance(item, kind)), None)
                                  for item in prompt)
            forms.pop(None, None)   # other values: pydantic's error names them
            if len(forms) > 1:
                first, second = list(forms)[:2]
                raise APIError(400, f"prompt mixes {first} and {second}: it must be a string, or a list of "
                                    f"strings, of token ids or of lists of token ids", "prompt", "invalid_value")
        return data

    @model_validator(mode="after")
    def _unlimited_budget(self):
        if self.thinking_token_budget == -1:
            self.thinking_token_budget = None
        return self

    @model_validator(mode="after")
    def _check_beam_logprobs(self):
        if self.use_beam_search and self.logprobs is not None:
            _check_beam_top("logprobs", self.logprobs, self.n, beside=1)
            if self.echo:
                raise APIError(400, "echo with logprobs is not available with use_beam_search: the search computes "
                                    "no prompt logprobs", "echo", "invalid_value")
        return self

    @model_validator(mode="after")
    def _check_logprob_token_ids(self):
        if self.logprob_token_ids and self.logprobs is None:
            raise APIError(400, "logprob_token_ids needs logprobs to be set (it stays the echoed prompt's top-N)",
                           "logprob_token_ids", "invalid_value")
        if self.logprob_token_ids and self.echo and self.max_tokens == 0:   # vLLM's 400
            raise APIError(400, "logprob_token_ids name logprobs of generated positions: echo with max_tokens 0 "
                                "generates none", "logprob_token_ids", "invalid_value")
        return self

    def unsupported(self) -> list[tuple[str, bool, str]]:
        return [*super().unsupported(), ("suffix", self.suffix is None, "fill-in-the-middle"),
                ("prompt_embeds", self.prompt_embeds is None, _EMBEDDINGS)]


# A call's fields are declared in the order vLLM's validated request holds them (its TypedDicts' order, whatever
# the client's): templates that write `tool_call.function | tojson` (Mistral's) print the keys in that order.
class FunctionCall(_Strict):
    arguments: str | dict[str, Any] | None = None    # OpenAI's: a JSON string
    name: str


class ToolCall(_Strict):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(_Strict):
    role: str
    # parts: strings and objects of a type, read (and refused, naming the part) by pagedllm/content_parts.py
    content: str | list[str | dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None        # an assistant's calls, passed to the template
    tool_call_id: str | None = None                 # a tool's answer: the call it answers
    reasoning_content: str | None = None            # passed to templates that render it (vLLM's)
    reasoning: str | None = None
    # OpenAI's assistant-message fields a client sends back with a previous answer: annotations are a no-op,
    # the others are accepted only as null.
    annotations: list[Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name in ("refusal", "audio", "function_call"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} in a message is not supported yet")
        return self

    def as_template_input(self) -> dict:
        """OpenAI's shape, as given (chat_template.template_message makes it what templates expect), the older
        reasoning_content as `reasoning` unless that is set (vLLM's request renames it so)."""
        message = self.model_dump(exclude_none=True, exclude={"annotations", "refusal", "audio", "function_call"})
        if isinstance(message.get("content"), list):   # vLLM's validation drops a part's own keys (its TypedDicts')
            message["content"] = [_known_keys(p) for p in message["content"]]
        reasoning = message.pop("reasoning_content", None)
        if reasoning is not None and message.get("reasoning") is None:
            message["reasoning"] = reasoning
        return message


def _known_keys(part):
    """A content part as vLLM's request validation leaves it: only the keys its part types declare (a client's own,
    such as cache_control, are dropped; LLM.chat's parts keep them, as vLLM's chat_utils does)."""
    if not isinstance(part, dict):
        return part
    return {k: v for k, v in part.items() if k in content_parts.VLLM_PART_FIELDS or k in content_parts.MEDIA}


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema of the arguments
    # OpenAI's: arguments follow the schema exactly. Enforced with tool_choice "required" or a named function
    # (always, strict or not); with "auto" the text is the model's own, as in vLLM.
    strict: bool | None = None
    defer_loading: bool | None = None          # for the template (tool search: Claude Code's), as vLLM passes it


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def as_template_input(self) -> dict:
        """The tool as vLLM gives it to the chat template (its pydantic dump): a function's description and
        parameters are there as null when not given, strict and defer_loading only when given. Templates write
        tools with tojson, so leaving the nulls out would change the prompt."""
        tool = self.model_dump()
        for name in ("strict", "defer_loading"):
            if tool["function"][name] is None:
                del tool["function"][name]
        return tool


def check_tools(tools: list[tuple[str, dict[str, Any] | None]], at: str):
    """OpenAI's 400s on a request's functions, (name, parameters) each, whose fields are at.format(index): a
    function's arguments are a JSON object, so its parameters schema is an object's; and a call names its function,
    so no two share a name (a forced call's schema, and the function a call ran, were then either's). vLLM takes
    both."""
    seen = set()
    for i, (name, parameters) in enumerate(tools):
        kind = (parameters or {}).get("type", "object")
        if kind != "object":
            raise APIError(400, f"{at.format(i)}.parameters must be the schema of an object (a function's "
                           f"arguments are a JSON object), not of type {shorten(str(kind))!r}",
                           f"{at.format(i)}.parameters", "invalid_value")
        if name in seen:
            raise APIError(400, f"{at.format(i)}.name: another tool is named {shorten(name)!r}; tool names must be "
                           "unique", f"{at.format(i)}.name", "invalid_value")
        seen.add(name)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]   # each {"type": "function", "function": {"name": ...}} of a function in tools


class AllowedToolChoice(_Strict):
    """OpenAI's tool_choice that narrows the tools the model may call to some of tools, as mode (auto or
    required) chooses among them. Honoured by showing the model only those (the prompt then differs from one with
    every tool), as /v1/responses does with its own shape of it (vLLM's chat request refuses it)."""
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class _ChatTemplateOptions(_Request):
    """How messages become a prompt: vLLM's chat template options (chat.render_chat)."""
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False      # the last message is continued: no generation prompt
    chat_template_kwargs: dict[str, Any] | None = None   # extra template variables
    add_special_tokens: bool = False          # on top of those the template writes (vLLM's default: none)
    documents: list[dict[str, Any]] | None = None   # for RAG templates: the template's `documents`
    chat_template: str | None = None          # the request's own template (--trust-request-chat-template)
    # vLLM's multimodal fields: taken only empty (unsupported), as no model here takes images or audio
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any] | None:
        """The template's extra variables."""
        return self.chat_template_kwargs

    def unsupported(self) -> list[tuple[str, bool, str]]:
        multimodal = "multimodal inputs are not built: pagedllm serves text-only models"
        return [*super().unsupported(), ("media_io_kwargs", not self.media_io_kwargs, multimodal),
                ("mm_processor_kwargs", not self.mm_processor_kwargs, multimodal)]


class ChatCompletionRequest(_SamplingRequest, _ChatTemplateOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    tools: list[ChatTool] | None = None
    # none, auto, required, a function, allowed_tools (default: auto with tools)
    tool_choice: str | NamedToolChoice | AllowedToolChoice | None = None
    parallel_tool_calls: bool | None = None   # false: at most one call (default: any number)
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM's reasoning fields (--reasoning-parser, reasoning.py). reasoning_effort goes to the template as a
    # variable, and sets enable_thinking (off for "none") unless chat_template_kwargs sets it.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    include_reasoning: bool = True   # false: the answer has no reasoning (a constraint then applies at once)
    return_prompt_text: bool = False   # vLLM's: the response carries the prompt the chat template wrote
    # vLLM's: a no-op here as there (its /render endpoints answer the mask; chat completions take the field and
    # leave it out of the answer)
    return_assistant_tokens_mask: bool = False
    # vLLM's: at most this many tokens of reasoning, then `</think>` is forced (-1: no limit)
    thinking_token_budget: int | None = Field(None, ge=-1)
    # not a request field: set by /v1/responses, whose usage has cached and reasoning token counts
    _usage_details: bool = PrivateAttr(False)
    # set by create_chat_completion: the SamplingParams the answer ran under, and its max_tokens resolved (the
    # room the prompt leaves where unset and unbounded); /v1/responses echoes them
    _params: Any = PrivateAttr(None)
    _max_tokens: int | None = PrivateAttr(None)
    # with echo: the content format the template took the messages in ("auto" resolved), which the echo follows
    _content_format: str = PrivateAttr("string")

    @model_validator(mode="after")
    def _check_beam_logprobs(self):
        if self.use_beam_search and self.top_logprobs is not None:
            _check_beam_top("top_logprobs", self.top_logprobs, self.n)
        return self

    @model_validator(mode="after")
    def _check_logprob_token_ids(self):
        # a top_logprobs beside them is taken, as vLLM 0.26 documents: the named ids take precedence over it
        if self.logprob_token_ids and not self.logprobs:
            raise APIError(400, "logprob_token_ids needs logprobs to be true", "logprob_token_ids", "invalid_value")
        return self

    @model_validator(mode="after")
    def _unlimited_budget(self):
        if self.thinking_token_budget == -1:
            self.thinking_token_budget = None
        return self

    def template_kwargs(self) -> dict[str, Any] | None:
        """reasoning_effort over chat_template_kwargs' variable of that name (vLLM's merge: the request's own
        field wins); enable_thinking from it only where chat_template_kwargs does not set it."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        kwargs = {**(self.chat_template_kwargs or {}), "reasoning_effort": self.reasoning_effort}
        kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs

    @model_validator(mode="after")
    def _check_tools(self):
        # OpenAI's and vLLM's 400, whatever tool_choice says (vLLM refuses it before reading tool_choice): a client
        # with no tools leaves the field out (or sends null). /v1/responses and /v1/messages take an empty tools,
        # as OpenAI's Responses API and Anthropic's do, and pass no tools on to chat.
        if self.tools == []:
            raise APIError(400, "`tools` must not be an empty array. Either provide at least one tool or omit the "
                                "field entirely.", "tools", "empty_array")
        check_tools([(t.function.name, t.function.parameters) for t in self.tools or []], "tools.{}.function")
        return self

    @model_validator(mode="after")
    def _check_tool_choice(self):
        """A choice that forces a call needs tools, and a named function must be one of them (vLLM's 400s)."""
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ...}}}}, got {shorten(choice)!r}", "tool_choice",
                           "invalid_value")
        if choice in (None, "none"):
            return self
        if not self.tools:   # vLLM's 400 (OpenAI's too), "auto" included: /v1/responses and /v1/messages drop it
            raise APIError(400, "When using `tool_choice`, `tools` must be set.", "tool_choice", "invalid_value")
        if choice == "auto":
            return self
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names:
            raise APIError(400, f"tool_choice names function {shorten(choice.function.name)!r}, which is not in "
                                f"tools ({', '.join(self.tool_names)})", "tool_choice", "invalid_value")
        for j, allowed in enumerate(choice.allowed_tools.tools if isinstance(choice, AllowedToolChoice) else ()):
            function = allowed.get("function")
            if (allowed.get("type") != "function" or len(allowed) != 2 or not isinstance(function, dict)
                    or function.keys() != {"name"} or function["name"] not in self.tool_names):
                at = f"tool_choice.allowed_tools.tools.{j}"
                raise APIError(400, f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} naming "
                               f"a function in tools ({', '.join(self.tool_names)})", at, "invalid_value")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    def shown_tools(self) -> list[int]:
        """The indexes in tools of those the model is shown: tool_choice allowed_tools' (once each), or all."""
        choice = self.tool_choice
        if not isinstance(choice, AllowedToolChoice):
            return list(range(len(self.tools or [])))
        return list(dict.fromkeys(self.tool_names.index(t["function"]["name"]) for t in choice.allowed_tools.tools))

    def unsupported(self) -> list[tuple[str, bool, str]]:
        # The deprecated functions/function_call are refused, not mapped: tools/tool_choice say the same.
        legacy = "the deprecated functions API: use tools and tool_choice"
        return [*super().unsupported(), ("functions", not self.functions, legacy),
                ("function_call", self.function_call in (None, "none", "auto"), legacy)]


class TokenizeRequest(_ChatTemplateOptions):
    """vLLM's /tokenize: a prompt, or messages through the chat template with the chat options."""
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool | None = None    # vLLM's defaults: true for a prompt, false for messages
    tools: list[ChatTool] | None = None       # to the template, as a chat request's
    return_token_strs: bool | None = False    # vLLM's: the answer also has each token's string (token_strs)

    @model_validator(mode="after")
    def _chat_options_need_messages(self):
        if self.prompt is not None:
            for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents",
                         "chat_template", "tools", "media_io_kwargs", "mm_processor_kwargs"):
                if name in self.model_fields_set:
                    raise APIError(400, f"{name} applies to messages, not to a prompt", name, "invalid_value")
        if self.add_special_tokens is None:
            self.add_special_tokens = self.prompt is not None
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
