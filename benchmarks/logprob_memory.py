"""Peak RSS and time of the rollout's behaviour log-prob pass on SmolLM2-135M (49k vocabulary):
one float32 log-softmax over the full [N, T, V] logits (cropi before chunking) against
`models.response_logprobs` (vocabulary chunks over real positions). Each variant runs in its own
process; prints one JSON line per variant plus a ratio line.

    python benchmarks/logprob_memory.py [--seqs 64] [--prompt 60] [--response 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def inputs(n: int, prompt: int, response: int):
    import torch

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(response // 2, response + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(10, 40000, (prompt,), generator=g).tolist() for _ in range(n)]
    return prompts, [torch.randint(10, 40000, (k,), generator=g).tolist() for k in lens]


def full_logits(policy, prompts, responses):
    """The pre-chunking computation: model logits for the batch, then float32 log-softmax."""
    import torch

    from cropi import models

    ids, attn, rmask = models.pack(prompts, responses, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = policy.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        lp = torch.gather(logits, -1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    lp = torch.nn.functional.pad(lp, (1, 0))
    return [lp[i][rmask[i]].tolist() for i in range(len(prompts))]


def child(variant: str, n: int, prompt: int, response: int) -> None:
    import torch

    from cropi import models

    torch.set_num_threads(2)
    policy = models.load(models.SMOLLM2)
    prompts, responses = inputs(n, prompt, response)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "full":
        lp = full_logits(policy, prompts, responses)
    else:
        lp = models.response_logprobs(policy, prompts, responses, micro_batch=n)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bench": "logprob_memory", "variant": variant, "seqs": n, "tokens": sum(map(len, responses)),
                      "seconds": round(dt, 2), "peak_rss_mib": peak // 1024, "rss_after_load_mib": base // 1024,
                      "checksum": round(sum(map(sum, lp)), 3)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.seqs, a.prompt, a.response)
    rows = []
    for variant in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--seqs", str(a.seqs), "--prompt",
                              str(a.prompt), "--response", str(a.response)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    full, chunked = rows
    print(json.dumps({"bench": "logprob_memory", "variant": "ratio", "peak_rss_full_over_chunked":
                      round(full["peak_rss_mib"] / chunked["peak_rss_mib"], 2),
                      "time_full_over_chunked": round(full["seconds"] / chunked["seconds"], 2),
                      "same_result": abs(full["checksum"] - chunked["checksum"]) < 1e-2 * max(1, abs(full["checksum"]))}))


if __name__ == "__main__":
    main()
