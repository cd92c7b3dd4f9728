"""LoRARequest: which adapter a request runs under (vLLM's fields, in vLLM's order)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int      # > 0; the engine's key for the adapter (add_lora / remove_lora)
    lora_path: str        # a PEFT adapter directory: adapter_config.json + adapter_model.safetensors

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")

    @property
    def cache_key(self) -> tuple[str, str, str]:
        """The adapter's identity in block hashes where its weights are not read (the engine core uses their
        sha256, lora/peft_loader.py): never its int id alone, which a restart may give another adapter."""
        return ("lora", self.lora_name, self.lora_path)
