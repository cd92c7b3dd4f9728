"""LoRA adapters behind the server, vLLM's interface: --lora-modules, a request's `model` naming an adapter,
/v1/models listing them, POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

An adapter's name maps to a LoRARequest with an int id of its own (1, 2, ... in the order loaded; never reused,
so a block hash or host copy of an unloaded adapter is never taken for a new one). Loading calls the engine's
add_lora first (the core reads it on a loader thread; steps go on), so a bad adapter is a 400 naming its path and
the problem, and the name is served only once the adapter is on the host. Runtime loading and unloading read any
path the server can read and hold memory: as vLLM, they are off unless VLLM_ALLOW_RUNTIME_LORA_UPDATING is set
(vLLM's variable, so a vLLM deployment's environment works unchanged); the API key guards them as every /v1 route.
With it, vLLM's filesystem resolver too: a request's model naming no loaded adapter loads the adapter directory of
that name under VLLM_LORA_RESOLVER_CACHE_DIR whose adapter_config.json is a LoRA of this --model.
"""
import asyncio
import json
import logging
import os
import time
import uuid

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from pagedllm.lora.request import LoRAAdapterNotFoundError, LoRARequest
from pagedllm.server.errors import APIError, shorten
from pagedllm.server.launch import RESOLVER_DIR_ENV, RUNTIME_UPDATING_ENV, LoRAModulePath, runtime_updating_allowed

logger = logging.getLogger(__name__)


class ServingLoRAs:
    """The adapters a server serves, by name."""

    def __init__(self, engine, base_model_name: str, base_model_aliases: list[str] = ()):
        self.engine = engine
        self.base_model_name = base_model_name
        self.base_model_names = {base_model_name, *base_model_aliases}   # a request's model naming one is the base
        self.adapters: dict[str, tuple[LoRARequest, str]] = {}   # name -> (its request, parent model name)
        self._next_id = 1
        self._lock = asyncio.Lock()   # one load or unload at a time: a name is checked and taken atomically
        # vLLM's filesystem resolver: on only with runtime updating, as vLLM consults resolvers only then
        self.resolver_dir = (os.environ.get(RESOLVER_DIR_ENV) or None) if runtime_updating_allowed() else None

    def get(self, name: str) -> LoRARequest | None:
        entry = self.adapters.get(name)
        return None if entry is None else entry[0]

    async def load_static(self, modules: list[LoRAModulePath]):
        """--lora-modules at start-up: a bad one stops the server with its error. A base_model_name that is not
        a served model name is vLLM's: the adapter's parent is the base model's first name (logged here)."""
        for m in modules:
            parent = m.base_model_name
            if parent is not None and parent not in self.base_model_names:
                logger.warning("--lora-modules %s: base_model_name %r is not a served model name (%s): its parent is "
                               "%r, as vLLM's", m.name, parent, ", ".join(sorted(self.base_model_names)),
                               self.base_model_name)
                parent = None
            try:
                await self.load(m.name, m.path, parent)
            except APIError as e:
                raise ValueError(f"--lora-modules {m.name}={m.path}: {e.message}") from None

    async def load(self, name: str, path: str, parent: str | None = None, inplace: bool = False):
        """inplace (vLLM's load_inplace): a loaded adapter of that name is replaced by the one at `path`."""
        async with self._lock:
            await self._load(name, path, parent, inplace)

    async def resolve(self, name: str) -> LoRARequest | None:
        """vLLM's filesystem resolver, for a request's model that names no loaded adapter: the directory
        `name` under VLLM_LORA_RESOLVER_CACHE_DIR, if its adapter_config.json is a LoRA (peft_type) of this
        --model (base_model_name_or_path, as vLLM compares them), is loaded under that name. None: no such
        adapter there (the caller's 404); one found that does not load is a 400 saying why."""
        if self.resolver_dir is None:
            return None
        async with self._lock:
            if name in self.adapters:   # loaded meanwhile
                return self.get(name)
            root = os.path.realpath(self.resolver_dir)
            path = os.path.realpath(os.path.join(root, name))
            if os.path.commonpath([root, path]) != root or path == root:
                return None   # a name is a directory under the resolver's, never a way out of it
            try:
                with open(os.path.join(path, "adapter_config.json"), "rb") as f:
                    config = json.loads(f.read())
            except (OSError, ValueError):
                return None
            if not (isinstance(config, dict) and config.get("peft_type") == "LORA"
                    and config.get("base_model_name_or_path") == self.engine.config.model):
                return None
            try:
                await self._load(name, path, None)
            except APIError as e:
                raise APIError(400, f"LoRA adapter '{shorten(name)}' was found but could not be loaded: {e.message}",
                               "model", "invalid_lora_adapter") from None
            logger.info("LoRA adapter %r resolved and loaded from %s", name, path)
            return self.get(name)

    async def _load(self, name: str, path: str, parent: str | None = None, inplace: bool = False):
        old = self.adapters.get(name)
        if old is not None and not inplace:
            raise APIError(400, f"The lora adapter '{shorten(name)}' has already been loaded: set load_inplace "
                                f"to true to replace it", "lora_name", "invalid_value")
        if name in self.base_model_names:
            raise APIError(400, f"lora_name '{shorten(name)}' is the base model's name", "lora_name",
                           "invalid_value")
        request = LoRARequest(name, self._next_id, path, base_model_name=parent)
        try:
            await self.engine.add_lora(request)
        except LoRAAdapterNotFoundError as e:   # vLLM's 404: no adapter at that path
            raise APIError(404, shorten(str(e), 1000), "lora_path", "lora_adapter_not_found") from None
        except ValueError as e:   # the adapter's own problem (peft_loader names the path), or LoRA off
            raise APIError(400, shorten(str(e), 1000), "lora_path", "invalid_lora_adapter") from None
        self._next_id += 1
        self.adapters[name] = (request, parent or (old[1] if old else self.base_model_name))
        if old is not None:
            # A fresh id, not the old one: blocks cached under the old weights are never reused. The old
            # adapter leaves the host now, or (requests still running under it) once the LRU evicts it.
            await self.engine.remove_lora(old[0].lora_int_id)

    async def unload(self, name: str):
        """The name is gone at once, as vLLM's: requests running under the adapter finish under it, and the
        engine keeps it until they end (then its LRU evicts it, as an adapter replaced by load_inplace). Its id is
        never given again, so a name loaded anew is a fresh adapter."""
        async with self._lock:
            request = self.get(name)
            if request is None:
                raise APIError(404, f"The lora adapter '{shorten(name)}' cannot be found.", "lora_name",
                               "model_not_found")
            await self.engine.remove_lora(request.lora_int_id)   # False while requests run under it
            del self.adapters[name]

    def cards(self) -> list[dict]:
        """/v1/models' cards of the adapters, with the base model's fields: an adapter runs in the base model's
        context, so its max_model_len is the base model's (vLLM's card has the key, null)."""
        return [model_card(name, req.lora_path, parent, self.engine.max_model_len)
                for name, (req, parent) in self.adapters.items()]


