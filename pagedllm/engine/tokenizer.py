"""Loading the tokenizer and the set of token ids that end generation."""
import json
import os

from transformers import AutoTokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str, **kwargs):
    """A transformers tokenizer from a local model directory (or a hub id, when one is reachable)."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {path!r}: expected one of {', '.join(_TOKENIZER_FILES)}; "
                         f"point --tokenizer at a directory that has one")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e


def load_eos_token_ids(model_dir: str, tokenizer) -> set[int]:
    """tokenizer.eos_token_id plus generation_config.json's eos_token_id (an int or a list), because chat
    models often end turns with a token (e.g. <|eot_id|>) that only the generation config names."""
    eos = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            value = json.load(f).get("eos_token_id")
        eos.update(int(t) for t in (value if isinstance(value, list) else [value]) if t is not None)
    return eos
