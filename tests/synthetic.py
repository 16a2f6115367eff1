"""Synthetic per-prompt data for the gradient tests (token ids of the tiny char tokenizer)."""

import numpy as np


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
