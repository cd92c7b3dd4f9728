"""Speculative decoding on CPU with a real model pair (issue 16): batch 1, greedy, 20 coding prompts.

    OMP_NUM_THREADS=2 python benchmarks/spec_decode_cpu.py [--configs off,ngram,draft_model] [--max-tokens 64]
        [--limit N] [--target DIR] [--draft DIR] [--json PATH] [--reference PATH]

Per config: one engine (float32, no prefix caching, so each config starts cold in the same way), the prompts one at a
time, each timed. Prints output tokens, wall seconds, ms per output token, speed-up against "off", mean acceptance
length (1 + accepted / drafts), all and per kind (write / edit), and any prompt whose greedy tokens differ from "off".
--json keeps every prompt's result; --reference takes "off" from such a file (configs run in separate processes);
--combine reports several such files with each prompt's fastest time (a shared machine's noise only adds time).
"""
import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spec_decode_prompts import PROMPTS

# This checkout's pagedllm, not whatever an editable install points at (benchmarks/ is sys.path[0] here).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from pagedllm import LLM, SamplingParams
from pagedllm.chat_template import render_chat

TARGET = "/work/models/qwen2.5-coder-1.5b-instruct"
DRAFT = "/work/models/qwen2.5-coder-0.5b-instruct"
K = 4


def spec_config(name: str, draft: str) -> dict | None:
    if name == "off":
        return None
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if name == "draft_model":
        return {"method": "draft_model", "model": draft, "num_speculative_tokens": K}
    raise ValueError(f"unknown config {name!r}: off, ngram or draft_model")


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    """(drafts, draft tokens, accepted tokens) so far: the one place that knows where the engine keeps them."""
    spec = getattr(llm.engine.get_stats(), "spec_decode", None)
    if spec is None:
        return (0, 0, 0)
    return (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens)


@dataclass
class PromptResult:
    kind: str
    token_ids: list[int]
    seconds: float
    steps: int                          # Engine.step calls: ~ prefill + one per verify / decode step
    spec: tuple[int, int, int]          # this prompt's (drafts, draft tokens, accepted tokens)


@dataclass
class ConfigRun:
    name: str
    load_seconds: float
    results: list[PromptResult] = field(default_factory=list)


def build_llm(target: str, cfg: dict | None) -> LLM:
    extra = {} if cfg is None else {"speculative_config": cfg}
    return LLM(model=target, dtype="float32", enable_prefix_caching=False, generation_config="vllm",
               max_model_len=2048, max_num_seqs=1, log_stats_interval=0, **extra)


def count_steps(llm: LLM) -> list[int]:
    """Wraps the engine's step to count calls (LLM.generate calls engine.step): a cross-check of the acceptance
    length that does not depend on the engine's own counters."""
    counter = [0]
    step = llm.engine.step

    def counted():
        counter[0] += 1
        return step()
    llm.engine.step = counted
    return counter


def render(llm: LLM, messages: list[dict]) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(render_chat(tok, messages), add_special_tokens=False)


def run_config(name: str, args, prompts: list[dict]) -> ConfigRun:
    start = time.perf_counter()
    llm = build_llm(args.target, spec_config(name, args.draft))
    run = ConfigRun(name, time.perf_counter() - start)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    steps = count_steps(llm)
    llm.generate([render(llm, [{"role": "user", "content": "Say hi."}])],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)   # warm-up, not timed
    for i, p in enumerate(prompts):
        ids = render(llm, p["messages"])
        before, steps[0] = spec_counts(llm), 0
        t0 = time.perf_counter()
        out = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
        seconds = time.perf_counter() - t0
        spec = tuple(a - b for a, b in zip(spec_counts(llm), before))
        run.results.append(PromptResult(p["kind"], list(out.token_ids), seconds, steps[0], spec))
        print(f"  {name} #{i} {p['kind']}: {len(ids)} prompt, {len(out.token_ids)} out, {seconds:.2f} s, "
              f"{steps[0]} steps, spec {spec}", file=sys.stderr, flush=True)
    del llm
    return run


