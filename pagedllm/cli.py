"""`pagedllm generate | serve | bench throughput | bench serve`: engine and server flags are generated from the
fields of EngineConfig and ServerConfig (names as vLLM's)."""
import argparse
import json
import logging
import os
import sys
import types
import typing

from pagedllm import __version__, client
from pagedllm.bench import serve as bench_serve
from pagedllm.bench import latency as bench_latency
from pagedllm.bench import throughput_args
from pagedllm.bench.workloads import WORKLOADS
from pagedllm.config import EngineConfig, ServerConfig, config_fields
from pagedllm.vllm_argv import human_readable_int, vllm_argv
from pagedllm.vllm_flags import VLLM_FLAGS, add_vllm_flags, check_vllm_flags


def add_engine_args(parser: argparse.ArgumentParser):
    add_config_args(parser, EngineConfig, "engine")


def add_config_args(parser: argparse.ArgumentParser, cls, title: str, only: tuple[str, ...] | None = None):
    """A flag for each field of cls (of `only`'s fields, where given)."""
    group = parser.add_argument_group(title)
    for name, ftype, default, meta in config_fields(cls):
        if only is not None and name not in only:
            continue
        flags = ["--" + name.replace("_", "-"), *meta.get("aliases", ())]   # aliases: vLLM's -tp, -q
        if ftype is bool or ftype == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        if meta.get("nargs"):   # items after the flag, as vLLM's --lora-modules a=/p b=/q; given again on the
            # command line, the last flag's items replace the earlier (vllm_argv.last_of_repeated); a config file's
            # list comes as one --flag=item token an item, which add up
            group.add_argument(*flags, nargs=meta["nargs"], action="extend", default=default, help=meta["help"])
            continue
        if typing.get_origin(ftype) is list:   # a JSON list, as vLLM takes them: --allowed-origins '["*"]'
            group.add_argument(*flags, type=_json_list, default=default,
                               help=f"{meta['help']} (a JSON list; default: {json.dumps(default)})")
            continue
        scalar = human_readable_int if meta.get("human_readable") else _scalar_type(ftype)
        if meta.get("not_built"):   # vLLM values of this flag that are not built here, refused saying why
            scalar = _not_built(scalar, meta["not_built"])
        if meta.get("why_not"):   # a value outside the choices is refused saying why, not only that it is
            scalar = _choice(scalar, meta["choices"], meta["why_not"])
        choices = meta.get("choices")
        if isinstance(ftype, types.UnionType) and type(None) in typing.get_args(ftype):
            scalar = _or_none(scalar)   # vLLM's optional flags take "None" (and "") for unset: templates write it
            choices = None if choices is None else [*choices, None]
        group.add_argument(*flags, type=scalar, default=default, choices=choices,
                           help=f"{meta['help']} (default: {default})")


def _or_none(scalar):
    def parse(text: str):
        return None if text in ("", "None") else scalar(text)
    parse.__name__ = getattr(scalar, "__name__", "value")   # argparse names the type in its errors
    return parse


def _scalar_type(ftype):
    """int | None -> int, etc."""
    if isinstance(ftype, types.UnionType):
        ftype = next(a for a in typing.get_args(ftype) if a is not type(None))
    return ftype


def _not_built(scalar, why: dict[str, str]):
    """scalar, with the texts of `why` (vLLM's values not built here) refused naming the reason."""
    def parse(text: str):
        if text.strip().lower() in why:
            raise argparse.ArgumentTypeError(f"{text!r}: {why[text.strip().lower()]}")
        return scalar(text)
    return parse


def _choice(scalar, choices: tuple, why_not: str):
    """scalar, with argparse's "invalid choice" message followed by why the others are refused."""
    def parse(text: str):
        value = scalar(text)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {shown}): {why_not}")
        return value
    return parse


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings such as '[\"*\"]', got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace, cls=EngineConfig) -> dict:
    return {name: getattr(args, name) for name, *_ in config_fields(cls)}


def _generate(args):
    from pagedllm import LLM, SamplingParams
    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.sampling_seed, max_tokens=args.max_tokens,
                            stop=args.stop, ignore_eos=args.ignore_eos)
    for out in llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1):
        for c in out.outputs:
            print(out.prompt + c.text)


