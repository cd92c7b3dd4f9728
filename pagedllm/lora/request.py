"""LoRARequest: which adapter a request runs under (vLLM's fields, in vLLM's order, with vLLM's defaults)."""
import os
import re
from dataclasses import dataclass


class LoRAAdapterNotFoundError(ValueError):
    """vLLM's: no adapter at the request's lora_path (the server's load_lora_adapter answers 404, as vLLM's)."""


@dataclass(frozen=True, eq=False)
class LoRARequest:
    lora_name: str
    lora_int_id: int      # > 0; the engine's key for the adapter (add_lora / remove_lora)
    lora_path: str = ""   # a PEFT adapter directory (adapter_config.json + the weights); required, as vLLM's
    base_model_name: str | None = None            # vLLM's: the served model it adapts (/v1/models' parent)
    tensorizer_config_dict: dict | None = None    # vLLM's tensorizer-serialized adapters: not built, refused
    load_inplace: bool = False   # add_lora reads again an adapter loaded under lora_int_id (vLLM's)
    is_3d_lora_weight: bool = False   # vLLM's MoE weight layout: no MoE model here, so it changes nothing

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"LoRARequest.lora_path must be the adapter's directory (a non-empty string), got "
                             f"{self.lora_path!r}")
        if self.tensorizer_config_dict:
            raise ValueError("LoRARequest.tensorizer_config_dict: adapters serialized with tensorizer are not "
                             "built: give lora_path, a PEFT adapter directory")

    # vLLM's equality and hash: by name (a set or dict of requests holds one per adapter name)
    def __eq__(self, other) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def identity(self) -> tuple[str, str]:
        """What the engine checks a request against the adapter loaded under its id (vLLM's equality alone
        would take another path under the same name for the loaded adapter)."""
        return self.lora_name, self.lora_path

    @property
    def cache_key(self) -> tuple[str, str, str]:
        """The adapter's identity in block hashes where its weights are not read (the engine core uses their
        sha256, lora/peft_loader.py): never its int id alone, which a restart may give another adapter."""
        return ("lora", self.lora_name, self.lora_path)


def adapter_dir(req: LoRARequest) -> str:
    """The directory lora_path names: '~' expanded, as vLLM's. A path that names no directory is
    LoRAAdapterNotFoundError; vLLM would download a Hugging Face Hub id there, which is not done here: said so."""
    path = os.path.expanduser(req.lora_path) if req.lora_path.startswith("~") else req.lora_path
    if not os.path.isdir(path):
        hub = not os.path.isabs(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
        raise LoRAAdapterNotFoundError(
            f"LoRA adapter {req.lora_name!r} ({req.lora_path}): no adapter directory at that path"
            + (" (pagedllm does not download adapters from the Hugging Face Hub: download it first, hf download "
               f"{path} --local-dir DIR, then give DIR)" if hub else ""))
    return path
