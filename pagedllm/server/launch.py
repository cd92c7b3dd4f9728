"""`pagedllm serve`'s start: the server's own checks, then the engine core process, then the server.

Kept light (no torch, transformers or FastAPI here): the core process is started before this process imports the
server, so that it imports torch and loads the model while this one imports FastAPI and loads the tokenizer. It
derives the batch defaults for its GPU itself (no CUDA context in an API process) and sends the resulting config
back with its "ready". A bad engine flag or model directory is the core's "failed" message, raised here as the
same error (exit code 2). H200 (2026-12-04, 8f92a28), before: the core started after the API process's imports
and a CUDA context of its own, 33-49 s from the command to /health of which the core's own timer was 6.8-20.6 s.
"""
import errno
import ipaddress
import json
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, replace

from pagedllm.chat_template_arg import read_chat_template
from pagedllm.config import EngineConfig, ServerConfig


@dataclass(frozen=True)
class ServeChecks:
    """What serve() read and checked before any process started, handed to each API process."""
    chat_template: str | None              # --chat-template's text
    lora_modules: "list[LoRAModulePath]"   # --lora-modules, parsed
    started: float                         # time.monotonic() when `pagedllm serve` began (the start-up is logged)


def serve(engine_config: EngineConfig, server_config: ServerConfig):
    checks = check_serve_config(engine_config, server_config, time.monotonic())   # before any process starts
    if server_config.api_server_count > 1:
        from pagedllm.server.api_servers import serve_with_api_servers
        serve_with_api_servers(engine_config, server_config, checks)
        return
    # Bound before the model loads: a port in use is an error now, not uvicorn's after the whole load.
    sock = listen(server_config.host, server_config.port)
    server_config = replace(server_config, port=sock.getsockname()[1])   # port 0: the one the system chose
    core = None
    try:
        from pagedllm.engine.core_process import CoreClient
        core = CoreClient(engine_config)   # loads the model while this process imports the server
        from pagedllm.server.api_server import run_api_server
        run_api_server(engine_config, server_config, checks, core, sock)
    finally:
        if core is not None:
            core.shutdown()   # done already unless the server failed before its engine took the core
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything starts, so that a port in use is an error naming it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "stop what holds it, or choose another --port" if e.errno == errno.EADDRINUSE else "check --host"
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} ({hint})") from None
    sock.listen(2048)
    return sock


def check_serve_config(engine_config: EngineConfig, server_config: ServerConfig, started: float) -> ServeChecks:
    """The server's own errors, found before a process starts; what it read on the way."""
    if engine_config.skip_tokenizer_init:
        raise ValueError("skip_tokenizer_init: pagedllm serve needs a tokenizer (text prompts, chat, /tokenize); "
                         "use it offline, LLM(..., skip_tokenizer_init=True) on token-id prompts")
    chat_template = read_chat_template(server_config.chat_template)
    _check_host(server_config.host)
    _check_tls(server_config)
    lora_modules = parse_lora_modules(server_config.lora_modules)
    if lora_modules and not engine_config.enable_lora:
        raise ValueError("lora_modules need --enable-lora (it sets the engine up for adapters: --max-loras, "
                         "--max-lora-rank)")
    _check_resolvers()
    n = server_config.api_server_count
    if n > 1 and runtime_updating_allowed():
        raise ValueError(f"{RUNTIME_UPDATING_ENV} is set, but loading adapters at run time needs --api-server-count "
                         f"1, not {n} (each API process would know only the adapters loaded through it); serve "
                         f"adapters with --lora-modules instead")
    return ServeChecks(chat_template, lora_modules, started)


def _check_host(host: str):
    """A dotted-number --host that is no IPv4 address (999.1.1.1): refused now, not by uvicorn's DNS lookup
    after the model has loaded (9 s, naming no flag). Names are left to the resolver."""
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise ValueError(f"--host {host!r} is not an IPv4 address: {e}") from None


def _check_tls(config: ServerConfig):
    """Load the key and certificate once before the engine starts: a wrong path or file is a clear error
    here, not a uvicorn traceback after the model has loaded."""
    if config.ssl_certfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except OSError as e:   # ssl.SSLError is one
        raise ValueError(f"ssl_certfile/ssl_keyfile: cannot load {config.ssl_certfile!r} with "
                         f"{config.ssl_keyfile!r}: {e}") from e


RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
RESOLVER_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"        # vLLM's filesystem resolver (server/lora.py)
RESOLVER_HUB_ENV = "VLLM_LORA_RESOLVER_HF_REPO_LIST"     # vLLM's Hub resolver: not built (nothing is downloaded)


def _check_resolvers():
    """vLLM's LoRA resolvers' variables: a resolver directory that is none stops vLLM's start too; the Hub
    resolver, which downloads adapters, is not built: refused rather than every request naming one a 404."""
    resolver_dir = os.environ.get(RESOLVER_DIR_ENV)
    if resolver_dir and not os.path.isdir(resolver_dir):
        raise ValueError(f"{RESOLVER_DIR_ENV} must be set to a valid directory for the filesystem LoRA resolver, "
                         f"got {resolver_dir!r}")
    if os.environ.get(RESOLVER_HUB_ENV) and runtime_updating_allowed():
        raise ValueError(f"{RESOLVER_HUB_ENV} is set: vLLM's Hugging Face Hub LoRA resolver is not built (pagedllm "
                         f"downloads nothing); download the adapters into {RESOLVER_DIR_ENV}, whose resolver is "
                         f"built, or unset it")


def runtime_updating_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true")


@dataclass(frozen=True)
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None
    is_3d_lora_weight: bool = False   # vLLM's MoE weight layout: no MoE model here, so it changes nothing


def parse_lora_modules(items: list[str]) -> list[LoRAModulePath]:
    """--lora-modules items: name=path, or a JSON object with name, path and optionally base_model_name."""
    modules = []
    for item in items:
        if not item.strip():   # vLLM skips an empty item (a deployment template's unset list)
            continue
        if item.lstrip().startswith("{"):
            modules.append(_from_json(item))
            continue
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise ValueError(f"lora_modules item {item!r} must be name=path or a JSON object with name and path")
        modules.append(LoRAModulePath(name, path))
    names = [m.name for m in modules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"lora_modules names must be unique, got {duplicates} more than once")
    return modules


def _from_json(item: str) -> LoRAModulePath:
    try:
        obj = json.loads(item)
    except ValueError as e:
        raise ValueError(f"lora_modules item {item!r} is not valid JSON: {e}") from None
    unknown = sorted(set(obj) - {"name", "path", "base_model_name", "is_3d_lora_weight"}) \
        if isinstance(obj, dict) else []
    if not isinstance(obj, dict) or unknown:
        raise ValueError(f"lora_modules item {item!r}: a JSON object takes name, path, base_model_name and "
                         f"is_3d_lora_weight" + (f", not {unknown}" if unknown else ""))
    for key in ("name", "path"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(f"lora_modules item {item!r}: {key} must be a non-empty string")
    base = obj.get("base_model_name")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"lora_modules item {item!r}: base_model_name must be a string")
    if not isinstance(obj.get("is_3d_lora_weight", False), bool):
        raise ValueError(f"lora_modules item {item!r}: is_3d_lora_weight must be true or false")
    return LoRAModulePath(obj["name"], obj["path"], base, obj.get("is_3d_lora_weight", False))
