"""`cropi` command line: parses options and calls one library function per command.

Bad input exits 2 with one line on stderr, ``cropi: error: ...`` (see `user_error`); any other
exception is a bug in cropi and keeps its traceback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from cropi import schema
from cropi.export import FORMATS
from cropi.runtime import MAX_NEW_TOKENS
from cropi.select import SELECTORS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL_HELP = ("`tiny` (the embedded default), `smollm2` (SmolLM2-135M-Instruct, docs/real-models.md), "
              "a local HF model folder or a hub name already in the local HF cache.")
DEVICE_HELP = "cpu, cuda, cuda:N [default: this rank's GPU (cuda:LOCAL_RANK) if CUDA is available, else cpu]."
VERIFIER_HELP = ("How responses are verified: auto = each task's reasoning-gym scorer, math-verify for tasks named "
                 "`math` and tasks reasoning-gym does not know; math = math-verify for every row (your own math data). "
                 "Answers are read from \\boxed{...}, '#### x', 'Answer: x' or the final number.")


def input_options(f):
    """--prompt-column/--answer-column/--id-column/--split: how a user's prompts file is read."""
    f = click.option("--split", "data_split", default=None,
                     help="Split of a DatasetDict folder or of a dataset name in the local HF cache.")(f)
    for key in reversed(schema.COLUMN_KEYS):
        f = click.option(f"--{key}-column", f"{key}_column", default=None,
                         help=f"Your column holding the {key} [default: `{key}`].")(f)
    return f


def _columns(kw) -> dict:
    return {k: kw.pop(f"{k}_column") for k in schema.COLUMN_KEYS}


def verifier_options(f):
    f = click.option("--partial-credit", is_flag=True,
                     help="Keep reasoning-gym's partial credit [default: reward 1 only for a fully right answer].")(f)
    return click.option("--verifier", type=click.Choice(["auto", "math"]), default="auto", show_default=True,
                        help=VERIFIER_HELP)(f)


_OWN_CODE = tuple(str(Path(__file__).resolve().parent.parent / d) + os.sep for d in ("cropi", "pipelines"))


def _raised_by_cropi(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is cropi's (or pipelines') own code."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_CODE)


def user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for a bug in cropi.

    User errors: InputError (file, row, field); click's usage errors; every OSError (missing,
    unreadable or unwritable paths, full disks: named by their filename); broken encodings,
    compressed streams, JSON/YAML text, regular expressions and refused pickles; and a
    ValueError that cropi itself raised (its checks word their messages for users). A
    ValueError from inside numpy, torch or pyarrow means cropi let bad data through unchecked:
    that is a bug, and the traceback is what fixes it, so it is not turned into one line.
    """
    import gzip
    import pickle
    import re
    import zlib

    import yaml

    if isinstance(e, click.UsageError):
        where = " ".join(e.ctx.command_path.split()[1:]) + ": " if e.ctx is not None and " " in e.ctx.command_path else ""
        msg = where + e.format_message()
    elif isinstance(e, click.ClickException):
        msg = e.format_message()
    elif isinstance(e, schema.InputError):
        msg = str(e)
    elif isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.filename}: {e.strerror or e}" + (f" ({e.filename2})" if e.filename2 else "")
    elif isinstance(e, gzip.BadGzipFile | zlib.error | EOFError):
        msg = f"broken or truncated compressed input ({e or type(e).__name__})"
    elif isinstance(e, UnicodeDecodeError):
        msg = f"input is not UTF-8 text ({e})"
    elif isinstance(e, pickle.UnpicklingError):
        msg = f"refused to load pickled data (cropi never unpickles): {e}"
    elif isinstance(e, re.error):
        msg = f"invalid regular expression {e.pattern!r}: {e}"
    elif isinstance(e, json.JSONDecodeError | yaml.YAMLError):
        msg = f"invalid {'JSON' if isinstance(e, json.JSONDecodeError) else 'YAML'}: {e}"
    elif isinstance(e, OSError | ValueError) and _raised_by_cropi(e) and getattr(e, "user_facing", True):
        msg = str(e)
    else:
        return None
    return "cropi: error: " + " ".join(msg.split())


def resume_or_fresh(resume: bool, out: Path, *evidence: Path) -> bool:
    """``--resume`` where nothing was started (neither ``out`` nor any ``evidence`` path exists)
    starts a fresh run and says so in one line on stderr, as `wget -c` and `rsync --partial` do:
    a job script that always passes --resume then works for its first try and for a restart
    after a kill alike. Returns the ``resume`` to run with."""
    if resume and not any(p.exists() for p in (out, *evidence)):
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"cropi: note: --resume: nothing to resume at {out}; starting a fresh run", err=True)
        return False
    return resume


@contextmanager
def _sigterm_exits():
    """Make SIGTERM raise SystemExit(143) while a command runs, so `finally` blocks remove their
    temporary files (the default action kills the process without running them). Left alone
    off the main thread or when a handler is already installed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# shown by click itself: exits, ^C, and the help a group prints when called without a command
