"""The PagedAttention paper's baseline: Hugging Face transformers `generate` in static batches.

The model has random weights in the checkpoint's shape (AutoModelForCausalLM.from_config), in the chosen
dtype on the chosen device. Requests go in batches of `batch_size` in workload order, left-padded; each
batch samples (temperature 1.0, top_p 1.0, top_k off) max(its output lens) new tokens with EOS disabled,
so every row runs to the end. Only each request's own requested output tokens count as output: the rest
of a batch's tokens are work a static batch wastes.
"""
import time

import torch
from transformers import AutoModelForCausalLM

PAD_TOKEN_ID = 0   # masked out by the attention mask; any id works


def load_random_model(hf_config, dtype: torch.dtype, device: torch.device):
    with torch.device(device):   # weights are created on the device, not copied there
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = None      # as ignore_eos: no row stops before max_new_tokens
    gen.pad_token_id = PAD_TOKEN_ID
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 1.0, 1.0, 0
    return model


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    """New token ids, (B, max_new_tokens), of one left-padded static batch."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                         max_new_tokens=max_new_tokens)
    return out[:, width:]


def run_static_batches(model, prompts: list[list[int]], output_lens: list[int], batch_size: int) -> float:
    """Seconds to generate every batch; checks each batch ran to its longest requested output."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch_out_lens = output_lens[i:i + batch_size]
        new_ids = generate_batch(model, prompts[i:i + batch_size], max(batch_out_lens))
        if new_ids.shape[1] != max(batch_out_lens):
            raise RuntimeError(f"transformers generated {new_ids.shape[1]} tokens, asked for {max(batch_out_lens)}")
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start