def _server_configs(args) -> tuple[EngineConfig, ServerConfig]:
    """serve's and run-batch's configs; the positional MODEL wins over --model; vLLM's flags checked."""
    if args.model_tag is not None:
        args.model = args.model_tag
    vars(args).update(check_vllm_flags(args))
    return EngineConfig(**engine_kwargs(args)), ServerConfig(**engine_kwargs(args, ServerConfig))


def _serve(args):
    from pagedllm.server.launch import serve
    serve(*_server_configs(args))


# serve's flags for its HTTP listener, which run-batch (requests answered in-process, no socket) has none of; but
# --host / --port, with --enable-metrics (vLLM's), place its Prometheus listener
_HTTP_ONLY = ("host", "port", "api_key", "api_server_count", "uvicorn_log_level", "disable_uvicorn_access_log",
              "allowed_origins", "allowed_methods", "allowed_headers", "allow_credentials", "ssl_keyfile",
              "ssl_certfile", "root_path", "disable_fastapi_docs", "enable_request_id_headers",
              "max_request_body_bytes")
_METRICS_LISTENER = ("host", "port")


def _run_batch(args):
    from pagedllm.server.run_batch import run_batch
    defaults = {name: default for name, _, default, _ in config_fields(ServerConfig)}
    given = [name for name in _HTTP_ONLY if getattr(args, name) != defaults[name]
             and not (args.enable_metrics and name in _METRICS_LISTENER)]
    if args.url is not None and not args.enable_metrics:
        given.append("url")
    if given:
        raise ValueError(f"run-batch serves no HTTP: {', '.join('--' + n.replace('_', '-') for n in given)} "
                         f"{'is' if len(given) == 1 else 'are'} serve's (run-batch takes --host / --port, and "
                         f"vLLM's --url, only with --enable-metrics, for its Prometheus listener)")
    metrics_address = None
    if args.enable_metrics:
        host = args.host
        if args.url is not None:   # vLLM's deprecated name of --host for this listener
            if host != defaults["host"] and host != args.url:
                raise ValueError(f"--url {args.url!r} and --host {host!r}: --url is vLLM's old name of --host "
                                 f"(the metrics listener's address); give one")
            logging.getLogger("pagedllm").warning("--url is deprecated (as in vLLM): use --host")
            host = args.url
        metrics_address = (host, args.port)
    counts = run_batch(*_server_configs(args), args.input_file, args.output_file, args.output_tmp_dir,
                       metrics_address)
    print(json.dumps({"output_file": args.output_file, "by_status": counts}))


