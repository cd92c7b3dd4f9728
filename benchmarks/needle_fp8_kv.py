"""Long-context retrieval with an fp8 KV cache (issue 18): a needle ("The secret passcode is NNNNN.") planted at
each --depths fraction of a ~--tokens-token haystack of natural English, the question after it, greedy 8 tokens
through the model's chat template; per --kv-cache-dtype, whether the passcode came back, per depth.

    python benchmarks/needle_fp8_kv.py --model /work/models/qwen2.5-coder-0.5b-instruct --tokens 30000

The haystack is built offline and deterministically (for one Python version) from the standard library's
docstrings, module after module in a fixed order, paragraphs deduplicated. One engine per KV dtype; all depths
run as one batch. CPU-capable (dtype auto = float32 there): 3 depths of a 2,000-token haystack took ~2 min an
engine on one core (all 3 retrieved with auto and fp8); 30k tokens take far longer.
"""
import argparse
import gc
import importlib
import inspect
import random
import time

from pagedllm import LLM, SamplingParams

MODULES = ("collections", "itertools", "functools", "json", "re", "pathlib", "argparse", "logging", "subprocess",
           "typing", "datetime", "random", "textwrap", "string", "statistics", "decimal", "fractions", "heapq",
           "bisect", "csv", "difflib", "email.message", "http.client", "urllib.parse", "threading", "queue",
           "socket", "shutil", "tempfile", "unittest", "inspect", "dataclasses", "enum", "contextlib", "asyncio",
           "os", "sys", "io", "pickle", "sqlite3", "zipfile", "tarfile", "calendar", "locale", "gettext")
QUESTION = "What is the secret passcode mentioned in the text above? Answer with the number only."


def paragraphs() -> list[str]:
    """Docstring paragraphs of MODULES and their public members, in order, each once."""
    seen, out = set(), []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            for para in (doc or "").split("\n\n"):
                para = " ".join(para.split())
                if len(para) > 80 and para not in seen and ">>>" not in para:
                    seen.add(para)
                    out.append(para)
    return out


def haystack(tokenizer, num_tokens: int) -> list[str]:
    """Paragraphs, in order, until they hold about num_tokens tokens."""
    chosen, total = [], 0
    for para in paragraphs():
        if total >= num_tokens:
            break
        chosen.append(para)
        total += len(tokenizer.encode(para, add_special_tokens=False)) + 1
    if total < num_tokens:
        raise ValueError(f"the offline text holds only {total} tokens; ask for fewer")
    return chosen


def prompt_with_needle(paras: list[str], depth: float, passcode: str) -> str:
    """The needle as a paragraph of its own at the paragraph boundary nearest depth (by characters)."""
    lengths = [len(p) + 2 for p in paras]
    target, acc, at = depth * sum(lengths), 0, len(paras)
    for i, n in enumerate(lengths):
        if acc >= target:
            at = i
            break
        acc += n
    body = paras[:at] + [f"The secret passcode is {passcode}."] + paras[at:]
    return "\n\n".join(body) + "\n\n" + QUESTION


def run(args, kv_cache_dtype: str, prompts: list[str], passcodes: list[str]) -> list[tuple[bool, str]]:
    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype, max_model_len=args.max_model_len,
              max_num_seqs=len(prompts), max_num_batched_tokens=args.max_num_batched_tokens, log_stats_interval=0)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    del llm
    gc.collect()
    return [(code in text, text) for code, text in zip(passcodes, texts)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a chat model's directory (it has a chat template)")
    parser.add_argument("--tokens", type=int, default=30000, help="haystack length in tokens (about)")
    parser.add_argument("--depths", default="0.25,0.5,0.75", help="needle positions, fractions of the haystack")
    parser.add_argument("--kv-cache-dtype", default="auto,fp8", help="comma-separated KV cache dtypes to compare")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds the passcodes")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="prefill chunk: the CPU path's attention scores of a chunk against 30k keys take "
                             "~1.7 MB per query token (Qwen2.5-0.5B), so 8192 would take ~14 GB")
    args = parser.parse_args()
    depths = [float(d) for d in args.depths.split(",")]
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    paras = haystack(tokenizer, args.tokens)
    rng = random.Random(args.seed)
    passcodes = [str(rng.randrange(10000, 100000)) for _ in depths]
    prompts = [prompt_with_needle(paras, d, code) for d, code in zip(depths, passcodes)]
    args.max_model_len = max(len(tokenizer.encode(p)) for p in prompts) + 128   # + template and answer
    print(f"haystack: {len(paras)} paragraphs, prompts of up to {args.max_model_len - 128} tokens")
    for kv_dtype in args.kv_cache_dtype.split(","):
        start = time.perf_counter()
        results = run(args, kv_dtype, prompts, passcodes)
        found = sum(ok for ok, _ in results)
        print(f"kv_cache_dtype={kv_dtype}: {found}/{len(depths)} retrieved ({time.perf_counter() - start:.1f} s)")
        for depth, code, (ok, text) in zip(depths, passcodes, results):
            print(f"  depth {depth:.2f}: {'retrieved' if ok else 'MISSED'}  passcode {code}, answer {text!r}")


if __name__ == "__main__":
    main()
