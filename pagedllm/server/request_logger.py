"""--enable-log-requests (vLLM's): a log line for each request the server takes, once tokenized, before the
engine has it. As vLLM's: the id, sampling params and LoRA at INFO; the prompt (its text and token ids, each
cut to --max-log-len) at DEBUG only, so that prompts reach the log only where debug logging is asked for."""
import logging
from dataclasses import dataclass

logger = logging.getLogger("pagedllm")


@dataclass
class RequestLogger:
    tokenizer: object           # None: skip_tokenizer_init (no text shown)
    max_log_len: int | None     # most characters of prompt text and most token ids shown; None: all

    def log(self, request_id: str, prompt_ids: list[int], params, lora_request=None):
        logger.info("Received request %s: params: %s, lora_request: %s.", request_id, params, lora_request)
        if not logger.isEnabledFor(logging.DEBUG):
            return
        ids = prompt_ids[:self.max_log_len]   # no more tokens than characters shown: the decode stays bounded
        text = self.tokenizer.decode(ids)[:self.max_log_len] if self.tokenizer is not None else None
        logger.debug("Request %s details: prompt: %r, prompt_token_ids: %s.", request_id, text, ids)
