"""Model registry: HF architecture name -> our class."""
import copy

from pagedllm.distributed.layers import head_shard
from pagedllm.distributed.parallel_state import TPGroup
from pagedllm.models.gemma import GemmaForCausalLM
from pagedllm.models.gemma2 import Gemma2ForCausalLM
from pagedllm.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedllm.models.granite import GraniteForCausalLM
from pagedllm.models.llama import LlamaForCausalLM, head_dim
from pagedllm.models.mixtral import MixtralForCausalLM
from pagedllm.models.moe_common import MoeForCausalLM, moe_refusal
from pagedllm.models.olmo2 import Olmo2ForCausalLM
from pagedllm.models.phi3 import Phi3ForCausalLM
from pagedllm.models.qwen2 import Qwen2ForCausalLM
from pagedllm.models.qwen3 import Qwen3ForCausalLM
from pagedllm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY = {
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,   # sliding windows on alternate layers, soft-capped scores and logits
    "Gemma3ForCausalLM": Gemma3ForCausalLM,   # Gemma 2 with per-head q/k norms and a RoPE per layer type
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,   # its text part; images refused at the API
    "GraniteForCausalLM": GraniteForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,   # same graph, its layers attending within config.sliding_window
    "Phi3ForCausalLM": Phi3ForCausalLM,       # fused checkpoint tensors (loader), longrope (layers/rotary.py)
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def get_model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported model architectures {architectures}; supported: {sorted(MODEL_REGISTRY)}")


def served_config(hf_config):
    """The config a model is built and sized from: the checkpoint's, or, for a vision-language checkpoint served
    text-only (reads_text_config: Gemma 3 4B and up), its text_config with the checkpoint's architectures (which
    pick the class that reads its tensor names), and the dtype, quantization_config and tie_word_embeddings kept
    at its top."""
    model_cls = next((MODEL_REGISTRY[a] for a in hf_config.architectures or [] if a in MODEL_REGISTRY), None)
    if model_cls is None or not model_cls.reads_text_config:   # unknown ones are refused where they are built
        return hf_config
    text = copy.deepcopy(hf_config.get_text_config())
    text.architectures = list(hf_config.architectures)
    for key in ("dtype", "quantization_config"):
        if getattr(text, key, None) is None and getattr(hf_config, key, None) is not None:
            setattr(text, key, getattr(hf_config, key))
    text.tie_word_embeddings = hf_config.tie_word_embeddings   # transformers ties the head by the top's
    return text


def feature_refusal(hf_config, quantization: str | None, enable_lora: bool) -> str | None:
    """Why the model cannot run with these engine features (naming the field), else None: checked before any
    worker starts or weight is read."""
    model_cls = get_model_class(hf_config.architectures)
    if issubclass(model_cls, MoeForCausalLM):
        return moe_refusal(model_cls.__name__, quantization, enable_lora)
    return None


def model_dims(hf_config, tp: TPGroup = TPGroup()) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): what the KV cache needs to know of a model (tp: of this rank's
    part, whose KV heads are its share, or the one replicated KV head when there are fewer than ranks)."""
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    if tp.enabled:
        num_kv_heads = head_shard(hf_config.num_attention_heads, num_kv_heads, tp).num_kv_heads
    return hf_config.num_hidden_layers, num_kv_heads, head_dim(hf_config)

