"""A request as the scheduler sees it: known tokens, computed tokens, and its status."""
import enum
import time

from pagedllm.core.block_hash import BlockHash, hash_full_blocks
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()   # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()    # max_tokens or max_model_len reached
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()     # its data raised inside the engine core, or its step failed
    FINISHED_REPETITION = enum.auto()   # its output ends repeating a pattern (repetition_detection)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def finish_reason(self) -> str | None:
        return self._finish_reason


# Plain attributes of each member: read for every row of every step (a dict built per call cost ~8 us a row).
_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error",
            RequestStatus.FINISHED_REPETITION: "repetition"}
for _status in RequestStatus:
    _status._finish_reason, _status._finished = _REASONS.get(_status), _status in _REASONS


class Request:
    """Progress is one counter: num_computed_tokens catches up with num_tokens (prompt + outputs) plus the
    tokens still being sampled (num_output_placeholders)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 max_tokens: int, block_size: int, arrival_time: float | None = None,
                 cache_salt: str | None = None, lora_request=None, lora_key: tuple | None = None,
                 kv_parent: str | None = None, hold_kv: bool = False, lora_loading: bool = False,
                 priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.priority = priority         # scheduling_policy priority: lower first, then arrival
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0     # counted when a step is scheduled, before it has run
        self.num_output_placeholders = 0  # tokens being sampled by scheduled steps, not yet appended
        self.num_cached_tokens = -1      # prefix-cache hit at first scheduling; -1 = not scheduled yet
        self.num_loaded_tokens = 0       # of those, the ones loaded from a KV tier below the GPU
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.error: str | None = None    # FINISHED_ERROR inside a step: why
        self.bad_request = False         # ... and the request's own fields caused it (a 400, not a 500)
        self.cache_salt = cache_salt     # in the first block's extra keys: only equal salts share blocks
        self.lora_request = lora_request   # LoRARequest or None (the base model)
        self.lora_int_id = lora_request.lora_int_id if lora_request is not None else 0
        # the adapter's identity in the block hash (the engine core's: its weights' sha256)
        self.lora_key = lora_key or (lora_request.cache_key if lora_request is not None else None)
        # its adapter is being read (lora/loader.py): not scheduled, and no block hash before its identity is known
        self.lora_loading = lora_loading
        self.lora_waits_since: float | None = None   # when it first waited for a LoRA slot (Scheduler._lora_waits)
        self.block_hashes: list[BlockHash] = []
        self.kv_parent = kv_parent   # a held request whose KV this one extends (core/kv_fork.py)
        self.hold_kv = hold_kv       # keep the blocks when finished, for children to fork
        self.grammar = None    # structured output: its RequestGrammar (structured_output/manager.py)
        self._update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    def append_output_token_id(self, token_id: int):
        self.all_token_ids.append(token_id)
        self._update_block_hashes()

    def lora_loaded(self, lora_key: tuple):
        """Its adapter is on the host: its identity completes the first block's hash; it may be scheduled."""
        self.lora_key, self.lora_loading = lora_key, False
        self._update_block_hashes()

    def _update_block_hashes(self):
        """Hash every newly full block; the chain makes each hash name the whole prefix before it."""
        bs, done = self.block_size, len(self.block_hashes)
        if (done + 1) * bs > self.num_tokens or self.lora_loading:
            return    # a decode step that fills no block: most calls
        parent = self.block_hashes[-1] if done else None
        extra = None
        if done == 0 and (self.cache_salt is not None or self.lora_key is not None):
            # the adapter too: its KV differs from the base's and from any other adapter's
            extra = tuple(k for k in (self.cache_salt, self.lora_key) if k is not None)
        self.block_hashes += hash_full_blocks(parent, self.all_token_ids[done * bs:], bs, extra)
