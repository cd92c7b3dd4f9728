"""The answers of /v1/responses kept for `store: true` (`--responses-store N`): the last N, in this API process's
memory, each with the conversation it ended, so that a later request's previous_response_id continues it and GET /
DELETE /v1/responses/{id} find it; a background response is kept from the start, its status following its work.
When full, the oldest goes first: a request that names it then gets a 404 that
says so. vLLM keeps every stored response and never frees one (VLLM_ENABLE_RESPONSES_API_STORE); N bounds memory."""
import asyncio
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class StoredResponse:
    response: dict          # the Response as it was sent
    messages: list[dict]    # the chat messages it answered (less its instructions), then its output as one
    #                         assistant message (and tools')


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.running: dict[str, asyncio.Task] = {}   # background responses still at work, by id

    def put(self, stored: StoredResponse) -> None:
        self._items[stored.response["id"]] = stored
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def item(self, item_id: str) -> dict | None:
        """The output item of that id among the responses kept (an input's item_reference names one)."""
        for stored in self._items.values():
            for item in stored.response["output"]:
                if item.get("id") == item_id:
                    return item
        return None

    def set_status(self, response_id: str, status: str, error: dict | None = None) -> None:
        """A background response's status (and error) as its work goes; nothing if it is no longer kept."""
        stored = self._items.get(response_id)
        if stored is not None:
            stored.response = {**stored.response, "status": status, "error": error}

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None
