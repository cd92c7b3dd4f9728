"""A command line as vLLM's parser reads it, rewritten into one pagedllm's argparse parser takes: flags from a
`--config FILE.yaml`, flags with underscores (`--max_model_len`), `--help=all`, and dotted keys of JSON flags
(`--speculative-config.method ngram`). Text in, text out: argparse then judges every flag as if it had been
typed in full, so a refusal names the flag as the user wrote it."""
import argparse
import json
import logging
import re
import sys

logger = logging.getLogger("pagedllm")


def vllm_argv(argv: list[str], several: frozenset[str], subcommand: bool = True) -> list[str]:
    """several: the flags that take several values (`--api-key k1 k2`), which a file's list fills item by item;
    subcommand: argv starts with one (`serve ...`), which a config file's flags go after."""
    return json_keys(vllm_spelling(with_config_file(last_of_repeated(argv, several), several, subcommand)))


class FlexibleArgumentParser(argparse.ArgumentParser):
    """vLLM's FlexibleArgumentParser (vllm.utils.argparse_utils), for scripts that build their own parser
    (`AsyncEngineArgs.add_cli_args(parser)`): an argparse parser that reads a command line as vLLM's does
    (vllm_argv: --config FILE.yaml, --max_model_len, dotted keys of JSON flags, the last of a repeated
    several-valued flag). A plain argparse.ArgumentParser works too, without these."""

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        several = frozenset(option for action in self._actions if action.nargs in ("+", "*")
                            for option in action.option_strings if option.startswith("--"))
        try:
            argv = vllm_argv(argv, several, subcommand=self._subparsers is not None)
        except (ValueError, OSError) as e:   # --config: its file, or its form
            self.error(str(e))
        return super().parse_known_args(argv, namespace)


