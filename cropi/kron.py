"""The `kron` projector: per-prompt projected gradients of every weight matrix used by nn.Linear /
nn.Embedding modules, from one batched backward (LoGra-style; beyond the paper; docs/design.md).

Every covered weight W [rows, cols] has a per-prompt gradient that is a sum of outer products over
the tokens t of the prompt's G sequences (prompt tokens too: they feed later tokens):

    nn.Linear     y = W a + b:  G_x = Σ_t δ_t a_tᵀ          δ_t = ∂J_x/∂y_t [rows = out], a_t [cols = in]
    nn.Embedding  y = W[i]:     G_x = Σ_t e_{i_t} δ_tᵀ      e = one-hot token [rows = vocab], δ_t [cols]

(a weight tied between an embedding and an lm_head gets both sums). With two seeded maps
P_r [k_r, rows], P_c [k_c, cols] (hash-seeded ``dense`` projectors of :mod:`cropi.projection`,
scaled so E[PᵀP] = I) the weight's feature is

    vec(P_r G_x P_cᵀ) = vec(Σ_t (P_r left_t)(P_c right_t)ᵀ)       [k_r · k_c], row-major

computed from projected per-token vectors (P_r e_i is column i of P_r), so G_x is never formed.
P_r and P_c are independent, so E[<feature_x, feature_y>] = <G_x, G_y>: kron estimates the same
inner products as the other projectors, restricted to the parameters it covers. A Linear bias b
gets the block P_r Σ_t δ_t [k_r]; tokens equal to an embedding's padding_idx add nothing (their
row gets no gradient).

Coverage: every selected weight whose users are all nn.Linear / nn.Embedding modules (plain
embeddings: no max_norm, no scale_grad_by_freq), plus the selected biases of those Linear layers.
Norm scales and anything else are not covered (use sjlt for those). ``cropi score --projector kron``
scores (and --check-rank compares against) exactly the covered parameters, listed in the meta.

Dimensions: the requested k is split evenly over the L covered weights, b = k // L each, with
k_c = min(cols, ⌊√b⌋) and k_r = min(rows, b // k_c) (then k_c = min(cols, b // k_r) when k_r hit
rows). A side whose budget reaches its dimension is not projected at all (exact). The feature
dimension is Σ k_r·k_c (+ k_r per covered bias) ≤ k; ``KronProjector.k`` holds it.

``grad_norm`` reported for kron is ‖feature‖₂ (its square is an unbiased estimate of ‖g_x‖²):
the exact norm would need every G_x or an O(tokens²) Gram product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cropi.layer_grads import _plain_embedding
from cropi.policy_grad import GradConfig, _unit_objective, build_units
from cropi.projection import HASH_VERSION, make_projector
from cropi.runtime import derive_seed

_MAP_ROWS = 256  # coordinates turned into map rows per Projector.project call


@dataclass
class KronBlock:
    """One covered weight [rows, cols], the modules using it, and its maps stored transposed
    (None = that side exact)."""

    weight: str
    bias: str | None  # a covered bias of its Linear user (projected with p_rows)
    users: list[tuple[str, str, int | None]]  # (module name, "linear" | "embedding", padding_idx)
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    p_rows: torch.Tensor | None  # [rows, k_rows] float32 = P_rᵀ
    p_cols: torch.Tensor | None  # [cols, k_cols] float32 = P_cᵀ

    @property
    def dim(self) -> int:
        return self.k_rows * self.k_cols + (self.k_rows if self.bias else 0)


def covered_weights(model: torch.nn.Module, names: list[str]) -> list[tuple[str, list, str | None]]:
    """(weight name, [(module name, module)] users, covered bias name or None) for every weight in
    ``names`` whose users are all nn.Linear or plain nn.Embedding modules, in ``names`` order."""
    users: dict[int, list] = {}
    for mname, m in model.named_modules():
        for p in m.parameters(recurse=False):
            users.setdefault(id(p), []).append((mname, m))
    params = dict(model.named_parameters())
    wanted = set(names)
    out = []
    for n in names:
        us = users.get(id(params[n]), [])
        if not us or not all((isinstance(m, torch.nn.Linear) or _plain_embedding(m)) and m.weight is params[n] for _, m in us):
            continue
        bias = [f"{mn}.bias" for mn, m in us if isinstance(m, torch.nn.Linear) and m.bias is not None and f"{mn}.bias" in wanted]
        out.append((n, us, bias[0] if len(us) == 1 and bias else None))
    return out


def layer_dims(shapes: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """(k_rows, k_cols) per weight for shapes [(rows, cols)] and a total budget k (module docstring rule)."""
    if k < len(shapes):
        raise ValueError(f"kron needs k >= the number of covered weights ({len(shapes)}), got k={k}")
    b = k // len(shapes)
    dims = []
    for rows, cols in shapes:
        k_c = min(cols, math.isqrt(b))
        k_r = min(rows, b // k_c)
        if k_r == rows:
            k_c = min(cols, b // k_r)
        dims.append((k_r, k_c))
    return dims


def _map(dim: int, k: int, seed: int, dist: str, device) -> torch.Tensor | None:
    """Pᵀ [dim, k] float32 of the seeded dense projector R^dim -> R^k, or None when k >= dim (exact)."""
    if k >= dim:
        return None
    proj = make_projector("dense", dim, k, seed, dist=dist, device=device)
    return torch.cat([proj.project(torch.eye(min(_MAP_ROWS, dim - a), device=device), a)
                      for a in range(0, dim, _MAP_ROWS)])


class KronProjector:
    """Seeded per-weight maps for the covered weights of ``model`` (see the module docstring).

    names: the selected parameter names (``select_params``); ``self.names`` keeps the covered ones.
    k: requested feature dimension (``self.k`` ≤ k is the actual one). dist: rademacher | gaussian
    entries of the maps. device: where the maps live, the policy's device."""

    kind = "kron"

    def __init__(self, model: torch.nn.Module, names: list[str], k: int = 8192, seed: int = 0, *,
                 dist: str = "rademacher", device="cpu"):
        if not (isinstance(seed, int) and 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        cov = covered_weights(model, names)
        if not cov:
            raise ValueError("kron: no nn.Linear / nn.Embedding weight among the selected parameters (use sjlt)")
        params = dict(model.named_parameters())
        self.seed, self.dist, self.requested_k = seed, dist, k
        self.device = torch.device(device)
        self.blocks: list[KronBlock] = []
        for (w, us, bias), (k_r, k_c) in zip(cov, layer_dims([tuple(params[w].shape) for w, _, _ in cov], k)):
            rows, cols = params[w].shape
            kinds = [(mn, "linear" if isinstance(m, torch.nn.Linear) else "embedding",
                      getattr(m, "padding_idx", None)) for mn, m in us]
            self.blocks.append(KronBlock(w, bias, kinds, rows, cols, k_r, k_c,
                                         _map(rows, k_r, derive_seed(seed, "kron", w, "rows"), dist, self.device),
                                         _map(cols, k_c, derive_seed(seed, "kron", w, "cols"), dist, self.device)))
        covered = {n for b in self.blocks for n in (b.weight, b.bias) if n}
        self.names = [n for n in names if n in covered]  # the parameters kron's features stand for
        self.d = sum(params[n].numel() for n in self.names)
        self.k = sum(b.dim for b in self.blocks)

    def meta(self) -> dict:
        """JSON-able description of everything that defines the maps (same keys as Projector.meta)."""
        return {
            "kind": "kron", "d": self.d, "k": self.k, "seed": self.seed, "density": None, "s": None,
            "dist": self.dist, "hash": HASH_VERSION, "impl": None, "requested_k": self.requested_k,
            "blocks": [[b.weight, b.k_rows, b.k_cols] for b in self.blocks],
        }

    def block_features(self, block: KronBlock, captured: dict, owner: torch.Tensor, n_prompts: int) -> torch.Tensor:
        """Σ over each prompt's tokens of (P_r left)(P_c right)ᵀ over every user, flattened, then the bias block.

        captured: {module name: (input, δ)} with input [U, N, cols] (linear) or token ids [U, N] (embedding)
        and δ [U, N, out] for U units of N tokens; owner: [U] long prompt index. Returns [n_prompts, dim]."""
        total, bias = 0.0, 0.0
        for name, kind, pad in block.users:
            x, delta = captured[name]
            if kind == "linear":
                left = delta.float() if block.p_rows is None else delta.float() @ block.p_rows  # [U, N, k_r]
                right = x.float() if block.p_cols is None else x.float() @ block.p_cols  # [U, N, k_c]
                bias = bias + left.sum(1)
            else:
                left = (torch.nn.functional.one_hot(x, block.rows).float() if block.p_rows is None
                        else block.p_rows[x])  # [U, N, k_r]: column i_t of P_r
                if pad is not None:
                    left = left * (x != pad)[..., None]
                right = delta.float() if block.p_cols is None else delta.float() @ block.p_cols
            total = total + torch.bmm(left.transpose(1, 2), right).flatten(1)  # [U, k_r * k_c]
        per_unit = torch.cat([total, bias], 1) if block.bias else total
        return torch.zeros(n_prompts, per_unit.shape[1], device=per_unit.device).index_add_(0, owner, per_unit)


def prompt_features(policy, prompt_ids, responses, weights, behavior_logp, cfg: GradConfig, projector: KronProjector,
                    micro_batch: int = 64):
    """kron features of a batch of P prompts from one forward and one backward (no per-prompt gradients).

    Args as :func:`cropi.policy_grad.prompt_gradients` (the objective and its per-token weights are
    the same ``build_units`` / ``_unit_objective``). Returns features [P, projector.k] float32 (cpu)
    and ‖feature‖₂ [P] float64."""
    model = policy.model
    units = build_units(prompt_ids, responses, weights, behavior_logp, policy.tokenizer.pad_token_id, micro_batch)
    U, M, T = units.input_ids.shape
    dev = policy.device
    flat = [x.to(dev).reshape(U * M, T) for x in (units.input_ids, units.attention_mask, units.response_mask,
                                                  units.weight, units.behavior_logp)]
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(name for b in projector.blocks for name, _, _ in b.users))
    inputs, outs, handles = {}, {}, []

    def hook(name):
        def fn(mod, inp, out):
            if name in inputs:
                raise RuntimeError(f"kron: {name} is called more than once per forward; it cannot be covered")
            inputs[name], outs[name] = inp[0].detach(), out
        return fn

    was_training = model.training
    model.eval()
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook(name)))
        with torch.enable_grad():
            J = _unit_objective(model, dict(model.named_parameters()), dict(model.named_buffers()), *flat,
                                cfg.temperature, cfg.ratio_clip)
            deltas = torch.autograd.grad(J, [outs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    captured = {}
    for name, delta in zip(names, deltas):
        x, out = inputs.pop(name), outs.pop(name)
        delta = torch.zeros_like(out) if delta is None else delta
        captured[name] = (x.reshape(U, M * T, *x.shape[2:]), delta.reshape(U, M * T, -1))
    P = len(prompt_ids)
    owner = units.owner.to(dev)
    feats = torch.cat([projector.block_features(b, captured, owner, P) for b in projector.blocks], 1)
    return feats.cpu(), feats.double().norm(dim=1).cpu()
