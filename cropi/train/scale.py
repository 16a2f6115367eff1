"""What lets the trainer fit real models: bf16 autocast, activation checkpointing, LoRA adapters.

Micro-batching itself lives in the update loop (`step.update`); the vocabulary projection of
each micro-batch runs in chunks (`models.token_logprobs`). Here: the three switches.

- bf16: forward passes of a training step (generation and the update's log-prob passes) run
  under ``torch.autocast(dtype=bfloat16)``; weights, gradients and the optimizer stay float32
  and log-probs, losses and advantages are computed in float32.
- grad_checkpointing: each decoder layer is recomputed in backward instead of keeping its
  activations (`checkpointing`, also used by the per-layer scorer), so a micro-batch keeps only
  the layer inputs. It does not use the model's training mode: dropout stays off as in the rest
  of the trainer.
- LoRA (``peft``): only the adapter matrices train; checkpoints hold the adapter, the base
  model is the run's ``model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from pathlib import Path

import torch

from cropi import models
from cropi.runtime import derive_seed
from cropi.schema import InputError


def check_bf16(device) -> None:
    """Refuse (InputError) bfloat16 autocast on a device without it (GPUs before Ampere)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("--bf16", None, "bf16", f"{torch.cuda.get_device_name(dev)} has no bfloat16 support; use --no-bf16")


def autocast(enabled: bool, device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a HF causal LM (PEFT wrappers looked through)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    except ImportError:  # transformers < 4.52
        layers = []
    if not layers:
        split = models.split_head(model)
        layers = list(getattr(split[0], "layers", [])) if split else []
    if not layers:
        raise ValueError(f"grad_checkpointing: no decoder layers found in {type(model).__name__}")
    return layers


def _checkpointed(forward, hidden_states, *args, **kwargs):
    if not torch.is_grad_enabled():  # nothing to recompute for
        return forward(hidden_states, *args, **kwargs)
    if not hidden_states.requires_grad:  # frozen embeddings (LoRA, scoring): nothing upstream needs it
        hidden_states = hidden_states.detach().requires_grad_()
    return torch.utils.checkpoint.checkpoint(lambda h: forward(h, *args, **kwargs), hidden_states,
                                             use_reentrant=True)


@contextlib.contextmanager
def checkpointing(model, enabled: bool):
    """Within the block, every decoder layer (`decoder_layers`) is activation-checkpointed while
    grad is enabled; the layers are restored afterwards. The trainer and the per-layer scorer
    (`cropi.layer_grads`) both use it.

    Re-entrant ``torch.utils.checkpoint``: the layer's first forward runs without grad and keeps
    only its input hidden states [B, T, H]; the backward re-runs it with grad. (The per-layer
    scorer's hooks need that: they form their blocks in the re-run.) The re-entrant form
    back-propagates only into the layer's parameters and its hidden-states input, so an input
    that does not require grad (frozen embeddings under LoRA or when scoring) is made a leaf that
    does; the layer's other inputs (masks, position embeddings) need no gradient."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance forward already set
    for layer in layers:  # an instance attribute shadows the class's forward; hooks stay outside
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer, fwd in zip(layers, own):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def add_lora(model, *, rank: int, alpha: float, targets: str, seed: int, adapter=None):
    """Wrap ``model`` in a trainable PEFT LoRA model: fresh adapters (A random from ``seed``,
    B = 0, so the wrapped model equals the base) on the modules named in ``targets``
    (comma-separated names such as ``q_proj,v_proj``, or ``all-linear``), or the adapter saved
    in folder ``adapter`` (resume)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    with warnings.catch_warnings():  # peft still asks transformers 5 the deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        if adapter is not None:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "lora"))
            return get_peft_model(model, cfg)


def load_policy(model: str, checkpoint: Path | None, cfg, device) -> models.Policy:
    """The policy a run trains, float32 master weights: the run's ``model`` (or its latest
    ``checkpoint`` folder), wrapped with LoRA adapters when ``cfg.lora_rank`` > 0 (then the
    checkpoint folder holds the adapter and the base is always ``model``)."""
    if not cfg.lora_rank:
        return models.load(str(checkpoint) if checkpoint else model, device=device, dtype=torch.float32)
    base = models.load(model, device=device, dtype=torch.float32)
    wrapped = add_lora(base.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                       seed=cfg.seed, adapter=checkpoint)
    wrapped.eval()
    return dataclasses.replace(base, model=wrapped, path=str(checkpoint) if checkpoint else base.path)


def trainable(model) -> list[torch.nn.Parameter]:
    """Parameters the optimizer updates (all of them; only the adapters under LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]
