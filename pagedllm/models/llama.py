"""Llama (also Mistral: sliding-window attention, layer_sliding_window), over a flat batch of tokens from many
requests and the paged KV cache.

Parameter names are HF's except two fused projections, stacked along the output dim:
    qkv_proj.weight     = [q_proj; k_proj; v_proj]     rows: Hq*D | Hkv*D | Hkv*D
    gate_up_proj.weight = [gate_proj; up_proj]         rows: I | I
Each fused nn.Linear carries `shard_sizes`; load_weights copies an HF shard into its row range (models/weights.py).
With an Fp8Config every decoder linear is an Fp8Linear (layers/quantization), which takes each shard's
tensors itself (quantizing float ones); the checkpoint's KV scales go to the Attention layers' floats.
Qwen2 (qkv bias) and Qwen3 (per-head q/k norm) are this model with a class flag switched on; mixture-of-experts
models (Qwen3-MoE, Mixtral) with make_mlp giving some layers a SparseMoeBlock (layers/moe.py) for the MLP; Granite
sets its scalar multipliers on the modules (embedding_multiplier, residual_multiplier, attn.scale, logits_scaling:
neutral here); OLMo-2 and Gemma swap in their own decoder layers (LlamaForCausalLM.decoder_layer: models/olmo2.py,
gemma.py).
Tensor parallelism (tp.size > 1, distributed/layers.py): the same modules with this rank's heads and columns,
o_proj / down_proj row-parallel, the embedding and LM head vocab-parallel; the loader hands in slices
(also of FP8 checkpoints' scales); an Fp8Linear is column- or row-parallel the same way.
Decode steps of a few tokens on CUDA may run a layer's linears through the fused small-M kernels (models/small_m.py).
"""
from collections.abc import Iterable

import torch
from torch import nn

from pagedllm.distributed.layers import VocabParallelEmbedding, head_shard, split_size, vocab_rows
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention
from pagedllm.layers.norm import RMSNorm, add_norm
from pagedllm.layers.quantization.fp8_config import Fp8Config
from pagedllm.layers.quantization.fp8_linear import make_linear
from pagedllm.layers.rotary import RotaryEmbedding, rope_parameters
from pagedllm.lazy_kernel import lazy_kernel
from pagedllm.models.small_m import SMALL_M_ROWS, forward_small_m
from pagedllm.models.weights import UNSTACKED, load_weights as load_checkpoint