def last_of_repeated(argv: list[str], several: frozenset[str]) -> list[str]:
    """A flag of several values given more than once: the last one's values replace the earlier ones', as vLLM's
    parser keeps them (and says so). argparse would add them up: a wrapper's `--api-key OLD "$@"` would keep OLD
    working beside the user's --api-key NEW. A flag's values are the tokens after it up to the next option."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for i, arg in enumerate(argv):
        name = _flag_name(arg)
        if arg.startswith("--") and name in several:
            end = i + 1
            while "=" not in arg and end < len(argv) and not _is_option(argv[end]):
                end += 1
            spans.setdefault(name, []).append((i, end))
    dropped = set()
    for name, found in spans.items():
        if len(found) > 1:
            logger.warning("%s was given %d times: the last one's values are taken (as vLLM's)", name, len(found))
            dropped.update(i for start, end in found[:-1] for i in range(start, end))
    return [arg for i, arg in enumerate(argv) if i not in dropped]


def _is_option(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1 and not re.fullmatch(r"-\d[\d.e+-]*", arg)


def with_config_file(argv: list[str], several: frozenset[str], subcommand: bool = True) -> list[str]:
    """argv with `--config FILE.yaml` replaced by the file's flags, as vLLM's: a mapping of flag (dashes or
    underscores) to value, where true is --flag, false --no-flag, a list the flag's several values (else its
    JSON), a mapping the flag's JSON object; null leaves the flag out (its default, as vLLM reads "None").
    The file's flags go right after the subcommand (first, with none), so the command line's come later and win
    (vLLM's order: command line, file, defaults); a flag given on the command line drops the file's own
    entirely, also for the flags whose values add up (--api-key). Each flag is one `--flag=value` token, so none
    can take the positional MODEL as a value."""
    at = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if not at:
        return argv
    if len(at) > 1:
        raise ValueError("--config: one config file at most (as vLLM's)")
    i = at[0]
    path, taken = (argv[i + 1] if i + 1 < len(argv) else None, 2) if argv[i] == "--config" else (argv[i][9:], 1)
    if not path or path.startswith("-"):
        raise ValueError("--config: expected a YAML file (FILE.yaml or FILE.yml)")
    rest = argv[:i] + argv[i + taken:]
    start = (2 if rest[:1] == ["bench"] else 1) if subcommand else 0   # after the subcommand, if any
    given = {_flag_name(arg) for arg in rest if arg.startswith("--")}
    flags = [token for key, value in _read_yaml(path).items() if _flag_name("--" + str(key)) not in given
             for token in _file_flag("--" + str(key), value, several)]
    return rest[:start] + flags + rest[start:]


def _read_yaml(path: str) -> dict:
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"--config {path}: the config file must be YAML (.yaml or .yml), as vLLM's")
    import yaml   # only for --config
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(config, (dict, type(None))):
        raise ValueError(f"--config {path}: expected a mapping of flag: value, got {type(config).__name__}")
    return config or {}


def _file_flag(flag: str, value, several: frozenset[str]) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(value, list) and _flag_name(flag) in several:
        return [f"{flag}={item}" for item in value]
    if isinstance(value, (list, dict)):
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={value}"]


def _flag_name(arg: str) -> str:
    """--max_model_len=2048 -> --max-model-len"""
    return arg.partition("=")[0].replace("_", "-")


# vLLM's old flags for a model config value, dropped in favour of --hf-overrides (vLLM said so while it took them)
_HF_OVERRIDES = {"--rope-theta": "--hf-overrides.rope_theta", "--rope-scaling": "--hf-overrides.rope_scaling"}


def vllm_spelling(argv: list[str]) -> list[str]:
    """Flags as vLLM's parser also takes them, in ours: `--max_model_len` (underscores, as Mistral's model cards
    write them) is `--max-model-len`; `--help=all` (vLLM's help search) is `--help`; vLLM's old `--rope-theta
    1e6` is `--hf-overrides.rope_theta 1e6`."""
    def dashed(arg: str) -> str:   # the flag's name only: not its =value, nor the keys after a dot
        name, eq, value = arg.partition("=")
        flag, dot, keys = name.partition(".")
        flag = flag.replace("_", "-")
        return _HF_OVERRIDES.get(flag, flag) + dot + keys + eq + value
    return ["--help" if a.startswith("--help=") else dashed(a) if a.startswith("--") else a for a in argv]



# --flag.key[.key...][+], also -O.key: a dotted key of a JSON flag (a letter first: -1.5 is a value)
_DOTTED = re.compile(r"(--?[A-Za-z][\w-]*)\.([^=]+)")


def json_keys(argv: list[str]) -> list[str]:
    """argv with the dotted keys of each flag gathered into the flag's JSON object, as vLLM's parser does:
    `--speculative-config.method ngram --speculative-config.num_speculative_tokens 4` is
    `--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'`; `--a.b.c v` nests; `--a.k+ v`
    (or `--a.k+=v1,v2`) appends to the list k. A value is read as JSON (4, 1e6, true, null, {...}), else as a
    human-readable int (32k), else as text. The object goes at the end, so argparse judges it as the flag's
    value. Where the flag is also given whole, the keys merge into that object (vLLM replaces it with them)."""
    rest, objects, i = [], {}, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        dotted = _DOTTED.fullmatch(name)
        if dotted is None or not argv[i].startswith("-"):
            rest.append(argv[i])
            i += 1
            continue
        if not eq:
            if i + 1 == len(argv):
                raise ValueError(f"{name}: expected a value")
            value, i = argv[i + 1], i + 1
        i += 1
        flag, keys = dotted[1], dotted[2]
        item = value.split(",") if keys.endswith("+") else _json_value(value)
        for key in reversed(keys.removesuffix("+").split(".")):
            item = {key: item}
        _merge(objects.setdefault(flag, {}), item)
    for flag, keys in objects.items():
        rest += [flag, json.dumps(_merge(_whole_value(rest, flag), keys))]
    return rest


def _json_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return human_readable_int(text)
    except argparse.ArgumentTypeError:
        return text


def _merge(into: dict, keys: dict) -> dict:
    """keys into into, key by key: objects merge, lists add up, anything else is replaced."""
    for key, value in keys.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key] += value
        else:
            into[key] = value
    return into


def _whole_value(argv: list[str], flag: str) -> dict:
    """The JSON object the last `flag VALUE` or `flag=VALUE` of argv gives ({} if none)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    values += [arg[len(flag) + 1:] for arg in argv if arg.startswith(flag + "=")]
    if not values:
        return {}
    try:
        whole = json.loads(values[-1])
    except ValueError:
        whole = None
    if not isinstance(whole, dict):
        raise ValueError(f"{flag} {values[-1]}: not a JSON object, so its dotted keys ({flag}.KEY) cannot go in it")
    return whole


def human_readable_int(text: str) -> int:
    """vLLM's human-readable ints: 32k = 32000, 32K = 32768 (k, m, g decimal; K, M, G binary, whole numbers)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", text.strip())
    if match is None or ("." in match[1] and not match[2].islower()):
        raise argparse.ArgumentTypeError(f"expected an integer such as 32768, 32k (32000) or 32K (32768), "
                                         f"got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]]
    return int(float(match[1]) * scale) if "." in match[1] else int(match[1]) * scale
