"""vLLM's pause and sleep level 0: the scheduler stops admitting (or scheduling) requests while new ones still
queue; resuming runs them. The arguments' checks, shared by LLM, AsyncLLM and the server's routes.

Modes (how the requests in the engine are treated; vLLM's PauseMode):
  abort  every request ends now (finish_reason "abort"); new ones queue
  wait   the running requests run to their end (the call returns then); waiting and new ones queue
  keep   nothing is scheduled; every request stays where it is and goes on when resumed
Sleep level 0 is a pause that keeps the prefix cache; pause_generation's clear_cache empties it once the engine
is idle. Levels 1 and 2 (weights offloaded or discarded, KV cache freed) are not built."""

PAUSE_MODES = ("abort", "wait", "keep")
WAKE_UP_TAGS = ("weights", "kv_cache", "scheduling")   # vLLM's; with no level 1 or 2 sleep, each only resumes


def check_mode(mode) -> str:
    if mode not in PAUSE_MODES:
        raise ValueError(f"mode {mode!r} is not a pause mode: one of {', '.join(PAUSE_MODES)}")
    return mode


def check_sleep_level(level) -> int:
    """Level 0 (pause scheduling) is built; 1 and 2 are refused naming the level; anything else is a ValueError."""
    if isinstance(level, bool) or not isinstance(level, int) or level not in (0, 1, 2):
        raise ValueError(f"sleep level must be 0, 1 or 2, got {level!r}")
    if level:
        what = "offloading the weights to the CPU" if level == 1 else "discarding the weights"
        raise NotImplementedError(f"sleep(level={level}), vLLM's sleep mode ({what} and freeing the KV cache), is "
                                  f"not built: the weights and the KV cache stay on the device; level 0 (pause "
                                  f"scheduling, wake_up() resumes it) is built")
    return level


def check_wake_up_tags(tags) -> None:
    """None (all) or a list of vLLM's tags; with only level 0 built, any of them resumes scheduling."""
    if tags is None:
        return
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise TypeError(f"tags must be a list of strings or None, got {type(tags).__name__}")
    bad = [t for t in tags if t not in WAKE_UP_TAGS]
    if bad:
        raise ValueError(f"wake_up tags {bad!r} are not vLLM's: each is one of {', '.join(WAKE_UP_TAGS)}")
