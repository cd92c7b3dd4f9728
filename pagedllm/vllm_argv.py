"""A command line as vLLM's parser reads it, rewritten into one pagedllm's argparse parser takes: flags from a
`--config FILE.yaml`, flags with underscores (`--max_model_len`) and `--help=all`. Text in, text out: argparse
then judges every flag as if it had been typed in full, so a refusal names the flag as the user wrote it."""
import json


def vllm_argv(argv: list[str], several: frozenset[str]) -> list[str]:
    """several: the flags that take several values (`--api-key k1 k2`), which a file's list fills item by item."""
    return vllm_spelling(with_config_file(argv, several))


def with_config_file(argv: list[str], several: frozenset[str]) -> list[str]:
    """argv with `--config FILE.yaml` replaced by the file's flags, as vLLM's: a mapping of flag (dashes or
    underscores) to value, where true is --flag, false --no-flag, a list the flag's several values (else its
    JSON), a mapping the flag's JSON object; null leaves the flag out (its default, as vLLM reads "None").
    The file's flags go right after the subcommand, so the command line's come later and win (vLLM's order:
    command line, file, defaults); a flag given on the command line drops the file's own entirely, also for
    the flags whose values add up (--api-key). Each flag is one `--flag=value` token, so none can take the
    positional MODEL as a value."""
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
    start = 2 if rest[:1] == ["bench"] else 1   # after the subcommand
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


def vllm_spelling(argv: list[str]) -> list[str]:
    """Flags as vLLM's parser also takes them, in ours: `--max_model_len` (underscores, as Mistral's model cards
    write them) is `--max-model-len`; `--help=all` (vLLM's help search) is `--help`."""
    def dashed(arg: str) -> str:   # the flag's name only: not its =value
        name, eq, value = arg.partition("=")
        return name.replace("_", "-") + eq + value
    return ["--help" if a.startswith("--help=") else dashed(a) if a.startswith("--") else a for a in argv]

