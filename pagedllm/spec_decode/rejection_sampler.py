# TEMPORARY stand-in (greedy only) until the helper's module lands
from dataclasses import dataclass
import torch


@dataclass
class RejectionOutput:
    output_token_ids: torch.Tensor
    num_emitted: torch.Tensor


def rejection_sample(logits, num_draft, draft_token_ids, meta, generator, synthetic_rates=None):
    R, m = len(num_draft), max(num_draft)
    out = torch.full((R, m + 1), -1, dtype=torch.int64, device=logits.device)
    argmax = logits.argmax(-1).tolist()
    drafts = draft_token_ids.tolist()
    counts = []
    p = d = 0
    for i, s in enumerate(num_draft):
        j = 0
        while j < s and drafts[d + j] == argmax[p + j]:
            out[i, j] = drafts[d + j]
            j += 1
        out[i, j] = argmax[p + j]
        counts.append(j + 1)
        p += s + 1
        d += s
    return RejectionOutput(out, torch.tensor(counts))
