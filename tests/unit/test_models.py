"""Our models, loaded by our loader and run over a flat paged batch, vs transformers run per sequence."""
import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_tiny_model
from pagedllm.attention.metadata import AttentionMetadata, set_forward_context
from pagedllm.models import get_model_class, model_dims
from pagedllm.models.loader import load_model

MODELS = ["llama", "llama_tied", "qwen2", "qwen3", "llama3_rope", "phi3", "qwen3_moe", "mixtral", "granite", "olmo2",
          "gemma", "gemma2", "gemma3"]
BLOCK_SIZE = 4
NUM_BLOCKS = 160
SEQ_LENS = [1, 7, 22, 100]         # a lone token, under one block, several blocks, past llama3's 64-token knee
CPU = torch.device("cpu")


def _load(model_dir, dtype=torch.float32, load_format="auto"):
    return load_model(model_dir, AutoConfig.from_pretrained(model_dir), dtype, CPU, load_format)


def _hf_logits(model_dir, sequences):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(seq[None]).logits[0] for seq in sequences]


def _sequences(seed=0, lens=SEQ_LENS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen) for n in lens]


class PagedBatch:
    """The KV caches of a model, and each request's block table over shuffled, non-contiguous blocks."""

    def __init__(self, model, max_len=max(SEQ_LENS), num_reqs=len(SEQ_LENS)):
        num_layers, num_kv_heads, head_dim = model_dims(model.config)
        self.model = model
        self.kv_caches = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim) for _ in range(num_layers)]
        blocks_per_req = -(-max_len // BLOCK_SIZE)
        ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(1))
        self.block_tables = ids[:num_reqs * blocks_per_req].view(num_reqs, blocks_per_req).int()

    def step(self, chunks: list[tuple[torch.Tensor, int]], req_ids: list[int] | None = None) -> list[torch.Tensor]:
        """chunks[i] = (new tokens, number of computed tokens) of request req_ids[i] (default: i)
        -> logits at every new token."""
        req_ids = list(range(len(chunks))) if req_ids is None else req_ids
        block_tables = self.block_tables[req_ids]
        positions = [torch.arange(done, done + len(toks)) for toks, done in chunks]
        slots = [block_tables[i].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                 for i, pos in enumerate(positions)]
        query_lens = [len(toks) for toks, _ in chunks]
        starts = [0] + torch.tensor(query_lens).cumsum(0).tolist()
        seq_lens = [done + len(toks) for toks, done in chunks]
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
        with set_forward_context(meta, self.kv_caches):
            hidden = self.model(torch.cat([t for t, _ in chunks]), torch.cat(positions))
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(query_lens))


def _assert_close(ours, refs):
    for got, ref in zip(ours, refs):
        assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_flat_batch_matches_transformers(tiny_model_dirs, name):
    model_dir = tiny_model_dirs[name]
    seqs = _sequences()
    logits = PagedBatch(_load(model_dir)).step([(s, 0) for s in seqs])
    _assert_close(logits, _hf_logits(model_dir, seqs))


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_reads_earlier_kv_from_cache(tiny_model_dirs, name):
    model_dir = tiny_model_dirs[name]
    seqs = _sequences(seed=1)
    cuts = [1, 3, 12, 99]             # the last request then decodes its final token
    batch = PagedBatch(_load(model_dir))
    first = batch.step([(s[:c], 0) for s, c in zip(seqs, cuts)])
    rest = [(s[c:], c) for s, c in zip(seqs, cuts)]
    live = [i for i, (toks, _) in enumerate(rest) if len(toks)]   # requests with nothing left sit the step out
    second = batch.step([rest[i] for i in live], req_ids=live)
    refs = _hf_logits(model_dir, seqs)
    _assert_close(first, [r[:c] for r, c in zip(refs, cuts)])
    _assert_close(second, [refs[i][cuts[i]:] for i in live])


# phi3_longrope / phi4_mini: long_factor's table (max_position_embeddings past the original context), as
# transformers' over positions past it; phi4_mini's table is 3/4 of a head wide
@pytest.mark.parametrize("name", ["llama", "llama3_rope", "qwen3", "phi3_longrope", "phi4_mini"])
def test_rotary_table_is_bit_exact_with_transformers(tiny_model_dirs, name):
    config = AutoConfig.from_pretrained(tiny_model_dirs[name])
    ours = _load(tiny_model_dirs[name]).model.rotary_emb
    hf_rotary = AutoModelForCausalLM.from_config(config).model.rotary_emb
    positions = torch.arange(config.max_position_embeddings)
    cos, sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions[None])
    half = cos.shape[-1] // 2
    our_cos, our_sin = ours.cos_sin_cache.chunk(2, dim=-1)
    assert torch.equal(our_cos, cos[0, :, :half]) and torch.equal(our_sin, sin[0, :, :half])


