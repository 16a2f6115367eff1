"""Per-prompt projected gradients from per-layer hooks during one batched backward.

The sequences n = 1..N of a micro-batch each belong to one prompt p(n); the objective is
J = Σ_n J_n, the same ``policy_grad._unit_objective`` (weights from ``policy_grad.token_weights``)
as the vmap path. Sequences never interact, so at a module output y the gradient ∂J/∂y_n of
sequence n is ∂J_{p(n)}/∂y_n, and each prompt's gradient of a parameter is a sum over its tokens
t, formed from the module's input a_t and output-gradient δ_t as the backward reaches it:

    nn.Linear     y = a Wᵀ + b:  G_p = Σ_{t∈p} δ_t a_tᵀ  [out, in],   g_b = Σ_{t∈p} δ_t
    nn.Embedding  y = W[i]:      G_p = Σ_{t∈p} e_{i_t} δ_tᵀ  (non-zero only on rows of used tokens)
    any other module called as module(x) that owns a selected parameter (RMSNorm, LayerNorm, ...):
                  the vector-Jacobian product of module(x_p) with δ_p w.r.t. that parameter

Each block is projected at the parameter's offset in ``names`` order (the vmap path's layout, so
features agree up to float error) and freed: memory is the model, one micro-batch's activations
and one module's per-prompt blocks, never P × d. A parameter used by several modules (an lm_head
tied to the embedding) gets the sum of their blocks; its exact norm adds the cross term on the
embedding's rows. Parameters whose modules are called otherwise (several inputs, keyword
arguments, outputs shared across sequences), and parameters used where no hook sees them (a
ParameterDict entry such as PEFT's ``lora_embedding_A``, a weight also read through ``F.linear``:
found by counting each parameter's uses in the autograd graph of a one-sequence probe against the
module calls the hooks see) come from the vmap path restricted to them, so every selected
parameter stays exact; after each backward every parameter is checked to be delivered whole. The parameters' own gradients are never formed (they are frozen
during the pass), so the backward costs what a training backward costs without its dW products.

Micro-batches hold whole prompts (at most ``micro_batch`` sequences, one prompt at least). A prompt
with more responses than that is summed over chunks by plain backward into ``.grad`` (memory d),
so a prompt's gradient never depends on how its responses are batched.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from cropi import models
from cropi.policy_grad import (
    GradConfig,
    _unit_objective,
    build_units,
    logits_window,
    sq_norms,
    unit_gradients,
)
from cropi.projection import Accumulator, Projector
from cropi.train import scale

_BLOCK_ENTRIES = 1 << 25  # per-prompt block floats formed at once (128 MiB); at least one prompt's


def _plain_embedding(m) -> bool:
    """An nn.Embedding whose weight gradient is the plain scatter of its output-gradients onto the
    rows of the tokens used (no max_norm renormalising, no frequency scaling, dense): the rule the
    per-layer hooks and the kron projector (`cropi.kron`) apply."""
    return isinstance(m, torch.nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse


class _Param:
    """Contributions to one selected parameter during one micro-batch."""

    def __init__(self, name: str, tensor: torch.Tensor, offset: int):
        self.name, self.offset, self.numel = name, offset, tensor.numel()
        self.cols = tensor.shape[-1] if tensor.dim() == 2 else None
        self.reset()

    def reset(self):
        self.calls_dense = self.calls_rows = self.got_dense = self.got_rows = 0
        self.dense = self.rows_vals = self.kept = None
        self.ids: list[torch.Tensor] = []  # token ids seen by its embedding users (valid positions)
        self._rows = None

    @property
    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = torch.unique(torch.cat(self.ids))
        return self._rows


class LayerGrads:
    """Hooks that turn one batched backward into projected per-prompt gradients (module docstring).

    names: selected parameter names in projection order; projector: the Projector (any kind)."""

    def __init__(self, policy: models.Policy, names: list[str], cfg: GradConfig, projector: Projector,
                 micro_batch: int = 64, checkpointing: bool = False):
        self.policy, self.cfg, self.projector = policy, cfg, projector
        self.micro_batch, self.checkpointing = micro_batch, checkpointing
        self.recomputing = False
        self.unhooked: set[str] | None = None  # parameters the hooks cannot deliver whole (``_unhooked``)
        self.window = None  # the logits window of the objective being run (``_objective``)
        self.model = policy.model
        params = dict(self.model.named_parameters())
        self.names = list(names)
        self.params, offset = {}, 0
        for n in names:
            self.params[n] = _Param(n, params[n], offset)
            offset += params[n].numel()
        by_id = {id(params[n]): n for n in names}
        self.users: dict[str, list[tuple[str, str]]] = {}  # module name -> [(kind, param name)]
        self.modules = {}
        for mname, m in self.model.named_modules():
            for local, p in m.named_parameters(recurse=False):
                if id(p) not in by_id:
                    continue
                if isinstance(m, torch.nn.Linear):
                    kind = "linear-weight" if local == "weight" else "linear-bias"
                elif _plain_embedding(m) and local == "weight":
                    kind = "embedding"
                else:
                    kind = "module:" + local
                self.users.setdefault(mname, []).append((kind, by_id[id(p)]))
                self.modules[mname] = m

    # ------------------------------------------------------------------ one prompt batch

    def __call__(self, prompt_ids, responses, weights, behavior_logp) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients [P, k] float32 (cpu) and exact ‖g_x‖₂ [P] float64 of P prompts
        (arguments as :func:`cropi.policy_grad.prompt_gradients`)."""
        P = len(prompt_ids)
        feats = torch.zeros(P, self.projector.k)
        norms = torch.zeros(P, dtype=torch.float64)
        for group in self._groups([len(r) for r in responses]):
            args = [[x[i] for i in group] for x in (prompt_ids, responses, weights, behavior_logp)]
            if len(group) == 1 and len(responses[group[0]]) > self.micro_batch:
                f, sq = self._accumulated(*args)
            else:
                f, sq = self._micro_batch(*args)
            feats[group] = f.float().cpu()
            norms[group] = sq.sqrt()
        return feats, norms

    def _groups(self, sizes: list[int]) -> list[list[int]]:
        """Consecutive whole prompts with at most ``micro_batch`` sequences (one prompt at least)."""
        groups, cur, n = [], [], 0
        for i, g in enumerate(sizes):
            if cur and n + g > self.micro_batch:
                groups.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += g
        return groups + [cur] if cur else groups

    def _units(self, prompt_ids, responses, weights, behavior_logp):
        return build_units(prompt_ids, responses, weights, behavior_logp, self.policy.tokenizer.pad_token_id, 1)

    def _objective(self, units, lo=0, hi=None):
        """J over sequences lo..hi of one-response units (flat [N, T] batch); logits only where J
        needs them (``logits_window``)."""
        dev = self.policy.device
        flat = [x[lo:hi, 0].to(dev) for x in (units.input_ids, units.attention_mask, units.response_mask,
                                                units.weight, units.behavior_logp)]
        self.window = logits_window(self.model, flat[2])  # kept for the hooks: the lm_head sees these positions
        return _unit_objective(self.model, dict(self.model.named_parameters()), dict(self.model.named_buffers()),
                               *flat, self.cfg.temperature, self.cfg.ratio_clip, self.window)

    def _backward_into_grad(self, units) -> dict[str, torch.Tensor]:
        """Plain backward of J summed over every sequence of ``units``, ``micro_batch`` sequences at a
        time, into the selected parameters' .grad (the others frozen). Returns {name: parameter}."""
        params = dict(self.model.named_parameters())
        for n in self.names:
            params[n].grad = None
        handle = _leaf_embeddings(self.model)
        try:
            with _frozen(self.model, set(self.names)), _eval(self.model), self._checkpointed(), torch.enable_grad():
                for lo in range(0, units.input_ids.shape[0], self.micro_batch):
                    self._objective(units, lo, lo + self.micro_batch).backward()
        finally:
            handle.remove()
        return {n: params[n] for n in self.names}

    def _accumulated(self, prompt_ids, responses, weights, behavior_logp):
        """One prompt whose responses exceed a micro-batch: plain backward of its chunks into .grad."""
        acc = Accumulator(self.projector, 1)
        sq = torch.zeros(1, dtype=torch.float64)
        for n, p in self._backward_into_grad(self._units(prompt_ids, responses, weights, behavior_logp)).items():
            g = torch.zeros(1, p.numel(), device=p.device) if p.grad is None else p.grad.reshape(1, -1).float()
            p.grad = None
            sq += sq_norms(g).sum()
            acc.add(g, self.params[n].offset)
        return acc.result(), sq

    def _micro_batch(self, prompt_ids, responses, weights, behavior_logp):
        """Whole prompts in one forward/backward with the hooks."""
        units = self._units(prompt_ids, responses, weights, behavior_logp)
        self.owner = units.owner.to(self.policy.device)  # [N] prompt of each sequence
        self.mask = units.attention_mask[:, 0].to(self.policy.device).bool()  # [N, T] real tokens
        self.n_prompts = len(prompt_ids)
        self.token_index: dict[int, list[torch.Tensor]] = {}
        self.acc = Accumulator(self.projector, self.n_prompts)
        self.sq = torch.zeros(self.n_prompts, dtype=torch.float64)
        if self.unhooked is None:
            self.unhooked = self._unhooked(units)
        self.leftover: set[str] = set(self.unhooked)
        self.phase = "forward"
        for p in self.params.values():
            p.reset()
        handles = [_leaf_embeddings(self.model)]
        handles += [m.register_forward_hook(self._forward_hook(name), with_kwargs=True)
                    for name, m in self.modules.items()]
        try:
            with _frozen(self.model, set()), _eval(self.model), self._checkpointed(), torch.enable_grad():
                J = self._objective(units)
                self.phase = "backward"
                if J.requires_grad:
                    J.backward()
        finally:
            for h in handles:
                h.remove()
        left = [n for n in self.names if n in self.leftover or self._pending(self.params[n])]
        for n in self.names:
            p = self.params[n]
            if n not in left and p.calls_dense + p.calls_rows != self.uses[n]:
                raise RuntimeError(f"per-layer gradients: {n} is used {self.uses[n]} times in the graph but its hooks "
                                   f"saw {p.calls_dense + p.calls_rows} module calls (a bug in cropi.layer_grads)")
        if left:
            self._vmap_fallback(units, left)
        acc, sq = self.acc, self.sq
        self.acc = self.sq = self.owner = self.mask = self.token_index = None
        for p in self.params.values():
            p.reset()
        return acc.result(), sq

    def _unhooked(self, units) -> set[str]:
        """Selected parameters whose uses in J's autograd graph outnumber the calls of the modules
        that own them: those no hook sees whole. Counted on a probe forward of the first sequence,
        the selected parameters requiring grad (sets ``self.uses``: name -> uses in the graph)."""
        calls = dict.fromkeys(self.names, 0)

        def counter(mname):
            def hook(mod, args, out):
                if not self.recomputing:
                    for _, n in self.users[mname]:
                        calls[n] += 1
            return hook

        handles = [m.register_forward_hook(counter(name)) for name, m in self.modules.items()]
        try:
            with _frozen(self.model, set(self.names)), _eval(self.model), torch.enable_grad():
                J = self._objective(units, 0, 1)
        finally:
            for h in handles:
                h.remove()
        self.uses = _graph_uses(J, {id(p): n for n, p in self.model.named_parameters() if n in self.params})
        return {n for n in self.names if self.uses[n] != calls[n]}

    @staticmethod
    def _pending(p: _Param) -> bool:
        return p.got_dense < p.calls_dense or p.got_rows < p.calls_rows

    def _vmap_fallback(self, units, names):
        """Exact per-prompt gradients of ``names`` from the vmap path (parameters no hook covered)."""
        grads = unit_gradients(self.policy, units, names, self.cfg)
        for n in names:
            g = grads.pop(n).reshape(units.input_ids.shape[0], -1).float()
            g = torch.zeros(self.n_prompts, g.shape[1], device=g.device).index_add_(0, self.owner, g)
            self.sq += sq_norms(g)
            self.acc.add(g, self.params[n].offset)

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, mname: str):
        module = self.modules[mname]
        uses = self.users[mname]

        def hook(mod, args, kwargs, out):
            if self.recomputing or any(n in self.leftover for _, n in uses):
                return None
            N = self.owner.shape[0]
            x = args[0] if args else None
            generic = any(k.startswith("module:") for k, _ in uses)
            ok = (isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor) and out.dim() >= 2
                  and out.shape[0] == N and x.shape[0] == N and x.shape[:2] == out.shape[:2]
                  and not (generic and (kwargs or len(args) != 1)))
            if not ok:  # not separable per sequence here: the vmap path takes these parameters
                self.leftover.update(n for _, n in uses)
                return None
            if self.phase == "forward":
                for kind, n in uses:
                    p = self.params[n]
                    if kind == "embedding":
                        p.calls_rows += 1
                        valid = self.mask if x.shape == self.mask.shape else torch.ones_like(x, dtype=torch.bool)
                        ids = x[valid]
                        if module.padding_idx is not None:
                            ids = ids[ids != module.padding_idx]
                        p.ids.append(ids)
                    else:
                        p.calls_dense += 1
            if not torch.is_grad_enabled():  # the first, gradient-free pass of a checkpointed layer
                return None
            replaced = None
            if not out.requires_grad:  # nothing upstream needs gradients: start the backward here
                out = replaced = out.detach().requires_grad_()
            box = [x.detach()]  # emptied by the hook: the input is freed once its block is formed
            out.register_hook(lambda delta: self._backward(mname, box.pop(), delta))
            return replaced

        return hook

    def _prompt_tokens(self, t: torch.Tensor) -> list:
        """t [N, T', ...] -> per prompt a callable giving its sequences' real tokens [n_p, ...] (copied
        on demand, so the output-gradient of a large module is not copied for every prompt at once).
        T' = the logits window is its last T' positions (an lm_head under ``logits_to_keep``)."""
        flat = t.reshape(-1, *t.shape[2:])
        return [lambda i=i: flat.index_select(0, i) for i in self._token_index(t.shape[1])]

    def _token_index(self, width: int) -> list[torch.Tensor]:
        """Per prompt the flat positions (row · width + column) of its tokens in a [N, width]
        layout: the real tokens when width is the batch's T or its logits window (its last
        positions), every position otherwise. Computed once per width and micro-batch."""
        if width not in self.token_index:
            N, T = self.mask.shape
            if width in (T, self.window):
                mask = self.mask[:, T - width:]
            else:
                mask = torch.ones(N, width, dtype=torch.bool, device=self.mask.device)
            pos = torch.arange(N * width, device=mask.device).view(N, width)
            index = []
            for p in range(self.n_prompts):
                mine = self.owner == p
                index.append(pos[mine][mask[mine]])
            self.token_index[width] = index
        return self.token_index[width]

    def _backward(self, mname: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        module = self.modules[mname]
        for kind, n in self.users[mname]:
            if n in self.leftover:
                continue
            p = self.params[n]
            if kind == "embedding":
                self._add_rows(p, module, x, delta)
            elif kind == "linear-bias":
                self._add_dense(p, torch.stack([d().float().sum(0) for d in self._prompt_tokens(delta)]))
            elif kind == "linear-weight":
                self._add_linear(p, x, delta)
            else:
                self._add_module(p, module, kind.split(":", 1)[1], x, delta)

    def _add_linear(self, p: _Param, x, delta):
        """Σ_t δ_t a_tᵀ per prompt. A weight with one user is finished a few prompts at a time
        (its per-prompt blocks of a large weight, e.g. an lm_head, are never all held at once)."""
        xs, ds = self._prompt_tokens(x), self._prompt_tokens(delta)
        rows, cols = delta.shape[-1], x.shape[-1]

        def block(js):
            out = torch.empty(len(js), rows, cols, device=x.device)
            for i, j in enumerate(js):
                torch.mm(ds[j]().float().T, xs[j]().float(), out=out[i])
            return out.view(len(js), -1)

        if p.calls_dense > 1:  # several users: their sum is needed for the norm
            self._add_dense(p, block(range(self.n_prompts)))
            return
        step = max(1, _BLOCK_ENTRIES // p.numel)
        for lo in range(0, self.n_prompts, step):
            js = list(range(lo, min(self.n_prompts, lo + step)))
            self._finish_dense(p, block(js), js)
        p.got_dense += 1
        self._maybe_rows(p)

    def _add_module(self, p: _Param, module, local: str, x, delta):
        """VJP of module(x_p) with δ_p w.r.t. its parameter ``local``, per prompt (recomputed forward)."""
        xs, ds = self._prompt_tokens(x), self._prompt_tokens(delta)
        w = getattr(module, local).detach()
        out = []
        self.recomputing = True  # this forward is ours: the hooks must not see it
        try:
            with torch.enable_grad():
                for a, d in ((a(), d()) for a, d in zip(xs, ds)):
                    leaf = w.clone().requires_grad_()
                    y = functional_call(module, {local: leaf}, (a[None],))
                    (g,) = torch.autograd.grad(y, leaf, d[None].to(y.dtype))
                    out.append(g.float().flatten())
        finally:
            self.recomputing = False
        self._add_dense(p, torch.stack(out))

    def _add_rows(self, p: _Param, module, ids, delta):
        """Embedding: per prompt Σ_t δ_t on the row of token i_t, over the union of used rows."""
        rows = p.rows
        vals = torch.zeros(self.n_prompts, len(rows), delta.shape[-1], device=delta.device)
        for j, (i, d) in enumerate(zip(self._prompt_tokens(ids), self._prompt_tokens(delta))):
            i, d = i(), d()
            if module.padding_idx is not None:
                keep = i != module.padding_idx
                i, d = i[keep], d[keep]
            vals[j].index_add_(0, torch.searchsorted(rows, i), d.float())
        p.rows_vals = vals if p.rows_vals is None else p.rows_vals + vals
        p.got_rows += 1
        self._maybe_rows(p)

    def _add_dense(self, p: _Param, block: torch.Tensor):
        """block [P, numel]: one user's contribution; summed until the parameter's last dense user."""
        p.dense = block if p.dense is None else p.dense + block
        p.got_dense += 1
        if p.got_dense == p.calls_dense:
            block, p.dense = p.dense, None
            self._finish_dense(p, block, list(range(self.n_prompts)))
            self._maybe_rows(p)

    def _finish_dense(self, p: _Param, block: torch.Tensor, at: list[int]):
        """Project and take the norm of the summed dense block of prompts ``at``; keep its values on
        the rows the embedding users touch (for the cross term of the norm)."""
        self.sq[at] += sq_norms(block)
        self.acc.add(block, p.offset, at)
        if p.calls_rows:
            kept = block.view(len(at), -1, p.cols)[:, p.rows]
            if p.kept is None:
                p.kept = torch.zeros(self.n_prompts, *kept.shape[1:], device=kept.device)
            p.kept[at] = kept

    def _maybe_rows(self, p: _Param):
        """Once every user has delivered: the row-sparse embedding part, its norm with the cross term."""
        if p.calls_rows == 0 or p.got_rows < p.calls_rows or p.got_dense < p.calls_dense:
            return
        v = p.rows_vals
        if p.kept is not None:
            self.sq += sq_norms(p.kept + v) - sq_norms(p.kept)
        else:
            self.sq += sq_norms(v)
        self.acc.add_rows(v, p.offset, p.rows, p.cols, p.numel)
        p.rows_vals = p.kept = None

    # ------------------------------------------------------------------ gradient checkpointing

    def _checkpointed(self):
        """Recompute each decoder layer's forward in the backward (``scale.checkpointing``)."""
        return scale.checkpointing(self.model, self.checkpointing)


def _graph_uses(J: torch.Tensor, names_by_id: dict[int, str]) -> dict[str, int]:
    """How many edges of J's autograd graph lead into each named parameter's accumulator (one per
    op that reads the parameter)."""
    uses = dict.fromkeys(names_by_id.values(), 0)
    seen, stack = set(), [J.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in names_by_id:
                uses[names_by_id[id(var)]] += 1
            elif nxt is not None:
                stack.append(nxt)
    return uses


def _leaf_embeddings(model):
    """Hook making the input embeddings' output a leaf that requires grad when nothing upstream
    does, so the backward runs through the blocks even with every parameter frozen."""
    def hook(mod, args, out):
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and not out.requires_grad:
            return out.detach().requires_grad_()
        return None

    return model.get_input_embeddings().register_forward_hook(hook)


@contextlib.contextmanager
def _frozen(model, keep: set[str]):
    """requires_grad False on every parameter except ``keep`` (restored afterwards)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@contextlib.contextmanager
def _eval(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def prompt_gradients(policy: models.Policy, prompt_ids, responses, weights, behavior_logp, names: list[str],
                     cfg: GradConfig, projector: Projector, micro_batch: int = 64, checkpointing: bool = False):
    """Per-layer twin of :func:`cropi.policy_grad.prompt_gradients` (same arguments, a Projector of any
    kind for ``project``): features [P, k] float32 (cpu), ‖g_x‖₂ [P] float64 (exact)."""
    return LayerGrads(policy, names, cfg, projector, micro_batch, checkpointing)(prompt_ids, responses, weights,
                                                                                 behavior_logp)


def summed_gradient(policy: models.Policy, prompt_ids, responses, weights, behavior_logp, names: list[str],
                    cfg: GradConfig, micro_batch: int = 64, checkpointing: bool = False) -> torch.Tensor:
    """Σ_x g_x over the given prompts as one flat [d] float32 vector (cpu) in ``names`` order: plain
    backward of the summed objective (J is linear in the prompts), ``micro_batch`` sequences at a time."""
    lg = LayerGrads(policy, names, cfg, None, micro_batch, checkpointing)
    parts = []
    for p in lg._backward_into_grad(lg._units(prompt_ids, responses, weights, behavior_logp)).values():
        parts.append(torch.zeros(p.numel()) if p.grad is None else p.grad.detach().float().flatten().cpu())
        p.grad = None
    return torch.cat(parts)