qk_norm_rope = lazy_kernel(globals(), "pagedllm.layers.kernels.qk_norm_rope", "qk_norm_rope")   # Triton, CUDA only


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config, layer_idx: int) -> int | None:
    """The window layer layer_idx attends within, as transformers: config.sliding_window on the layers
    config.layer_types calls "sliding_attention" (Gemma 2, Qwen2/3), on every layer where there are no layer_types
    (Mistral, Phi-3, Mixtral); None (full attention) otherwise, with use_sliding_window false, or where the window
    spans the whole context (max_model_len is at most max_position_embeddings: sliding changes nothing)."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True) or window >= config.max_position_embeddings:
        return None
    layer_types = getattr(config, "layer_types", None)
    return window if layer_types is None or layer_types[layer_idx] == "sliding_attention" else None


def _linear(in_features: int, shard_sizes: tuple[int, ...], bias: bool, quant: Fp8Config | None, prefix: str,
            name: str, row_parallel: TPGroup | None = None) -> nn.Module:
    """prefix.name: our module; a fused one's shards are the checkpoint's modules prefix.<shard name>."""
    shard_names = tuple(f"{prefix}.{s}" for s in UNSTACKED.get(name, (name,)))
    return make_linear(in_features, shard_sizes, bias, quant, shard_names, row_parallel)


def _row_linear(in_features: int, out_features: int, bias: bool, quant: Fp8Config | None, prefix: str,
                name: str, tp: TPGroup) -> nn.Module:
    """o_proj, down_proj: row-parallel under TP (a RowParallelLinear, or an Fp8Linear with the group)."""
    return _linear(in_features, (out_features,), bias, quant, prefix, name, tp if tp.enabled else None)


class LlamaMLP(nn.Module):
    def __init__(self, config, quant: Fp8Config | None = None, prefix: str = "", tp: TPGroup = TPGroup()):
        super().__init__()
        hidden, bias = config.hidden_size, getattr(config, "mlp_bias", False)
        inter = split_size(config.intermediate_size, tp, "intermediate_size")   # this rank's columns
        self.gate_up_proj = _linear(hidden, (inter, inter), bias, quant, prefix, "gate_up_proj")
        self.down_proj = _row_linear(inter, hidden, bias, quant, prefix, "down_proj", tp)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))     # (T, C) -> (T, 2I) -> (T, I) -> (T, C)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool,
                 quant: Fp8Config | None = None, prefix: str = "", tp: TPGroup = TPGroup()):
        super().__init__()
        heads = head_shard(config.num_attention_heads,
                           getattr(config, "num_key_value_heads", None) or config.num_attention_heads, tp)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads   # this rank's
        self.head_dim = head_dim(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = _linear(config.hidden_size, (self.q_size, self.kv_size, self.kv_size), qkv_bias, quant,
                                prefix, "qkv_proj")
        self.o_proj = _row_linear(self.q_size, config.hidden_size, getattr(config, "attention_bias", False), quant,
                                  prefix, "o_proj", tp)
        self.qk_norm = qk_norm
        if qk_norm:   # Qwen3: RMSNorm over each head's D features, before RoPE
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb   # one table shared by all layers (Gemma 3: by the layers of a type)
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              sliding_window=layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x)))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (T, (Hq + 2*Hkv) * D) -> attention output (T, Hq*D), this step's K/V stored in the cache. On CUDA
        one kernel norms and rotates q / k and stores K/V (qk_norm_rope), or, in decode-only steps, the decode
        kernel itself does (Attention.forward_qkv: one launch a layer less)."""
        if not qkv.is_cuda or self.rotary_emb.partial:   # the kernels rotate whole heads only
            q, k, v = self.rotate_qk_native(positions, qkv)
            return self.attn(q, k, v)
        if self.attn.takes_qkv():
            return self.attn.forward_qkv(qkv, positions, self.rotary_emb.cos_sin_cache, *self._norms(),
                                         unit_offset=self.unit_offset)
        q, k, v = self.rotate_qk(positions, qkv, self.attn.kv_target())
        return self.attn(q, k, v)

    def rotate_qk(self, positions: torch.Tensor, qkv: torch.Tensor, kv_target: dict | None = None):
        """qkv (T, (Hq + 2*Hkv) * D) on CUDA -> q (T, Hq*D), k (T, Hkv*D) normed (qk_norm) and rotated, v (T, Hkv*D)
        (one kernel; rotate_qk_native is the CPU path). kv_target (Attention.kv_target): K and V go into the cache
        instead, k = v = None."""
        return qk_norm_rope(qkv, positions, self.rotary_emb.cos_sin_cache, self.num_heads, self.num_kv_heads,
                            self.head_dim, *self._norms(), unit_offset=self.unit_offset, **(kv_target or {}))

    def _norms(self) -> list:
        """(weight, eps) of q_norm and k_norm for the kernels, or [None, None] without qk_norm."""
        return [(n.weight, n.variance_epsilon) for n in (self.q_norm, self.k_norm)] if self.qk_norm else [None, None]

    @property
    def unit_offset(self) -> bool:
        """The kernels' flag for q_norm / k_norm: Gemma's (1 + weight) norms (Gemma 3) rather than Llama's."""
        return self.qk_norm and self.q_norm.unit_offset

    def rotate_qk_native(self, positions: torch.Tensor, qkv: torch.Tensor):
        """The torch code: the CPU path and the oracle of the fused kernel."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)       # (T, Hq, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)    # (T, Hkv, D)
        if self.qk_norm:
            q, k = self.q_norm.forward_native(q), self.k_norm.forward_native(k)
        q, k = self.rotary_emb(positions, q, k)
        return q.flatten(1), k.flatten(1), v


def dense_mlp(config, layer_idx: int, quant: Fp8Config | None, prefix: str, tp: TPGroup) -> nn.Module:
    """LlamaForCausalLM.make_mlp: every layer's MLP is the dense one."""
    return LlamaMLP(config, quant, prefix, tp)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool, qk_norm: bool,
                 quant: Fp8Config | None = None, tp: TPGroup = TPGroup(), make_mlp=dense_mlp):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, qkv_bias, qk_norm, quant, f"{prefix}.self_attn",
                                        tp)
        self.mlp = make_mlp(config, layer_idx, quant, f"{prefix}.mlp", tp)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.small_m: frozenset[str] = frozenset()   # ops of SMALL_M_OPS through small_m_linear (use_small_m)
        self.residual_multiplier = 1.0   # Granite: each sublayer's output times this before its residual add

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        """The residual stream rides along un-normed: each norm adds the previous sublayer's output to it."""
        if self.small_m and hidden.shape[0] <= SMALL_M_ROWS and hidden.is_cuda:
            return forward_small_m(self, positions, hidden, residual)
        hidden, residual = add_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(self.scaled(hidden), residual)
        return self.scaled(self.mlp(hidden)), residual

    def scaled(self, sublayer_out: torch.Tensor) -> torch.Tensor:
        m = self.residual_multiplier
        return sublayer_out if m == 1.0 else sublayer_out * m

    def fp8_input_producers(self) -> tuple:
        """(op, the FP8 linear it feeds) pairs whose op may quantize its output (quantization/fuse.py)."""
        return ((self.input_layernorm, self.self_attn.qkv_proj), (self.post_attention_layernorm, self.mlp.gate_up_proj),
                (self.mlp.act_fn, self.mlp.down_proj))


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, quant: Fp8Config | None = None,
                 tp: TPGroup = TPGroup(), make_mlp=dense_mlp, layer_cls: type[nn.Module] = LlamaDecoderLayer):
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp) if tp.enabled
                             else nn.Embedding(config.vocab_size, config.hidden_size))
        self.rotary_emb = RotaryEmbedding(head_dim(config), config.max_position_embeddings, rope_parameters(config))
        self.layers = nn.ModuleList(
            layer_cls(config, i, self.rotary_emb, qkv_bias, qk_norm, quant, tp, make_mlp)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.embedding_multiplier = 1.0   # Granite: the embeddings times this (in the model dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None         # (T, C)
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return add_norm(self.norm, hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    qkv_bias: bool | None = None   # None: config.attention_bias
    qk_norm: bool = False
    make_mlp = staticmethod(dense_mlp)   # (config, layer_idx, quant, prefix, tp) -> the layer's MLP
    # (pattern, replacement) applied to each checkpoint name before loading: another family's names to ours
    weight_renames: tuple[tuple[str, str], ...] = ()
    skipped_weights: tuple[str, ...] = ()   # patterns of checkpoint names not read (a vision tower)
    reads_text_config = False   # a vision-language checkpoint's text part: built from its text_config (served_config)
    decoder_layer: type[nn.Module] = LlamaDecoderLayer
    hidden_act = "silu"   # the MLP's activation: config.hidden_act must name it
    tp_refused: str | None = None   # why this architecture cannot run tensor-parallel; None: it can
    hf_fused_modules: tuple[str, ...] = ()   # of qkv_proj / gate_up_proj, those the HF model holds as one (Phi-3)

    def __init__(self, config, quant: Fp8Config | None = None, tp: TPGroup = TPGroup()):
        """quant: the linear layers' FP8 quantization (layers/quantization/fp8_config.py), None: none.
        tp: this rank's tensor-parallel group (size 1: the whole model)."""
        super().__init__()
        _check_supported(config, self.hidden_act)
        if tp.enabled and self.tp_refused:
            raise ValueError(f"tensor_parallel_size > 1: {self.tp_refused}")
        self.config, self.tp = config, tp
        qkv_bias = self.qkv_bias if self.qkv_bias is not None else getattr(config, "attention_bias", False)
        self.model = LlamaModel(config, qkv_bias, self.qk_norm, quant, tp, self.make_mlp, self.decoder_layer)
        lm_rows = vocab_rows(config.vocab_size, tp)[0] if tp.enabled else config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, lm_rows, bias=False)
        if tp.enabled:   # the last rank's padding rows give logits that are cut off; zero, not garbage
            nn.init.zeros_(self.lm_head.weight)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_scaling = 1.0   # Granite: the logits divided by this

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions (T,): a flat batch of many requests' tokens -> hidden states (T, C)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N, vocab) float32 logits, accumulated and stored in float32 whatever the model dtype.

        bf16 logits (8 significant bits) tie or swap near-equal candidates: on 512 prompts of the demo model,
        bf16 greedy kept 82.8% of float32's first 32 tokens with bf16 logits and 89.0% with float32 ones
        (benchmarks/RESULTS.md). It costs one float32 write and read of (N, vocab) a step."""
        logits = self._local_logits(hidden_states)
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        if not self.tp.enabled:
            return logits
        # every rank gets the whole (N, vocab): each samples the same ids from the same logits
        return self.tp.all_gather_last(logits)[:, :self.config.vocab_size]

    def _local_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight
        if weight.dtype == torch.float32:
            return self.lm_head(hidden_states)
        if hidden_states.is_cuda:   # cuBLAS: bf16/fp16 inputs, float32 accumulate and output
            return torch.mm(hidden_states, weight.t(), out_dtype=torch.float32)
        return torch.nn.functional.linear(hidden_states.float(), weight.float())   # CPU has no mm out_dtype

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into our (partly fused) parameters (models/weights.py)."""
        load_checkpoint(self, weights)


def _check_supported(config, hidden_act: str) -> None:
    act = getattr(config, "hidden_act", hidden_act)
    if act != hidden_act:
        raise NotImplementedError(f"hidden_act {act!r} not supported (only {hidden_act!r})")
