"""POST /v1/chat/completions/batch (vLLM 0.26's): a chat completion request whose `messages` is a list of
conversations, each answered on its own as the chat route would, all at once in the engine. The response is one
chat completion: choice i is conversation i's answer, usage the sum. As vLLM's: no stream, no tools, no beam
search, n 1. What the chat route puts beside the choices (prompt_token_ids, prompt_logprobs, prompt_text) goes
into each conversation's choice here. A conversation's error fails the request, its other answers aborted, and
names it (messages.<i>)."""
import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from pagedllm.server.chat import create_chat_completion
from pagedllm.server.errors import APIError
from pagedllm.server.protocol import ChatCompletionRequest, ChatMessage, validated
from pagedllm.server.serving import ServingContext, answer_usage, usage

_PER_CONVERSATION = ("prompt_token_ids", "prompt_logprobs", "prompt_text")


class BatchChatCompletionRequest(ChatCompletionRequest):
    messages: list[list[ChatMessage]] = Field(min_length=1)   # conversations, each of at least one message
    early_stopping: bool = False   # vLLM's batch request declares it (a beam search's), and runs no beam search

    def conversations(self) -> list[ChatCompletionRequest]:
        for name, ok, limit in (("stream", not self.stream, "false"), ("tools", not self.tools, "unset"),
                                ("use_beam_search", not self.use_beam_search, "false"), ("n", self.n == 1, "1"),
                                ("early_stopping", not self.early_stopping, "false")):
            if not ok:
                raise APIError(400, f"{name} must be {limit} in a batch of conversations", name, "invalid_value")
        body = self.model_dump(exclude_unset=True, exclude={"messages", "early_stopping"}, by_alias=True)
        out = []
        for i, conversation in enumerate(self.messages):
            if not conversation:
                raise APIError(400, f"messages.{i} is an empty conversation", f"messages.{i}", "invalid_value")
            out.append(validated(ChatCompletionRequest, {**body, "messages": conversation}))
        return out


async def create_chat_batch(ctx: ServingContext, req: BatchChatCompletionRequest, raw_request: Request):
    tasks = [asyncio.ensure_future(create_chat_completion(ctx, r, raw_request)) for r in req.conversations()]
    try:
        answers = await asyncio.gather(*tasks)
    except BaseException as e:
        for t in tasks:   # their finally blocks abort their engine requests
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        index = next((i for i, t in enumerate(tasks) if not t.cancelled() and t.exception() is e), None)
        if isinstance(e, APIError) and index is not None:
            param = f"messages.{index}" if e.param in (None, "messages") else e.param
            raise APIError(e.status, f"conversation {index}: {e.message}", param, e.code) from e
        raise
    if any(isinstance(a, Response) for a in answers):   # the client left
        return next(a for a in answers if isinstance(a, Response))
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, answer in enumerate(answers):
        choice = {**answer["choices"][0], "index": i}
        choice.update({k: answer[k] for k in _PER_CONVERSATION if answer[k] is not None})
        choices.append(choice)
        prompt_tokens += answer["usage"]["prompt_tokens"]
        completion_tokens += answer["usage"]["completion_tokens"]
    # the chat answer's keys (vLLM's: its response model dumped whole), those of one conversation null
    return {**answers[0], "id": f"chatcmpl-{req.request_id or uuid.uuid4().hex}", "created": int(time.time()),
            "choices": choices, **{k: None for k in (*_PER_CONVERSATION, "metrics")},
            "usage": answer_usage(usage(prompt_tokens, completion_tokens))}
