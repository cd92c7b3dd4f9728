"""Gemma 3 4B and up (Gemma3ForConditionalGeneration, a SigLIP tower beside the text model) served text-only:
greedy tokens and logprobs of transformers' Gemma3ForConditionalGeneration on text prompts, float32, through
16-token chunks and prefix-cache hits, from files naming the language model as the Hub and transformers 5's
save_pretrained do (language_model.model.*) and as transformers 5's modules do (model.language_model.*)."""
import pytest
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from pagedllm import LLM
from test_vs_transformers import GREEDY, PROMPTS, check_greedy_matches, hf_greedy

# the Hub's names -> transformers 5's module names
MODULE_NAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def _rename_to_modules(model_dir: str) -> None:
    path = f"{model_dir}/model.safetensors"
    tensors = load_file(path)
    assert any(k.startswith("vision_tower.") for k in tensors)   # the tower is in the file, to be left unread

    def renamed(name: str) -> str:
        return next((new + name[len(old):] for old, new in MODULE_NAMES if name.startswith(old)), name)
    save_file({renamed(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("tied,names", [(True, "hub"), (False, "hub"), (False, "modules")])
def test_text_part_matches_transformers(tmp_path, tied, names):
    """tied: the head is the embedding (every Hub checkpoint), else language_model.lm_head / lm_head, read as
    the config's top says (transformers ties by it; text_config's tie_word_embeddings stays at its default, True)."""
    d = make_tiny_model(tmp_path / "vl", "gemma3_vl", tie_word_embeddings=tied, seed=15)
    ref = hf_greedy(d, PROMPTS)   # AutoModelForCausalLM: transformers' Gemma3ForConditionalGeneration
    if names == "modules":
        _rename_to_modules(d)
    llm = LLM(d, dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=True, log_stats_interval=0)
    model = llm.engine.runner.model
    assert type(model).__name__ == "Gemma3ForConditionalGeneration" and len(model.model.layers) == 3
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    check_greedy_matches(llm.generate(PROMPTS, GREEDY, use_tqdm=False), ref)
    assert llm.engine.get_stats().prefix_cache_hits > 0   # the shared 40-token prefix


def test_text_part_as_its_own_draft(tmp_path):
    """The draft's config is read as the target's (its text_config): every proposal accepted, transformers' tokens."""
    d = make_tiny_model(tmp_path / "vl", "gemma3_vl", seed=15)
    spec = {"method": "draft_model", "model": d, "num_speculative_tokens": 3}
    llm = LLM(d, dtype="float32", speculative_config=spec, log_stats_interval=0)
    check_greedy_matches(llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False), hf_greedy(d, PROMPTS[:6]))
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