def _add_server_args(parser: argparse.ArgumentParser):
    """serve's and run-batch's arguments: MODEL, the server's flags, the engine's."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="model directory (as --model)")
    add_config_args(parser, ServerConfig, "server")
    add_engine_args(parser)
    add_vllm_flags(parser)


def _add_run_batch_parser(sub):
    run = sub.add_parser("run-batch", help="answer a JSONL file of requests in OpenAI's Batch format offline "
                                           "(vLLM's run-batch): one output line per input line")
    run.add_argument("-i", "--input-file", required=True, help="the requests: a JSONL file or an http(s) URL to GET, "
                     "a line each: custom_id, method POST, url (/v1/chat/completions, /v1/completions, "
                     "/v1/responses), body")
    run.add_argument("-o", "--output-file", required=True, help="the answers: a JSONL file, in the input's order, "
                     "or an http(s) URL to PUT it to")
    run.add_argument("--output-tmp-dir", default=None, help="with a URL --output-file: the directory the output "
                     "is written to before its upload (kept there if the upload fails); default: in memory")
    run.add_argument("--enable-metrics", action="store_true", help="while the batch runs, serve serve's /metrics "
                     "(Prometheus) on --host (default 127.0.0.1) and --port (default 8000), at any GET path, as "
                     "vLLM's run-batch")
    run.add_argument("--url", default=None, help="vLLM's deprecated name of --host for the --enable-metrics "
                     "listener")
    _add_server_args(run)


def _add_throughput_args(parser: argparse.ArgumentParser):
    parser.add_argument("--workload", default=None, choices=WORKLOADS,
                        help="a workload of shared/benchmarks.md (default: vLLM's random dataset, --input-len ...)")
    parser.add_argument("--engine", choices=("pagedllm", "hf"), default="pagedllm",
                        help="pagedllm, or hf: transformers generate in static batches (the paper's baseline)")
    parser.add_argument("--num-requests", type=int, default=None, help="only the first N requests (quick runs)")
    parser.add_argument("--output-json", default=None, help="also append the JSON line to this file")
    parser.add_argument("--hf-batch-size", type=int, default=256, help="requests per static batch (--engine hf)")
    parser.add_argument("--max-output-len-cap", type=int, default=None,
                        help="CPU smoke tests only: cap every request's output length; the run is then not the "
                             "workload, and the JSON says so")
    throughput_args.add_vllm_args(parser)


def _add_serve_parser(sub):
    _add_server_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, "
                                                  "/v1/chat/completions, ...)"))


def _several_values() -> frozenset[str]:
    """The flags that take several values after them (--api-key k1 k2): a config file's list fills them."""
    fields = config_fields(EngineConfig) + config_fields(ServerConfig)
    return frozenset(["--" + name.replace("_", "-") for name, _, _, meta in fields if meta.get("nargs")] +
                     ["--" + flag.name for flag in VLLM_FLAGS if flag.nargs])


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _vllm_logging_level(args: argparse.Namespace, argv: list[str]):
    """vLLM's VLLM_LOGGING_LEVEL sets the log level where --log-level is not given (vLLM's request logger tells
    users to set it to see prompts); the flag wins."""
    env = os.environ.get("VLLM_LOGGING_LEVEL", "").strip()
    if not env or not hasattr(args, "log_level") or any(a.partition("=")[0] in ("--log-level", "--log_level")
                                                       for a in argv):
        return
    levels = [level for level in LOG_LEVELS if args.command in ("generate", "bench") or level != "CRITICAL"]
    if env.upper() not in levels:
        raise ValueError(f"VLLM_LOGGING_LEVEL={env!r}: expected one of {', '.join(levels)}")
    args.log_level = env.upper() if args.command in ("generate", "bench") else env.lower()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: LLM inference with a paged KV cache")
    parser.add_argument("-v", "--version", action="version", version=f"pagedllm {__version__}")   # as vLLM's
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts offline and print prompt + completion")
    gen.add_argument("prompts", nargs="*", default=["Once upon a time"], help="prompt texts")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    add_engine_args(gen)
    _add_serve_parser(sub)
    _add_run_batch_parser(sub)
    sub.add_parser("collect-env", help="print what a bug report needs about this machine (vLLM's collect-env)")
    for name, what in (("chat", "chat completions"), ("complete", "text completions")):
        client.add_cli_args(sub.add_parser(name, help=f"{what} from a running server, streamed (vLLM's `vllm {name}`)"),
                            name)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    tput = bench.add_parser("throughput", help="offline throughput on a workload of shared/benchmarks.md; "
                                               "prints one JSON line")
    tput.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    _add_throughput_args(tput)
    add_engine_args(tput)
    bench_serve.add_cli_args(bench.add_parser("serve", help=bench_serve.__doc__.splitlines()[0]))
    lat = bench.add_parser("latency", help="vLLM's bench latency: seconds per batch of random prompts")
    lat.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    bench_latency.add_cli_args(lat)
    add_engine_args(lat)
    lat.set_defaults(enable_prefix_caching=False)   # as vLLM's: the same prompts every run would hit the cache
    try:
        argv = vllm_argv(sys.argv[1:] if argv is None else argv, _several_values())
    except (ValueError, OSError) as e:   # --config: its file, or its form
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        _vllm_logging_level(args, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    level = getattr(args, "log_level", "WARNING").upper()   # bench serve has no --log-level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "run-batch":
            _run_batch(args)
        elif args.command in ("chat", "complete"):
            return client.run(args)
        elif args.command == "collect-env":
            from pagedllm.collect_env import report
            print(report())
        elif args.bench == "throughput":
            from pagedllm.bench import throughput   # torch and the engine: not imported for serve's start
            throughput.main(args, engine_kwargs(args))
        elif args.bench == "latency":
            bench_latency.main(args, engine_kwargs(args))
        else:
            bench_serve.main(args)
    except (ValueError, OSError, NotImplementedError, RuntimeError, OverflowError) as e:   # OSError: paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
