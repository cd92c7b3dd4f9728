"""ResolvedModel: a module of its own, so that a tensor-parallel worker, which receives one, imports only this
(not engine.py, whose imports (scheduler, tokenizer, chat templates...) a worker never uses)."""
from dataclasses import dataclass

import torch


@dataclass
class ResolvedModel:
    """What the config leaves to the checkpoint and the machine."""
    hf_config: object
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
