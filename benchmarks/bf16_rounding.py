"""Which bf16 rounding points decide the free-running agreement? A float32 re-implementation of the demo
model that rounds to bf16 only where told, greedy over the prompts, scored against plain float32.

    python benchmarks/bf16_rounding.py [--broad]

Weights are bf16-rounded in every variant but "float32". Points: norm (RMSNorm outputs), qkv, rope (q after
rotary), kv (the KV cache), attn (attention output), oproj, res (residual adds), gateup, act (SiLU and the
product), down. "all" is what a bf16 engine rounds; "ceiling" rounds weights only. On the CPU (2026-12-02),
8 test prompts / 512 broad: all 0.918 (pagedllm's bf16 on an H200: 0.918) / 0.890; fp32_residual 0.918 / 0.898;
fp32_residual_oproj_down 1.000 / 0.872; matmul_inputs_and_kv 0.918 / 0.888; all_but_kv 0.930 / 0.905; ceiling
1.000 / 0.933.
"""
import argparse
import json

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from pagedllm.bench.agreement import BROAD_PROMPTS, PROMPTS, free_running
from pagedllm.config import DEMO_MODEL
from pagedllm.layers.rotary import rope_parameters

ALL = {"norm", "qkv", "rope", "kv", "attn", "oproj", "res", "gateup", "act", "down"}
VARIANTS = {"all": ALL, "fp32_residual": ALL - {"res"}, "fp32_residual_oproj_down": ALL - {"res", "oproj", "down"},
            "matmul_inputs_and_kv": {"norm", "attn", "act", "kv"}, "all_but_kv": ALL - {"kv"}, "ceiling": set()}


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


class Model:
    def __init__(self, round_weights: bool, points: set[str]):
        self.cfg = AutoConfig.from_pretrained(DEMO_MODEL)
        weights = load_file(f"{DEMO_MODEL}/model.safetensors")
        self.w = {k: bf16(v) if round_weights else v.float() for k, v in weights.items()}
        self.points = points
        d = self.cfg.head_dim
        inv = 1.0 / (rope_parameters(self.cfg)["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.arange(self.cfg.max_position_embeddings).float()[:, None] * inv[None]
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def r(self, x, point):
        return bf16(x) if point in self.points else x

    def norm(self, x, weight):
        x = self.r(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps), "norm")
        return self.r(weight * x, "norm")

    def logits(self, ids: list[int]) -> torch.Tensor:
        c, w, r = self.cfg, self.w, self.r
        hq, hkv, d, n = c.num_attention_heads, c.num_key_value_heads, c.head_dim, len(ids)
        res = w["model.embed_tokens.weight"][ids]
        cos, sin = self.cos[:n, None], self.sin[:n, None]

        def rotate(z):
            a, b = z.chunk(2, -1)
            return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            x = self.norm(res, w[p + "input_layernorm.weight"])
            q, k, v = (r(x @ w[p + f"self_attn.{m}_proj.weight"].t(), "qkv") for m in "qkv")
            q = r(rotate(q.view(n, hq, d)), "rope")
            k, v = r(rotate(k.view(n, hkv, d)), "kv"), r(v.view(n, hkv, d), "kv")
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            scores = torch.einsum("thd,shd->hts", q, k) * d ** -0.5
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            o = r(torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(n, hq * d), "attn")
            res = r(res + r(o @ w[p + "self_attn.o_proj.weight"].t(), "oproj"), "res")
            x = self.norm(res, w[p + "post_attention_layernorm.weight"])
            g, u = (r(x @ w[p + f"mlp.{m}_proj.weight"].t(), "gateup") for m in ("gate", "up"))
            a = r(r(torch.nn.functional.silu(g), "act") * u, "act")
            res = r(res + r(a @ w[p + "mlp.down_proj.weight"].t(), "down"), "res")
        return self.norm(res, w["model.norm.weight"])[-1] @ w["model.embed_tokens.weight"].t()

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        ids, out = list(ids), []
        for _ in range(n):
            out.append(int(self.logits(ids).argmax()))
            ids.append(out[-1])
        return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broad", action="store_true", help="the 512 broad prompts (about 10 minutes)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompts = [tok(p).input_ids for p in (BROAD_PROMPTS if args.broad else PROMPTS)]
    ref_model = Model(round_weights=False, points=set())
    ref = [ref_model.greedy(p, args.max_tokens) for p in prompts]
    report = {}
    for name, points in VARIANTS.items():
        model = Model(round_weights=True, points=points)
        report[name] = round(free_running(ref, [model.greedy(p, args.max_tokens) for p in prompts]), 4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