_CLICK_OWN = (click.exceptions.Exit, click.Abort, getattr(click.exceptions, "NoArgsIsHelpError", click.exceptions.Exit))


class CropiGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 2 (`user_error`)."""

    def invoke(self, ctx):
        try:
            with _sigterm_exits():
                return super().invoke(ctx)
        except Exception as e:
            line = user_error(e)
            if line is None or isinstance(e, _CLICK_OWN):
                raise
            click.echo(line, err=True)
            ctx.exit(2)


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan and ±inf."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class OutPath(click.Path):
    """An output file (``folder=False``) or folder, checked when the options are parsed, before
    any work (`schema.check_output`)."""

    def __init__(self, folder: bool):
        super().__init__(path_type=Path)
        self.folder = folder

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        try:
            return schema.check_output(path, folder=self.folder)
        except schema.InputError as e:
            self.fail(str(e), param, ctx)


class Device(click.ParamType):
    """cpu, cuda, cuda:N or mps, and present on this machine."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            dev = torch.device(value)
        except (RuntimeError, ValueError):
            self.fail(f"{value!r} is not a device (cpu, cuda, cuda:N, mps)", param, ctx)
        if dev.type == "cuda" and not torch.cuda.is_available():
            self.fail(f"{value!r}: no CUDA device is available here", param, ctx)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
        if dev.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value!r}: MPS is not available here", param, ctx)
        if dev.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value!r}: cropi runs on cpu, cuda or mps", param, ctx)
        return value


class ParamsSpec(click.ParamType):
    """all | last:N (N ≥ 1) | a regular expression (`policy_grad.check_params_spec`)."""

    name = "params"

    def convert(self, value, param, ctx):
        from cropi.policy_grad import check_params_spec

        try:
            return check_params_spec(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _verbosity(ctx, param, value):
    """--quiet / --verbose set CROPI_QUIET / CROPI_VERBOSE, which torchrun's workers inherit."""
    if value:
        os.environ["CROPI_QUIET" if param.name == "quiet" else "CROPI_VERBOSE"] = "1"
    return value


@click.group(cls=CropiGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Shell completion (bash): eval \"$(_CROPI_COMPLETE=bash_source cropi)\" "
                    "(zsh_source / fish_source for zsh and fish). Terms: docs/glossary.md.")
@click.version_option(package_name="cropi")
@click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
              help="No progress bars or progress lines (the same as CROPI_QUIET=1).")
@click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_verbosity,
              help="A progress line on every update instead of a bar (the same as CROPI_VERBOSE=1).")
def main():
    """Influence-guided data selection for RLVR (CROPI).

    Progress shows as a bar on a terminal and as a plain line every 30 s otherwise
    (CROPI_PROGRESS_INTERVAL seconds).

    \b
    Typical flow (README.md has it runnable; docs/ explains every step):
      cropi tasks make --task chain_sum --n 100 --out pool.parquet
      cropi rollout --prompts pool.parquet --n 8 --out pool.traj.parquet
      cropi score --trajectories pool.traj.parquet --target val.traj.parquet --out scores/
      cropi select --scores scores/ --ratio 0.1 --out curriculum/
      cropi train --curriculum curriculum/ --run runs/a
    or all of it: cropi run configs/tiny.yaml
    """


# ---------------------------------------------------------------------------- check


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(schema.KINDS), default=None, help="Table kind [default: detected].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--model", default=None,
              help="Also check trajectories as `cropi score` reads them with this model: token ids inside its "
                   "vocabulary and decoding to the responses, prompt+response within its context [default: not checked].")
