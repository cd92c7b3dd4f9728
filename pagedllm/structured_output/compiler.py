"""Grammar compilation off the step loop: a pool of worker threads, a cache keyed by the constraint's text.

Compiling a JSON schema against a 150k-token vocabulary takes 0.01 s to minutes (vLLM #54003: a nested oneOf).
xgrammar releases the GIL while it compiles, so worker threads of the engine core compile while its step loop
runs on; a request waits for its grammar in the waiting queue (the scheduler skips it) and the batch goes on.
A compile that raises, or is not done `timeout` seconds after it started, fails the requests that
wait for it (a client error: the constraint is the request's own); a timed-out compile keeps its worker busy
until xgrammar returns (a thread cannot be stopped), but its result is cached like any other.
"""
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from pagedllm.daemon_threads import DaemonThreads
from pagedllm.structured_output.params import StructuredOutputsParams

logger = logging.getLogger("pagedllm")


class GrammarError(ValueError):
    """A constraint that cannot be compiled (or not within the time limit): the request's fault."""


class GrammarCompilePool:
    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int,
                 stop_token_ids: Callable[[object], set[int]], max_workers: int = 4, timeout: float = 30.0,
                 max_cached: int = 1024):
        """load_tokenizer: called once, on a worker, when the first constraint arrives (a 150k vocabulary's
        tokenizer info takes ~1.5 s to build: engines that never see a constraint never pay it).
        stop_token_ids(tokenizer): the ids that end generation (the model's EOS set): a matcher accepts them
        only where its grammar is complete."""
        self.timeout = timeout
        self._load_tokenizer = load_tokenizer
        self._stop_token_ids = stop_token_ids
        self._vocab_size = vocab_size
        self._workers = DaemonThreads("grammar", max_workers)
        self._lock = threading.Lock()
        self._compiler = None
        self.stop_ids: list[int] = []
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._max_cached = max_cached

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the CompiledGrammar (or of a GrammarError); equal constraints share one compile."""
        key = params.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = Future()
            self._workers.submit(self._compile, params, future, future=future)
            self._cache[key] = future
            if len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return future

    def warm_up(self):
        """Builds the compiler (xgrammar's import, the tokenizer's info: ~2 s for a 150k vocabulary) on a worker
        now, so the first constrained request of a server waits only for its own compile (a failure here is
        met again, and reported, by that request's compile)."""
        self._workers.submit(self._get_compiler)

    def _compile(self, params: StructuredOutputsParams, future: Future):
        compiler = self._get_compiler()
        start = time.perf_counter()
        future.started = time.monotonic()   # the time limit counts from here (manager.compile_deadline)
        try:
            compiled = compile_constraint(compiler, params)
        except Exception as e:   # xgrammar raises RuntimeError / ValueError / its own types on bad input
            raise GrammarError(f"structured_outputs.{params.kind} could not be compiled: {_short(e)}") from e
        seconds = time.perf_counter() - start
        if seconds > 1.0:
            logger.info("compiled a %s constraint in %.1f s", params.kind, seconds)
        return compiled

    def _get_compiler(self):
        with self._lock:   # the first compile builds it; the others wait for it
            if self._compiler is None:
                import xgrammar as xgr
                tokenizer = self._load_tokenizer()
                if tokenizer is None:
                    raise GrammarError("structured_outputs need a tokenizer (skip_tokenizer_init is set)")
                self.stop_ids = sorted(self._stop_token_ids(tokenizer))
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self.stop_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler


def compile_constraint(compiler, params: StructuredOutputsParams):
    """The CompiledGrammar of one constraint (any_whitespace and additionalProperties as the params ask)."""
    from pagedllm.structured_output.grammar_spec import build_grammar
    return compiler.compile_grammar(build_grammar(params))


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