def test_sharded_checkpoint(tmp_path):
    model_dir = make_tiny_model(tmp_path / "sharded", arch="qwen2", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    seqs = _sequences(lens=[5, 9, 2])
    logits = PagedBatch(_load(model_dir), num_reqs=3).step([(s, 0) for s in seqs])
    _assert_close(logits, _hf_logits(model_dir, seqs))


def test_safetensors_without_index_or_model_safetensors(tmp_path):
    """Shards whose index was not copied, or one file of another name: every *.safetensors file is read, as vLLM
    reads such a directory (it was 'model.safetensors not found')."""
    model_dir = make_tiny_model(tmp_path / "sharded", arch="qwen2", max_shard_size="40KB")
    seqs = _sequences(lens=[5, 9])
    want = _hf_logits(model_dir, seqs)   # transformers needs the index
    (tmp_path / "sharded" / "model.safetensors.index.json").unlink()
    _assert_close(PagedBatch(_load(model_dir), num_reqs=2).step([(s, 0) for s in seqs]), want)
    single = make_tiny_model(tmp_path / "single", arch="qwen2")
    want = _hf_logits(single, seqs)
    os.rename(os.path.join(single, "model.safetensors"), os.path.join(single, "consolidated.safetensors"))
    _assert_close(PagedBatch(_load(single), num_reqs=2).step([(s, 0) for s in seqs]), want)


def test_dummy_weights_right_shapes_finite_and_seeded(tiny_model_dirs):
    model_dir = tiny_model_dirs["qwen3"]
    real, dummy, again = _load(model_dir), _load(model_dir, load_format="dummy"), _load(model_dir, load_format="dummy")
    real_state, dummy_state = real.state_dict(), dummy.state_dict()
    assert {k: v.shape for k, v in real_state.items()} == {k: v.shape for k, v in dummy_state.items()}
    for name, tensor in dummy_state.items():
        torch.testing.assert_close(tensor, again.state_dict()[name], rtol=0, atol=0)
        assert not tensor.requires_grad
    logits = PagedBatch(dummy).step([(s, 0) for s in _sequences()])
    assert all(torch.isfinite(x).all() for x in logits)


def test_bfloat16_load(tiny_model_dirs):
    model = _load(tiny_model_dirs["llama"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32     # the loader restored it


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bfloat16_model_gives_float32_logits(tiny_model_dirs, device):
    """Not bf16-rounded logits: those tie near-equal candidates, and greedy then leaves float32's path."""
    model = _load(tiny_model_dirs["llama"], dtype=torch.bfloat16).to(device)
    hidden = torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16, device=device)
    logits = model.compute_logits(hidden)
    want = hidden.double() @ model.lm_head.weight.double().t()
    assert logits.dtype == torch.float32 and logits.shape == (5, model.config.vocab_size)
    assert (logits.double() - want).abs().max().item() < 1e-4 * want.abs().max().item()
    bf16_rounded = model.lm_head(hidden).double()       # what a bf16 lm_head gives: ~3 significant digits
    assert (bf16_rounded - want).abs().max().item() > 10 * (logits.double() - want).abs().max().item()


def test_tied_lm_head_shares_embedding(tiny_model_dirs):
    tied, untied = _load(tiny_model_dirs["llama_tied"]), _load(tiny_model_dirs["llama"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="supported.*LlamaForCausalLM"):
        get_model_class(["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="supported.*Gemma3ForCausalLM"):   # Gemma 3n: not yet
        get_model_class(["Gemma3nForConditionalGeneration"])


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype(tmp_path):
    """transformers multiplies Gemma's embeddings by sqrt(hidden_size) cast to the weights' dtype (96: 9.798 in
    float32, 9.8125 in bfloat16)."""
    d = make_tiny_model(tmp_path / "gemma", "gemma", hidden_size=96)
    for dtype in (torch.float32, torch.bfloat16):
        model = _load(d, dtype)
        assert model.model.embedding_multiplier == torch.tensor(96 ** 0.5).to(dtype).item()


def test_unsupported_rope_type():
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=512, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*default.*linear.*llama3"):
        get_model_class(["LlamaForCausalLM"])(config)


def test_missing_files(tmp_path, tiny_model_dirs):
    config = AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), config, torch.float32, CPU)
    config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(tmp_path), config, torch.float32, CPU)
    sharded = make_tiny_model(tmp_path / "sharded", max_shard_size="40KB")
    os.remove(os.path.join(sharded, "model-00002-of-" + _num_shards(sharded) + ".safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        _load(sharded)


def _num_shards(model_dir):
    names = json.loads(open(os.path.join(model_dir, "model.safetensors.index.json")).read())["weight_map"].values()
    return sorted(names)[0].split("-of-")[1].split(".")[0]


def test_load_weights_errors(tiny_model_dirs):
    model = _load(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.self_attn.q_proj.bias'"):
        model.load_weights([("model.layers.0.self_attn.q_proj.bias", torch.zeros(64))])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="not found in the checkpoint.*embed_tokens"):
        model.load_weights([])


def test_rope_parameters_phi3_refusals():
    """What transformers and vLLM read differently, or a shape that cannot be, is refused naming the key."""
    from pagedllm.layers.rotary import RotaryEmbedding
    base = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 8,
            "max_position_embeddings": 32, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    RotaryEmbedding(8, 32, base)
    with pytest.raises(ValueError, match="short_mscale"):
        RotaryEmbedding(8, 32, {**base, "short_mscale": 1.2})
    with pytest.raises(ValueError, match="long_factor has 4 values.*2"):
        RotaryEmbedding(8, 32, {**base, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RotaryEmbedding(8, 32, {**base, "partial_rotary_factor": 0.0})


def test_layer_sliding_window_follows_transformers_layer_types():
    """config.sliding_window on the layers transformers slides: all of Mistral's, Qwen2's from max_window_layers on
    (with use_sliding_window), Gemma 2's even ones; none where the window spans max_position_embeddings."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config
    from pagedllm.models.llama import layer_sliding_window
    base = dict(num_hidden_layers=4, max_position_embeddings=512)

    def windows(config):
        return [layer_sliding_window(config, i) for i in range(4)]
    assert windows(MistralConfig(sliding_window=32, **base)) == [32] * 4
    assert windows(MistralConfig(sliding_window=512, **base)) == [None] * 4
    assert windows(MistralConfig(sliding_window=None, **base)) == [None] * 4
    assert windows(Qwen2Config(sliding_window=32, use_sliding_window=True, max_window_layers=2, **base)) == \
        [None, None, 32, 32]
    assert windows(Qwen2Config(sliding_window=32, **base)) == [None] * 4   # use_sliding_window false
    assert windows(Gemma2Config(sliding_window=32, **base)) == [32, None, 32, None]
    assert windows(Gemma2Config(sliding_window=32, layer_types=["full_attention", "sliding_attention"] * 2,
                                **base)) == [None, 32, None, 32]
    assert windows(LlamaConfig(**base)) == [None] * 4


def test_sliding_window_models_plan_no_shared_prefix(tmp_path, tiny_model_dirs):
    """Cascade attention (one shared-prefix plan a step, for every layer) is for full attention: off where a
    layer slides, as vLLM's."""
    from pagedllm.runner.model_runner import _cascade_blocked
    assert _cascade_blocked(_load(make_tiny_model(tmp_path / "mistral", "mistral", sliding_window=32)))
    assert not _cascade_blocked(_load(make_tiny_model(tmp_path / "whole", "mistral", sliding_window=512)))
    assert not _cascade_blocked(_load(tiny_model_dirs["llama"]))


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_use_small_m_leaves_gemma2_off(tiny_model_dirs, name):
    """Gemma 2's and 3's layer has Gemma's (1 + weight) norms and GeGLU, which small_m_linear does not fold: plain
    bf16 linears otherwise, its path stays off (its own forward would skip it anyway)."""
    from pagedllm.models.small_m import SMALL_M_OPS, use_small_m
    model = _load(tiny_model_dirs[name], torch.bfloat16)
    use_small_m(model, SMALL_M_OPS)
    assert all(not layer.small_m for layer in model.model.layers)


def test_gemma2_refuses_what_it_does_not_compute(tmp_path):
    for field, value in (("hidden_activation", "gelu"), ("use_bidirectional_attention", True)):
        d = make_tiny_model(tmp_path / field, "gemma2", **{field: value})
        with pytest.raises(NotImplementedError, match=field):
            _load(d)