def model_card(name: str, root: str, parent: str | None, max_model_len: int) -> dict:
    """A /v1/models card, vLLM's fields: its `permission` holds one model_permission object with vLLM's values
    (clients written for vLLM read it)."""
    created = int(time.time())
    permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": created,
                  "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                  "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                  "organization": "*", "group": None, "is_blocking": False}
    return {"id": name, "object": "model", "created": created, "owned_by": "pagedllm", "root": root,
            "parent": parent, "max_model_len": max_model_len, "permission": [permission]}


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False   # vLLM's: true replaces a loaded adapter of that name
    is_3d_lora_weight: bool = False   # vLLM's MoE weight layout: no MoE model here, so it changes nothing


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None   # vLLM's field; the name decides


def lora_routes(loras: "ServingLoRAs | None", dependencies: list) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=dependencies)

    def check_allowed():
        if not runtime_updating_allowed():
            raise APIError(404, f"runtime LoRA loading is off: start the server with {RUNTIME_UPDATING_ENV}=True",
                           None, "not_found")
        if loras is None:
            raise APIError(400, "LoRA adapters need --enable-lora", None, "invalid_value")

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest):
        check_allowed()
        if not req.lora_name or not req.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.", None, "invalid_value")
        await loras.load(req.lora_name, req.lora_path, inplace=req.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest):
        check_allowed()
        if not req.lora_name:   # vLLM's 400: no adapter is named, rather than one not found
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "lora_name",
                           "invalid_value")
        await loras.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
    return router
