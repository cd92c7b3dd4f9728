"""vLLM's Hub flags reach a tokenizer given as a Hub id (the model itself is a local directory here): its revision
(--tokenizer-revision, else --revision), where it is downloaded (--download-dir) and the token (--hf-token). They
were taken and ignored: a pinned revision silently loaded the main branch's tokenizer."""
import json
import shutil
from pathlib import Path

import huggingface_hub.constants

from pagedllm.config import DEMO_MODEL, EngineConfig
from pagedllm.engine.tokenizer import load_engine_tokenizer


def _cache(root: Path) -> Path:
    """A Hugging Face cache holding fake/tok at two revisions, told apart by model_max_length."""
    repo = root / "models--fake--tok"
    for ref, commit, length in (("main", "a" * 40, 111), ("v9", "b" * 40, 999)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer.model", "special_tokens_map.json", "tokenizer_config.json",
                     "config.json"):
            shutil.copy(Path(DEMO_MODEL) / name, snapshot / name)
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        (snapshot / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return root


def test_a_hub_tokenizer_is_read_at_the_revision_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # the cache alone, no network
    cache = str(_cache(tmp_path))

    def max_length(**kwargs) -> int:
        config = EngineConfig(tokenizer="fake/tok", download_dir=cache, device="cpu", **kwargs)
        return load_engine_tokenizer(config).model_max_length
    assert max_length() == 111
    assert max_length(tokenizer_revision="v9") == 999
    assert max_length(revision="v9") == 999                            # tokenizer_revision's default, as vLLM's
    assert max_length(revision="v9", tokenizer_revision="main") == 111
