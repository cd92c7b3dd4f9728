"""The OpenAI request shapes (pydantic), and how each becomes SamplingParams.

Types are checked here (a wrong type is a 400 naming the field); values are checked by SamplingParams and
the engine, which name the field and the limit. Responses are plain dicts built in completions.py/chat.py.
"""
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from pagedllm.sampling_params import SamplingParams

# OpenAI parameters this server does not implement: a request that sets them to anything but the
# neutral value is refused rather than silently answered differently.
_UNSUPPORTED = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "best_of": None,
                "suffix": None, "tools": None, "response_format": None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields that completions and chat share (names and meanings as OpenAI's and vLLM's)."""
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in _UNSUPPORTED.items():
                if data.get(name, neutral) not in (neutral, None):
                    raise ValueError(f"{name} is not supported by this server")
        return data

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None, defaults: dict | None = None) -> SamplingParams:
        """Unset fields take defaults (the generation config's), else SamplingParams' own; invalid values
        raise ValueError naming the field."""
        names = ("temperature", "top_p", "top_k", "min_p")
        given = {**(defaults or {}), **{k: getattr(self, k) for k in names if getattr(self, k) is not None}}
        return SamplingParams(n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
                              stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, **given)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message = {"role": self.role, "content": content or ""}
        return message if self.name is None else {**message, "name": self.name}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