@input_options
def check(file, kind, as_json, model, data_split, **kw):
    """Validate anything cropi reads or writes and summarise it: a prompts / trajectories / scores
    file (Parquet, JSONL, verl Parquet, datasets folder or a dataset name in the local HF cache), a
    score folder, features store, curriculum or stage, run folder, checkpoint, `cropi run` output,
    export or eval report."""
    from cropi.artefacts import check as check_path

    summary = check_path(file, kind, columns=_columns(kw), split=data_split, model=model)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{file}: OK")
    for k, v in summary.items():
        click.echo(f"  {k:22s} {v}")


# ---------------------------------------------------------------------------- tasks


@main.group()
def tasks():
    """The built-in verifiable task suite (reasoning-gym generators and scorers)."""


@tasks.command("list")
def tasks_list():
    """List the tasks and difficulty levels that generate prompts whose answers verify."""
    from cropi import tasks as T

    for name in T.list_tasks():
        click.echo(f"{name:32s} difficulty {','.join(map(str, T.working_levels(name)))}")


@tasks.command("make")
@click.option("--task", "specs", multiple=True, required=True,
              help="NAME[:key=value,...], repeatable; e.g. basic_arithmetic:difficulty=2.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Prompts per --task (fewer when its question space is smaller).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--out", type=OutPath(folder=False), required=True,
              help="Output file: .parquet, .jsonl or .jsonl.gz (the format follows the name).")
def tasks_make(specs, n, seed, split, out):
    """Generate a prompts pool mixing tasks and difficulties (same seed => byte-identical file)."""
    from cropi import tasks as T

    schema.output_format(out)
    table = T.make_pool(list(specs), n, seed, split)
    schema.write_table(table, out, metadata={"kind": "prompts", "specs": list(specs), "n": n, "seed": seed, "split": split})
    click.echo(f"wrote {table.num_rows} prompts to {out}")


# ---------------------------------------------------------------------------- models


@main.command()
@click.option("--out", type=OutPath(folder=True), default=None, help="Folder [default: the tiny-model cache].")
@click.option("--steps", type=click.IntRange(min=1), default=2500, show_default=True,
              help="Most supervised steps (batches of 64; the learning rate decays to 0 there); stops "
                   "earlier once the target family's T=1 accuracy reaches the recipe's band.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if the cached model exists.")
def warmup(out, steps, seed, force):
    """Build the tiny default policy and warm it up by a short supervised run on task solutions."""
    from cropi import models
    from cropi.warmup import warmup as run_warmup

    out = out or models.tiny_path()
    if (out / "cropi.json").exists() and not force:
        click.echo(f"{out} exists (use --force to rebuild): {(out / 'cropi.json').read_text().strip()}")
        return
    info = run_warmup(out=out, seed=seed, max_steps=steps)
    click.echo(json.dumps(info))


# ---------------------------------------------------------------------------- rollout


@main.command()
@click.option("--prompts", type=click.Path(path_type=Path), required=True, help="Prompts file (any supported format).")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--n", "--num-responses", "n", type=click.IntRange(min=1), default=8, show_default=True,
              help="Responses per prompt (G). Under torchrun use --num-responses (torchrun eats --n).")
@click.option("--temperature", type=Finite(min=0, min_open=True), default=1.0, show_default=True,
              help="Sampling temperature > 0; the behaviour log-probs are taken at it (0, greedy, has none to store).")
