"""Synthetic per-prompt data for the gradient tests (token ids of the tiny char tokenizer), the
plain-autograd reference gradient they are checked against, and the task specs the task and
reward tests cover."""

import numpy as np
import torch

# Specs with short ASCII questions and answers (mean prompt 51-115 characters per spec, answers
# 1-17): what the tiny char-level model can read. complex_arithmetic keeps to + and - because its
# other operators print as non-ASCII symbols. The task and reward tests cover their families.
ASCII_SPECS = (
    *(f"basic_arithmetic:difficulty={d}" for d in (0, 1)),
    *(f"chain_sum:difficulty={d}" for d in (0, 1)),
    *(f"count_bits:difficulty={d}" for d in (0, 1, 2)),
    *(f"spell_backward:difficulty={d}" for d in (1, 2, 3)),
    "simple_equations:difficulty=0",
    "complex_arithmetic:difficulty=0,operations_weights=0.5|0.5|0|0",
)


def prompts(n, G, seed, prompt_len=(3, 9), resp_len=(1, 7), vary_len=True):
    """n prompts of G responses: (prompt ids, response ids ending in EOS, rewards with variance,
    behaviour log-probs per response token). Lengths are drawn from [lo, hi)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = [1] + rng.integers(4, 100, rng.integers(*prompt_len)).tolist()
        resps = [rng.integers(4, 100, rng.integers(*resp_len) if vary_len else 4).tolist() + [2] for _ in range(G)]
        rewards = rng.integers(0, 2, G).astype(float).tolist()
        if len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        blp = [(-rng.uniform(0.5, 5.0, len(r))).tolist() for r in resps]
        out.append((p, resps, rewards, blp))
    return out


def plain_grad(model, names, p, resps, rewards, blp):
    """g_x by hand: A with numpy, each response alone (no padding), plain .backward(); flat [d]."""
    params = dict(model.named_parameters())
    flags = {n: q.requires_grad for n, q in params.items()}
    for n, q in params.items():
        q.requires_grad_(n in names)
        q.grad = None
    r = np.asarray(rewards)
    A = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    J = 0.0
    for i, resp in enumerate(resps):
        ids = torch.tensor([p + resp])
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)[len(p) - 1:]
        J = J + torch.exp(lp - torch.tensor(blp[i])).sum() * A[i] / (len(resps) * len(resp))
    J.backward()
    g = torch.cat([torch.zeros(params[n].numel()) if params[n].grad is None else params[n].grad.flatten().float()
                   for n in names])
    for n, q in params.items():
        q.grad = None
        q.requires_grad_(flags[n])
    return g
