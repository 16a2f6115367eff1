"""The `kron` projector: per-prompt projected gradients of every nn.Linear from one batched backward
(LoGra-style; beyond the paper, DESIGN §5).

For a linear layer y = W a + b with W [out, in], the gradient of a prompt's objective J_x is

    G_x = Σ_t δ_t a_tᵀ         δ_t = ∂J_x/∂y_t [out], a_t = layer input [in], t over every token
                                of the prompt's G sequences (prompt tokens too: they feed later tokens)

With two seeded maps P_in [k_in, in], P_out [k_out, out] (hash-seeded ``dense`` projectors of
:mod:`cropi.projection`, scaled so E[PᵀP] = I) the layer's feature is

    vec(P_out G_x P_inᵀ) = vec(Σ_t (P_out δ_t)(P_in a_t)ᵀ)        [k_out · k_in], row-major

computed from projected per-token vectors, so G_x is never formed. P_in and P_out are independent,
so E[<feature_x, feature_y>] = <G_x, G_y>: kron estimates the same inner products as the other
projectors, restricted to the parameters it covers. A bias b gets the block P_out Σ_t δ_t [k_out].

Coverage: the weight (and bias) of every nn.Linear among the selected parameters whose weight
belongs to no other module. Embeddings, norms, and a tied lm_head (its weight is the embedding's)
are not covered; use sjlt for those. ``cropi score --projector kron`` scores (and --check-rank
compares against) exactly the covered parameters, listed in the store's meta.

Dimensions: the requested k is split evenly over the L covered layers, b = k // L each, with
k_in = min(in, ⌊√b⌋) and k_out = min(out, b // k_in) (then k_in = min(in, b // k_out) when k_out hit
out). A side whose budget reaches its dimension is not projected at all (exact). The feature
dimension is Σ_l k_out·k_in (+ k_out per covered bias) ≤ k; ``KronProjector.k`` holds it.

``grad_norm`` reported for kron is ‖feature‖₂ (its square is an unbiased estimate of ‖g_x‖²):
the exact norm would need every G_x or an O(tokens²) Gram product.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from cropi.policy_grad import GradConfig, _unit_objective, build_units, fill_on_policy
from cropi.projection import HASH_VERSION, make_projector
from cropi.runtime import derive_seed

_MAP_ROWS = 256  # input coordinates turned into map rows per Projector.project call


@dataclass
class KronLayer:
    """One covered nn.Linear: names, shapes, and its two maps stored transposed (None = exact side)."""

    module: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int
    k_out: int
    k_in: int
    p_out: torch.Tensor | None  # [out, k_out] float32 = P_outᵀ
    p_in: torch.Tensor | None  # [in, k_in] float32 = P_inᵀ

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in + (self.k_out if self.bias else 0)


def linear_layers(model: torch.nn.Module, names: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(module name, module) of every nn.Linear whose weight is in ``names`` and owned by it alone."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    wanted = set(names)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f"{n}.weight" in wanted and owners[id(m.weight)] == 1]


def layer_dims(shapes: list[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """(k_out, k_in) per layer for shapes [(out, in)] and a total budget k (module docstring rule)."""
    if k < len(shapes):
        raise ValueError(f"kron needs k >= the number of covered linear layers ({len(shapes)}), got k={k}")
    b = k // len(shapes)
    dims = []
    for out, inp in shapes:
        k_in = min(inp, math.isqrt(b))
        k_out = min(out, b // k_in)
        if k_out == out:
            k_in = min(inp, b // k_out)
        dims.append((k_out, k_in))
    return dims


def _map(dim: int, k: int, seed: int, dist: str, device) -> torch.Tensor | None:
    """Pᵀ [dim, k] float32 of the seeded dense projector R^dim -> R^k, or None when k >= dim (exact)."""
    if k >= dim:
        return None
    proj = make_projector("dense", dim, k, seed, dist=dist, device=device)
    return torch.cat([proj.project(torch.eye(min(_MAP_ROWS, dim - a), device=device), a)
                      for a in range(0, dim, _MAP_ROWS)])


class KronProjector:
    """Seeded per-layer maps for the covered linear layers of ``model`` (see the module docstring).

    names: the selected parameter names (``select_params``); ``self.names`` keeps the covered ones.
    k: requested feature dimension (``self.k`` ≤ k is the actual one). dist: rademacher | gaussian
    entries of the maps. device: where the maps live, the policy's device."""

    kind = "kron"

    def __init__(self, model: torch.nn.Module, names: list[str], k: int = 8192, seed: int = 0, *,
                 dist: str = "rademacher", device="cpu"):
        if not (isinstance(seed, int) and 0 <= seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        mods = linear_layers(model, names)
        if not mods:
            raise ValueError("kron: no nn.Linear weight among the selected parameters (embeddings and norms are not covered; use sjlt)")
        wanted = set(names)
        self.seed, self.dist, self.requested_k = seed, dist, k
        self.device = torch.device(device)
        self.layers: list[KronLayer] = []
        for (name, m), (k_out, k_in) in zip(mods, layer_dims([(m.out_features, m.in_features) for _, m in mods], k)):
            bias = f"{name}.bias" if m.bias is not None and f"{name}.bias" in wanted else None
            self.layers.append(KronLayer(
                name, f"{name}.weight", bias, m.out_features, m.in_features, k_out, k_in,
                _map(m.out_features, k_out, derive_seed(seed, "kron", name, "out"), dist, self.device),
                _map(m.in_features, k_in, derive_seed(seed, "kron", name, "in"), dist, self.device)))
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.names = [n for n in names if n in covered]  # the parameters kron's features stand for
        self.d = sum(layer.out_features * layer.in_features + (layer.out_features if layer.bias else 0)
                     for layer in self.layers)
        self.k = sum(layer.dim for layer in self.layers)

    def meta(self) -> dict:
        """JSON-able description of everything that defines the maps (same keys as Projector.meta)."""
        return {
            "kind": "kron", "d": self.d, "k": self.k, "seed": self.seed, "density": None, "s": None,
            "dist": self.dist, "hash": HASH_VERSION, "impl": None, "requested_k": self.requested_k,
            "layers": [[layer.module, layer.k_out, layer.k_in] for layer in self.layers],
        }

    def layer_features(self, layer: KronLayer, a: torch.Tensor, delta: torch.Tensor, owner: torch.Tensor,
                       n_prompts: int) -> torch.Tensor:
        """Σ over each prompt's tokens of (P_out δ)(P_in a)ᵀ, flattened, then the bias block.

        a: [U, N, in], delta: [U, N, out] (U units, N tokens each), owner: [U] long prompt index.
        Returns [n_prompts, layer.dim] float32."""
        a, delta = a.float(), delta.float()
        pa = a if layer.p_in is None else a @ layer.p_in  # [U, N, k_in]
        pd = delta if layer.p_out is None else delta @ layer.p_out  # [U, N, k_out]
        blocks = [torch.bmm(pd.transpose(1, 2), pa).flatten(1)]  # [U, k_out * k_in]
        if layer.bias:
            blocks.append(pd.sum(1))
        per_unit = torch.cat(blocks, 1)
        return torch.zeros(n_prompts, per_unit.shape[1], device=per_unit.device).index_add_(0, owner, per_unit)


def prompt_features(policy, prompt_ids, responses, weights, behavior_logp, cfg: GradConfig, projector: KronProjector,
                    micro_batch: int = 64):
    """kron features of a batch of P prompts from one forward and one backward (no per-prompt gradients).

    Args as :func:`cropi.policy_grad.prompt_gradients` (the objective and its per-token weights are
    the same ``build_units`` / ``_unit_objective``). Returns features [P, projector.k] float32 (cpu)
    and ‖feature‖₂ [P] float64."""
    model = policy.model
    units = build_units(prompt_ids, responses, weights, behavior_logp, policy.tokenizer.pad_token_id, micro_batch)
    fill_on_policy(policy, units, cfg.temperature)
    U, M, T = units.input_ids.shape
    dev = policy.device
    flat = [x.to(dev).reshape(U * M, T) for x in (units.input_ids, units.attention_mask, units.response_mask,
                                                  units.weight, units.behavior_logp)]
    modules = dict(model.named_modules())
    acts, outs, handles = {}, {}, []

    def hook(name):
        def fn(mod, inp, out):
            if name in acts:
                raise RuntimeError(f"kron: {name} is called more than once per forward; it cannot be covered")
            acts[name], outs[name] = inp[0].detach(), out
        return fn

    was_training = model.training
    model.eval()
    try:
        for layer in projector.layers:
            handles.append(modules[layer.module].register_forward_hook(hook(layer.module)))
        with torch.enable_grad():
            J = _unit_objective(model, dict(model.named_parameters()), dict(model.named_buffers()), *flat,
                                cfg.temperature, cfg.ratio_clip)
            deltas = torch.autograd.grad(J, [outs[layer.module] for layer in projector.layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    P = len(prompt_ids)
    owner = units.owner.to(dev)
    parts = []
    for layer, delta in zip(projector.layers, deltas):
        a = acts.pop(layer.module)
        delta = torch.zeros_like(outs.pop(layer.module)) if delta is None else delta
        parts.append(projector.layer_features(layer, a.reshape(U, M * T, -1), delta.reshape(U, M * T, -1), owner, P))
    feats = torch.cat(parts, 1)
    return feats.cpu(), feats.double().norm(dim=1).cpu()