def summarize(rs: list[PromptResult], off: list[PromptResult] | None) -> dict:
    num_out = sum(len(r.token_ids) for r in rs)
    seconds = sum(r.seconds for r in rs)
    drafts, _, accepted = (sum(r.spec[j] for r in rs) for j in range(3))
    line = {"out_tokens": num_out, "seconds": round(seconds, 2),
            "ms_per_token": round(1000 * seconds / num_out, 1) if num_out else None,
            "out_tok_per_step": round(num_out / sum(r.steps for r in rs), 2),
            "mean_accept_len": round(1 + accepted / drafts, 3) if drafts else None,
            "drafts": drafts, "draft_tokens": sum(r.spec[1] for r in rs), "accepted": accepted}
    if off is not None:
        off_ms = 1000 * sum(r.seconds for r in off) / sum(len(r.token_ids) for r in off)
        line["speedup"] = round(off_ms / line["ms_per_token"], 3)
    return line


def report(run: ConfigRun, off: ConfigRun | None) -> dict:
    """One JSON line per config: all prompts, then per kind; mismatching prompts against "off" listed."""
    out = {"config": run.name, "load_s": round(run.load_seconds, 1)}
    out["all"] = summarize(run.results, off.results if off else None)
    for kind in ("write", "edit"):
        idx = [i for i, r in enumerate(run.results) if r.kind == kind]
        if idx:
            out[kind] = summarize([run.results[i] for i in idx], [off.results[i] for i in idx] if off else None)
    if off is not None and run is not off:
        out["mismatches"] = [i for i, (a, b) in enumerate(zip(run.results, off.results)) if a.token_ids != b.token_ids]
        for i in out["mismatches"]:
            a, b = run.results[i].token_ids, off.results[i].token_ids
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"MISMATCH {run.name} prompt #{i}: first difference at output token {first}", flush=True)
    print(json.dumps(out), flush=True)
    return out


def load_runs(path: str, idx: list[int]) -> dict[str, ConfigRun]:
    """The runs of a --json file, at the prompts `idx` (indices into PROMPTS when the file has them all)."""
    with open(path) as f:
        runs = json.load(f)["runs"]
    pick = (lambda rs: [rs[i] for i in idx]) if len(runs[next(iter(runs))]["results"]) == len(PROMPTS) \
        else (lambda rs: rs[:len(idx)])
    return {name: ConfigRun(name, d["load_seconds"], [PromptResult(**{**r, "spec": tuple(r["spec"])})
                                                      for r in pick(d["results"])])
            for name, d in runs.items()}


def combine(paths: list[str], idx: list[int]) -> dict[str, ConfigRun]:
    """Each prompt's fastest time over several --json runs (the others' load on a shared machine only adds
    time); its tokens and counters must be the same in all."""
    files = [load_runs(p, idx) for p in paths]
    runs = {}
    for name in (n for n in files[0] if all(n in f for f in files)):
        parts = [f[name] for f in files]
        results = []
        for rs in zip(*(r.results for r in parts)):
            assert all(r.token_ids == rs[0].token_ids and r.spec == rs[0].spec for r in rs), name
            results.append(min(rs, key=lambda r: r.seconds))
        runs[name] = ConfigRun(name, min(r.load_seconds for r in parts), results)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="off,ngram,draft_model")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=len(PROMPTS), help="the first N prompts")
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--draft", default=DRAFT)
    parser.add_argument("--json", help="also write every config's lines and per-prompt results here")
    parser.add_argument("--reference", help="a --json file of an earlier run to take the \"off\" config from")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="run nothing: report these --json runs' "
                        "configs with each prompt's fastest time")
    parser.add_argument("--kinds", default="write,edit", help="only the prompts of these kinds")
    args = parser.parse_args()
    idx = [i for i, p in enumerate(PROMPTS[:args.limit]) if p["kind"] in args.kinds.split(",")]
    prompts = [PROMPTS[i] for i in idx]
    if args.combine:
        runs = combine(args.combine, idx)
        for run in ([runs["off"]] if "off" in runs else []) + [r for n, r in runs.items() if n != "off"]:
            report(run, runs.get("off"))
        return
    runs, lines = {}, []
    if args.reference and "off" not in args.configs.split(","):
        runs["off"] = load_runs(args.reference, idx)["off"]
    for name in args.configs.split(","):   # one engine at a time: its memory goes before the next loads
        runs[name] = run_config(name, args, prompts)
        gc.collect()   # the step counter's closure makes a cycle through the engine
        lines.append(report(runs[name], runs.get("off")))
        if args.json:   # after each config: a run cut short keeps what it finished
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "lines": lines, "runs": {n: asdict(r) for n, r in runs.items()}}, f)


if __name__ == "__main__":
    main()
