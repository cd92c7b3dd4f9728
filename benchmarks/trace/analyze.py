"""Summarize a trace written by benchmarks/trace/sitecustomize.py: where time to first token goes.

    python benchmarks/trace/analyze.py TRACE_DIR [--since UNIX_TIME]

Prints one JSON object: per-request latency parts (mean / p50 / p99 / max, ms), step times by kind
(decode-only or mixed), and garbage-collection pauses per process.
"""
import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np


def stats(xs):
    if not xs:
        return None
    a = np.asarray(xs) * 1e3
    return {"n": len(a), "mean": round(float(a.mean()), 2), "p50": round(float(np.percentile(a, 50)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("trace_dir")
    parser.add_argument("--since", type=float, default=0.0, help="ignore requests that arrived before this time")
    args = parser.parse_args()
    reqs = defaultdict(dict)
    steps, gcs = [], defaultdict(list)
    for path in glob.glob(os.path.join(args.trace_dir, "*.jsonl")):
        pid = os.path.basename(path).split(".")[0]
        for line in open(path):
            rec = json.loads(line)
            if "req" in rec:
                reqs[rec.pop("req")].update(rec)
            elif "api" in rec:
                r = reqs[rec.pop("api")]
                r["api_arrival"], r["api_first"] = rec["arrival"], rec["first_token"]
            elif "step" in rec:
                steps.append(rec)
            elif "gc" in rec:
                gcs[pid].append(rec)
    keys = ("arrival", "recv", "scheduled", "first_token", "api_first")
    full = [r for r in reqs.values() if all(k in r for k in keys) and r["arrival"] >= args.since]
    parts = {
        "api_to_core": [r["recv"] - r["arrival"] for r in full],
        "core_queue": [r["scheduled"] - r["recv"] for r in full],
        "scheduled_to_first_token": [r["first_token"] - r["scheduled"] for r in full],
        "core_to_api": [r["api_first"] - r["first_token"] for r in full],
        "ttft_api": [r["api_first"] - r["arrival"] for r in full],
    }
    steps = [s for s in steps if s["step"] >= args.since]
    kinds = defaultdict(list)
    for s in steps:
        if s.get("tokens") is None:
            continue
        kinds["decode" if s["tokens"] == s["rows"] else "mixed"].append(s)
    step_report = {}
    for kind, ss in kinds.items():
        step_report[kind] = {k: stats([s.get(k, 0) / 1e3 for s in ss])
                             for k in ("dur_ms", "launch", "wait", "schedule", "update")}
        step_report[kind]["tokens_mean"] = round(float(np.mean([s["tokens"] for s in ss])), 1)
    # the slowest requests: their parts
    slow = sorted(full, key=lambda r: r["api_first"] - r["arrival"])[-5:]
    report = {"requests": len(full), "ttft_parts_ms": {k: stats(v) for k, v in parts.items()},
              "steps": step_report,
              "slowest": [{"ttft": round((r["api_first"] - r["arrival"]) * 1e3, 1),
                           "api_to_core": round((r["recv"] - r["arrival"]) * 1e3, 1),
                           "queue": round((r["scheduled"] - r["recv"]) * 1e3, 1),
                           "compute": round((r["first_token"] - r["scheduled"]) * 1e3, 1),
                           "core_to_api": round((r["api_first"] - r["first_token"]) * 1e3, 1),
                           "prompt": r.get("prompt")} for r in slow],
              "gc": {pid: {"count": len(g), "ms_total": round(sum(x["ms"] for x in g), 1),
                           "ms_max": max(x["ms"] for x in g), "gen2": sum(x["gc"] == 2 for x in g)}
                     for pid, g in gcs.items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