@click.option("--top-p", type=Finite(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: keep the smallest token set with this total probability.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=MAX_NEW_TOKENS, show_default=True,
              help="Generation budget per response (tokens); the same default as train and eval.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per resumable chunk.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts [default: all].")
@click.option("--device", type=Device(), default=None, help=DEVICE_HELP)
@click.option("--resume", is_flag=True, help="Keep finished chunks of an interrupted run.")
@click.option("--out", type=OutPath(folder=False), required=True, help="Trajectories file (.parquet).")
@input_options
@verifier_options
def rollout(prompts, model, n, temperature, top_p, max_new_tokens, seed, chunk, limit, device, resume, out,
            data_split, verifier, partial_credit, **kw):
    """Sample G responses per prompt, reward them, store tokens and behaviour log-probs.

    PROMPTS may be Parquet, JSONL, verl Parquet, a datasets folder or a dataset name in the local HF cache."""
    from cropi import rollout as R
    from cropi.distributed import barrier, default_device, dist_context

    resume = resume_or_fresh(resume, out, R._parts_dir(out))
    with dist_context() as (rank, world):
        R.rollout(prompts, out, model=model, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  seed=seed, chunk=chunk, limit=limit, device=default_device(device), resume=resume, rank=rank, world=world,
                  verifier=verifier, partial=partial_credit, columns=_columns(kw), split=data_split)
        if world > 1:
            barrier()
            if rank == 0:
                R.merge_parts(out)
        if rank == 0:
            click.echo(f"wrote {out}")


# ---------------------------------------------------------------------------- score


@main.command()
@click.option("--trajectories", type=click.Path(path_type=Path), required=True, help="Pool with offline responses.")
@click.option("--target", "targets", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Target set trajectories (repeatable).")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--behavior-model", default=None, help="Recompute behaviour log-probs with this model (else stored, else on-policy).")
@click.option("--projector", type=click.Choice(["sjlt", "mask-dense", "dense", "identity", "trak", "kron"]), default="sjlt", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Projected dimension, at most d (the selected parameters' count; larger is refused).")
@click.option("--density", type=Finite(0, 1, min_open=True), default=0.1, show_default=True, help="mask-dense: kept ratio ρ.")
@click.option("--s", "--sjlt-s", "sjlt_s", type=click.IntRange(min=1), default=1, show_default=True,
              help="sjlt: nonzeros per coordinate (--sjlt-s under torchrun).")
@click.option("--dist", type=click.Choice(["rademacher", "gaussian"]), default="rademacher", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Projection and sub-sampling seed.")
@click.option("--params", type=ParamsSpec(), default="all", show_default=True, help="all | last:N | regex on parameter names.")
@click.option("--aggregation", type=click.Choice(["seq-mean-token-mean", "token-mean"]), default="seq-mean-token-mean", show_default=True)
@click.option("--adv-std", type=click.Choice(["group", "batch", "none"]), default="group", show_default=True)
@click.option("--ratio-clip", type=Finite(min=0, min_open=True), default=None, help="Truncate importance ratios at c.")
@click.option("--combine", type=click.Choice(["mean", "max", "rrf"]), default="mean", show_default=True)
@click.option("--max-target", type=click.IntRange(min=1), default=None, help="Prompts per target set (seeded sample).")
@click.option("--shard-size", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per resumable shard.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per batched backward.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Responses per vmap unit / per backward of the per-layer path (lower it if memory runs out).")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--check-rank", type=click.IntRange(min=0), default=0, show_default=True, help="Exact-vs-projected check on N prompts (0: off).")
@click.option("--check-influence", type=click.IntRange(min=0), default=0, show_default=True,
              help="For N prompts, step θ by ε·g/‖g‖ (each --influence-eps), measure the target objective's change, "
                   "report Spearman of the scores against it (0: off).")
@click.option("--influence-eps", type=Finite(min=0, min_open=True), multiple=True,
              help="Step sizes ε (L2 norm in parameter space) for --check-influence, repeatable  [default: 1e-3 1e-2 1e-1 1]")
@click.option("--influence-lr", type=Finite(min=0, min_open=True), default=None,
              help="--check-influence also takes one Adam-like step θ + lr·sign(g) of this lr [default: none].")
@click.option("--dtype", "compute_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Forward/backward dtype (projections accumulate in fp32) [default: fp32 on CPU, bf16 on CUDA].")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="PEFT LoRA adapter folder: score gradients of the adapter parameters only (as LESS does).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute each block's forward in the backward (less memory).")
@click.option("--grad-path", type=click.Choice(["auto", "per-layer", "vmap"]), default="auto", show_default=True,
              help="Per-prompt gradients by per-layer hooks in one batched backward, or by vmap (small models); "
                   "auto picks and records why in meta.json.")
@click.option("--pool-grad", type=click.Choice(["plain", "sign"]), default="plain", show_default=True,
              help="Pool features from g_x, or from sign(g_x): the direction of a first Adam step "
                   "(Adam-preconditioned, as LESS; vmap path only). Target gradients stay plain.")
@click.option("--device", type=Device(), default=None, help=DEVICE_HELP)
@click.option("--resume", is_flag=True, help="Continue an interrupted run (settings must match).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--out", type=OutPath(folder=True), required=True)
@input_options
def score(trajectories, targets, model, behavior_model, projector, k, density, sjlt_s, dist, seed, params, aggregation,
          adv_std, ratio_clip, combine, max_target, shard_size, batch, micro_batch, feature_dtype, check_rank, check_influence,
          influence_eps, influence_lr, compute_dtype, adapter, grad_checkpointing, grad_path, pool_grad, device, resume,
          overwrite, out, data_split, **kw):
    """Per-prompt off-policy policy gradients -> projection -> cosine with target gradients.

    --prompt-column/--answer-column/--id-column and --split say how the pool (--trajectories) is
    read; target sets are cropi trajectories (`cropi rollout` output, which takes the same options)."""
    from cropi import score as S
    from cropi.distributed import default_device, dist_context
    from cropi.policy_grad import GradConfig

    cfg = S.ScoreConfig(projector=projector, k=k, seed=seed, density=density, s=sjlt_s, dist=dist, combine=combine,
                        max_target=max_target, shard_size=shard_size, batch=batch, micro_batch=micro_batch,
                        feature_dtype=feature_dtype, check_rank=check_rank, check_influence=check_influence,
                        influence_eps=tuple(influence_eps) or S.ScoreConfig.influence_eps, influence_lr=influence_lr,
                        dtype=compute_dtype, adapter=str(adapter) if adapter else None,
                        grad_checkpointing=grad_checkpointing, grad_path=grad_path, pool_grad=pool_grad,
                        grad=GradConfig(aggregation=aggregation, adv_std=adv_std, ratio_clip=ratio_clip, params=params))
    resume = resume_or_fresh(resume, out)
    with dist_context() as (rank, world):
        meta = S.score(trajectories, list(targets), out, model=model, behavior_model=behavior_model, cfg=cfg,
                       resume=resume, overwrite=overwrite, device=default_device(device), rank=rank, world=world,
                       columns=_columns(kw), split=data_split)
    if rank == 0:
        click.echo(f"wrote {out}/scores.parquet: {meta['pool_size']} prompts {meta['status']}, "
                   f"{meta['prompts_per_s']} prompts/s")
        if "check_rank" in meta:
            cr = meta["check_rank"]
            click.echo(f"check-rank on {cr['n']} prompts: precision@10% {cr['precision']:.3f}, Spearman {cr['spearman']:.3f}")
        if "check_influence" in meta:
            ci = meta["check_influence"]
            for st in ci["steps"]:
                click.echo(f"check-influence on {ci['n']} prompts, {st['rule']} step {st['step']:g}: Spearman {st['spearman']:.3f} "
                           f"(exact cosines {st['spearman_exact']:.3f}), first-order rel. error {st['first_order_rel_err']:.3f}")


# ---------------------------------------------------------------------------- select / curriculum / export


@main.command("select")
@click.option("--scores", "scores_dir", type=click.Path(path_type=Path), default=None, help="`cropi score` output folder (popi needs it).")
@click.option("--trajectories", type=click.Path(path_type=Path), default=None,
              help="Pool for selectors that need no scores (default: the file --scores points to).")
@click.option("--selector", type=click.Choice(SELECTORS), default="popi", show_default=True,
              help="popi: top influence; random; learnability: top p(1-p); variance: VCRL's p >= kappa; "
                   "pass-band: LO <= pass rate <= HI; full: the whole pool (docs/glossary.md).")
@click.option("--ratio", type=float, default=None, help="Fraction of the pool in (0, 1] [default: 0.1].")
@click.option("--n", type=int, default=None, help="Stage size in prompts, instead of --ratio.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stratify", default=None, help="Keep this column's shares of the pool, e.g. task [default: none].")
@click.option("--kappa", type=float, default=0.8, show_default=True, help="variance: keep p >= kappa.")
@click.option("--band", type=(float, float), default=(0.2, 0.8), show_default=True, help="pass-band: LO HI.")
@click.option("--exclude-previous", is_flag=True, help="Keep prompts chosen in earlier stages out.")
@click.option("--checkpoint", default=None, help="Override the checkpoint recorded from the scores [default: the scores' model].")
@click.option("--out", type=OutPath(folder=True), required=True, help="Curriculum folder; a stage-NNN is appended.")
def select_cmd(scores_dir, trajectories, selector, ratio, n, seed, stratify, kappa, band, exclude_previous, checkpoint, out):
    """Select the next curriculum stage (top 10 % by influence by default)."""
    from cropi.curriculum import make_stage

    d = make_stage(scores_dir=scores_dir, trajectories=trajectories, selector=selector, ratio=ratio, n=n, seed=seed,
                   out=out, exclude_previous=exclude_previous, stratify=stratify, checkpoint=checkpoint, kappa=kappa,
                   band=band)
    click.echo(f"wrote {d}")


@main.group()
def curriculum():
    """Inspect curriculum folders."""


@curriculum.command("show")
@click.argument("directory", type=click.Path(path_type=Path))
def curriculum_show(directory):
    """Table of stages: selector, size, task mix, mean pass rate, mean score."""
    from cropi.curriculum import show

    click.echo(show(directory))


@main.command("export")
@click.option("--curriculum", "curriculum_dir", type=click.Path(path_type=Path), default=None,
              help="Curriculum folder (with --stage).")
@click.option("--stage", type=click.IntRange(min=0), default=None, help="Stage number (stage-000 is 0).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Instead of a stage: every prompt of this file (what the verl/TRL curriculum samplers index into).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="verl", show_default=True,
              help="verl: verl's RL Parquet; trl: GRPOTrainer's prompt/answer Parquet; jsonl: every column.")
@click.option("--model", default="tiny", show_default=True,
              help="The model cropi rolled out and scored with: trl prompts are chat messages when it has a chat template.")
@click.option("--out", type=OutPath(folder=False), required=True, help="verl/trl: *.parquet; jsonl: *.jsonl[.gz].")
def export_cmd(curriculum_dir, stage, prompts, fmt, model, out):
    """Write a stage (--curriculum and --stage) or a whole prompts file (--prompts) in the format
    verl or TRL reads (or plain JSONL)."""
    from cropi.export import export_prompts, export_stage, has_chat_template

    if (prompts is None) == (curriculum_dir is None or stage is None):
        raise schema.InputError("export", None, None, "give either --curriculum and --stage, or --prompts")
    chat = fmt == "trl" and has_chat_template(model)
    if prompts is not None:
        click.echo(f"wrote {export_prompts(prompts, fmt, out, chat=chat)}")
        return
    click.echo(f"wrote {export_stage(curriculum_dir, stage, fmt, out, chat=chat)}")


from cropi.train.config import click_options as _train_options  # noqa: E402


@main.command("train")
@click.argument("overrides", nargs=-1)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML in a run's config.yaml layout (run options + a `train:` section); KEY=VALUE "
                   "OVERRIDES (e.g. train.lr=1e-3) and flags override it.")
@click.option("--curriculum", "curriculum_dir", type=click.Path(path_type=Path), default=None,
              help="Curriculum folder (stage-000, stage-001, ...).")
@click.option("--model", default=None, help=MODEL_HELP + " [default: tiny]")
@click.option("--target", "targets", type=click.Path(path_type=Path), multiple=True,
              help="Target set (prompts or trajectories; trajectories with --rescore), repeatable: accuracy "
                   "every --eval-every steps, and --rescore's target gradients.")
@click.option("--heldout", type=click.Path(path_type=Path), multiple=True, help="Eval-only set, repeatable.")
@click.option("--run", "run_dir", type=OutPath(folder=True), default=None,
              help="Run folder [default: runs/train-<time>].")
@click.option("--resume", is_flag=True, help="Continue RUN from its latest checkpoint, exactly.")
@click.option("--rescore/--no-rescore", default=None,
              help="When the next stage is missing, score --trajectories with the current checkpoint and select it.")
@click.option("--trajectories", type=click.Path(path_type=Path), default=None, help="--rescore: the offline pool.")
@click.option("--selector", type=click.Choice(SELECTORS), default=None, help="--rescore: the selector [default: popi].")
@click.option("--ratio", type=Finite(0, 1, min_open=True), default=None, help="--rescore: stage fraction [default: 0.1].")
@click.option("--projector", type=click.Choice(["sjlt", "mask-dense", "dense", "identity", "trak", "kron"]), default=None,
              help="--rescore: projector [default: sjlt].")
@click.option("--k", type=click.IntRange(min=1), default=None, help="--rescore: projected dimension [default: 8192].")
@click.option("--device", type=Device(), default=None, help=DEVICE_HELP)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this global step with a checkpoint (continue with --resume).")
@_train_options
def train_cmd(overrides, config_file, curriculum_dir, model, targets, heldout, run_dir, resume, rescore, trajectories,
          selector, ratio, projector, k, device, max_steps, **options):
    """GRPO on the curriculum, stage by stage: metrics, checkpoints, eval, plots in RUN/."""
    import time

    from cropi.train import loop
    from cropi.train.config import resolve_spec

    if run_dir is None:
        if resume:
            raise schema.InputError("--resume", None, "--run", "name the run folder to resume")
        run_dir = schema.check_output(Path("runs") / time.strftime("train-%Y%m%d-%H%M%S"), folder=True)
    resume = resume_or_fresh(resume, run_dir / "config.yaml")
    run_options = dict(curriculum=curriculum_dir, model=model, targets=targets, heldout=heldout, rescore=rescore,
                       trajectories=trajectories, selector=selector, ratio=ratio, projector=projector, k=k)
    spec = resolve_spec(run_dir, resume=resume, config_file=config_file, overrides=overrides,
                             run_options=run_options, train_options=options)
    summary = loop.train(run_dir, spec, resume=resume, max_steps=max_steps, device=device)
    click.echo(json.dumps(summary))
    if summary["stopped"]:
        sys.exit(128 + summary["stopped"])
@main.command("eval")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--target", "targets", type=click.Path(path_type=Path), multiple=True, required=True,
              help="Prompts or trajectories file to evaluate on, repeatable.")
@click.option("--n-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Responses per prompt; pass@k for k = 1, 2, 4, ..., n (needs --temperature > 0).")
@click.option("--temperature", type=Finite(min=0), default=0.0, show_default=True,
              help="0 = greedy: a deterministic accuracy (rollout and train sample at 1.0).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=MAX_NEW_TOKENS, show_default=True,
              help="Generation budget per response (tokens); the same default as rollout and train.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=Device(), default=None, help=DEVICE_HELP)
@click.option("--out", type=OutPath(folder=False), default=None, help="Also write the JSON here [default: stdout only].")
@input_options
@verifier_options
def eval_cmd(model, targets, n_samples, temperature, max_new_tokens, seed, device, out, data_split, verifier,
             partial_credit, **kw):
    """Accuracy (greedy by default) and pass@k per set; JSON to stdout."""
    from cropi.distributed import default_device
    from cropi.evaluate import run_eval

    report = run_eval(model, list(targets), n_samples=n_samples, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, device=default_device(device), out=out,
                      verifier=verifier, partial=partial_credit, columns=_columns(kw), split=data_split)
    click.echo(json.dumps(report))
from cropi.config import METHODS as RUN_METHODS  # noqa: E402


@main.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--root", type=OutPath(folder=True), default=None, help="Output folder [default: runs/NAME].")
@click.option("--method", "methods", type=click.Choice(RUN_METHODS), multiple=True,
              help="Only these methods, repeatable [default: the config's compare.methods].")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True,
              help="Only these seeds, repeatable [default: the config's compare.seeds].")
def run_cmd(config, overrides, root, methods, seeds):
    """The whole loop from a YAML config: data, offline rollout, score/select/train per stage, and
    the baselines beside CROPI on the same budget. Finished parts are skipped; a killed run resumes.

    OVERRIDES are KEY=VALUE pairs on the config's dotted keys, values read as YAML, e.g.
    `train.lr=1e-3 compare.seeds=[0]`. ROOT/config.yaml receives the resolved config."""
    from pipelines import compare, cropi_loop

    cfg = cropi_loop.load_config(config, overrides)
    root = root or schema.check_output(Path("runs") / cfg["name"], folder=True)
    runs = cropi_loop.run(cfg, root, list(methods) or None, list(seeds) or None)
    comp = compare.summarize(root, runs)
    click.echo(compare.table(comp))
    click.echo(f"\nwrote {root}/comparison.md, {root}/comparison.json, {root}/comparison.png")


if __name__ == "__main__":
    main()
