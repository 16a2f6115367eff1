"""`cropi` command line: parses options and calls one library function per command.

Bad input (cropi.schema.InputError, missing files/models, invalid options) exits 2 with one
line on stderr; everything else is the library's business.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cropi import schema

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL_HELP = "`tiny` (the embedded default, built on first use) or a local HF model folder / cached hub name."


class CropiGroup(click.Group):
    """Turns user-input errors into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (schema.InputError, FileNotFoundError, ValueError) as e:
            if isinstance(e, ValueError) and not isinstance(e, schema.InputError) and not getattr(e, "user_facing", True):
                raise
            click.echo(f"cropi: error: {e}".splitlines()[0], err=True)
            ctx.exit(2)


@click.group(cls=CropiGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cropi")
def main():
    """Influence-guided data selection for RLVR (CROPI).

    \b
    Typical flow:
      cropi tasks make --task basic_arithmetic --n 500 --out pool.parquet
      cropi rollout --prompts pool.parquet --n 8 --out traj.parquet
      cropi score --trajectories traj.parquet --target val.parquet --out scores/
      cropi select --scores scores/ --ratio 0.1 --out curriculum/
      cropi train --curriculum curriculum/ --rescore
    or all of it: cropi run configs/tiny.yaml
    """


# ---------------------------------------------------------------------------- check


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(schema.KINDS), default=None, help="Table kind (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def check(file, kind, as_json):
    """Validate a prompts / trajectories / scores file (Parquet, JSONL, datasets folder) and summarise it."""
    table = schema.read_table(file, kind)
    summary = schema.summarize(table, kind or schema.detect_kind(table))
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
    """List usable task names."""
    from cropi import tasks as T

    for name in T.list_tasks():
        click.echo(name)


@tasks.command("make")
@click.option("--task", "specs", multiple=True, required=True,
              help="NAME[:key=value,...], repeatable; e.g. basic_arithmetic:difficulty=2.")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Prompts per --task.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def tasks_make(specs, n, seed, split, out):
    """Generate a prompts pool mixing tasks and difficulties (same seed => byte-identical file)."""
    from cropi import tasks as T

    table = T.make_pool(list(specs), n, seed, split)
    schema.write_parquet_atomic(table, out, metadata={"kind": "prompts", "specs": list(specs), "n": n, "seed": seed, "split": split})
    click.echo(f"wrote {table.num_rows} prompts to {out}")


# ---------------------------------------------------------------------------- models


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder (default: the tiny-model cache).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Max supervised steps.")
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
    kw = {} if steps is None else {"max_steps": steps}
    info = run_warmup(out=out, seed=seed, **kw)
    click.echo(json.dumps(info))


# ---------------------------------------------------------------------------- rollout


@main.command()
@click.option("--prompts", type=click.Path(path_type=Path), required=True, help="Prompts file (any supported format).")
@click.option("--model", default="tiny", show_default=True, help=MODEL_HELP)
@click.option("--n", "--num-responses", "n", type=click.IntRange(min=1), default=8, show_default=True,
              help="Responses per prompt (G). Under torchrun use --num-responses (torchrun eats --n).")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per resumable chunk.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N prompts.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available, else cpu).")
@click.option("--resume", is_flag=True, help="Keep finished chunks of an interrupted run.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def rollout(prompts, model, n, temperature, top_p, max_new_tokens, seed, chunk, limit, device, resume, out):
    """Sample G responses per prompt, reward them, store tokens and behaviour log-probs."""
    from cropi import rollout as R
    from cropi.distributed import barrier, default_device, dist_context

    with dist_context() as (rank, world):
        R.rollout(prompts, out, model=model, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  seed=seed, chunk=chunk, limit=limit, device=default_device(device), resume=resume, rank=rank, world=world)
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
@click.option("--k", type=click.IntRange(min=1), default=8192, show_default=True, help="Projected dimension.")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True, help="mask-dense: kept ratio ρ.")
@click.option("--s", "--sjlt-s", "sjlt_s", type=click.IntRange(min=1), default=1, show_default=True,
              help="sjlt: nonzeros per coordinate (--sjlt-s under torchrun).")
@click.option("--dist", type=click.Choice(["rademacher", "gaussian"]), default="rademacher", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Projection and sub-sampling seed.")
@click.option("--params", default="all", show_default=True, help="all | last:N | regex on parameter names.")
@click.option("--aggregation", type=click.Choice(["seq-mean-token-mean", "token-mean"]), default="seq-mean-token-mean", show_default=True)
@click.option("--adv-std", type=click.Choice(["group", "batch", "none"]), default="group", show_default=True)
@click.option("--ratio-clip", type=click.FloatRange(min=0, min_open=True), default=None, help="Truncate importance ratios at c.")
@click.option("--combine", type=click.Choice(["mean", "max", "rrf"]), default="mean", show_default=True)
@click.option("--max-target", type=click.IntRange(min=1), default=None, help="Prompts per target set (seeded sample).")
@click.option("--shard-size", type=click.IntRange(min=1), default=64, show_default=True, help="Prompts per resumable shard.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per batched backward.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Responses per vmap unit / per backward of the per-layer path (lower it if memory runs out).")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--check-rank", type=click.IntRange(min=0), default=0, help="Exact-vs-projected check on N prompts.")
@click.option("--dtype", "compute_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Forward/backward dtype (projections accumulate in fp32) [default: fp32 on CPU, bf16 on CUDA].")
@click.option("--adapter", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="PEFT LoRA adapter folder: score gradients of the adapter parameters only (as LESS does).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute each block's forward in the backward (less memory).")
@click.option("--grad-path", type=click.Choice(["auto", "per-layer", "vmap"]), default="auto", show_default=True,
              help="Per-prompt gradients by per-layer hooks in one batched backward, or by vmap (small models); "
                   "auto picks and records why in meta.json.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available, else cpu).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (settings must match).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def score(trajectories, targets, model, behavior_model, projector, k, density, sjlt_s, dist, seed, params, aggregation,
          adv_std, ratio_clip, combine, max_target, shard_size, batch, micro_batch, feature_dtype, check_rank,
          compute_dtype, adapter, grad_checkpointing, grad_path, device, resume, overwrite, out):
    """Per-prompt off-policy policy gradients -> projection -> cosine with target gradients."""
    from cropi import score as S
    from cropi.distributed import default_device, dist_context
    from cropi.policy_grad import GradConfig

    cfg = S.ScoreConfig(projector=projector, k=k, seed=seed, density=density, s=sjlt_s, dist=dist, combine=combine,
                        max_target=max_target, shard_size=shard_size, batch=batch, micro_batch=micro_batch,
                        feature_dtype=feature_dtype, check_rank=check_rank, dtype=compute_dtype,
                        adapter=str(adapter) if adapter else None, grad_checkpointing=grad_checkpointing,
                        grad_path=grad_path,
                        grad=GradConfig(aggregation=aggregation, adv_std=adv_std, ratio_clip=ratio_clip, params=params))
    with dist_context() as (rank, world):
        meta = S.score(trajectories, list(targets), out, model=model, behavior_model=behavior_model, cfg=cfg,
                       resume=resume, overwrite=overwrite, device=default_device(device), rank=rank, world=world)
    if rank == 0:
        click.echo(f"wrote {out}/scores.parquet: {meta['pool_size']} prompts {meta['status']}, "
                   f"{meta['prompts_per_s']} prompts/s")
        if "check_rank" in meta:
            cr = meta["check_rank"]
            click.echo(f"check-rank on {cr['n']} prompts: precision@10% {cr['precision']:.3f}, Spearman {cr['spearman']:.3f}")


# ---------------------------------------------------------------------------- select / curriculum / export


@main.command("select")
@click.option("--scores", "scores_dir", type=click.Path(path_type=Path), default=None, help="`cropi score` output folder (popi needs it).")
@click.option("--trajectories", type=click.Path(path_type=Path), default=None,
              help="Pool for selectors that need no scores (default: the file --scores points to).")
@click.option("--selector", default="popi", show_default=True, help="popi | random | learnability | variance | pass-band | full")
@click.option("--ratio", type=float, default=None, help="Fraction of the pool in (0, 1] [default: 0.1].")
@click.option("--n", type=int, default=None, help="Stage size instead of --ratio.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stratify", default=None, help="Keep this column's shares of the pool, e.g. task.")
@click.option("--kappa", type=float, default=0.8, show_default=True, help="variance: keep p >= kappa.")
@click.option("--band", type=(float, float), default=(0.2, 0.8), show_default=True, help="pass-band: LO HI.")
@click.option("--exclude-previous", is_flag=True, help="Keep prompts chosen in earlier stages out.")
@click.option("--checkpoint", default=None, help="Override the checkpoint recorded from the scores.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Curriculum folder; a stage-NNN is appended.")
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
@click.option("--curriculum", "curriculum_dir", type=click.Path(path_type=Path), required=True)
@click.option("--stage", type=int, required=True)
@click.option("--format", "fmt", default="verl", show_default=True, help="verl | trl | jsonl")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def export_cmd(curriculum_dir, stage, fmt, out):
    """Write a stage in the format verl or TRL reads (or plain JSONL)."""
    from cropi.export import export_stage

    click.echo(f"wrote {export_stage(curriculum_dir, stage, fmt, out)}")


def _not_yet(name: str, issue: str):
    @main.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                  help=f"(not available yet: {issue})")
    def _cmd():
        click.echo(f"cropi {name}: not available yet ({issue})", err=True)
        sys.exit(2)

    return _cmd


from cropi.train.config import click_options as _train_options  # noqa: E402


@main.command("train")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML in a run's config.yaml layout (run options + a `train:` section); flags override it.")
@click.option("--curriculum", "curriculum_dir", type=click.Path(path_type=Path), default=None,
              help="Curriculum folder (stage-000, stage-001, ...).")
@click.option("--model", default=None, help=MODEL_HELP + " [default: tiny]")
@click.option("--target", "targets", type=click.Path(path_type=Path), multiple=True,
              help="Target set (prompts or trajectories; trajectories with --rescore), repeatable: accuracy "
                   "every --eval-every steps, and --rescore's target gradients.")
@click.option("--heldout", type=click.Path(path_type=Path), multiple=True, help="Eval-only set, repeatable.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder [default: runs/train-<time>].")
@click.option("--resume", is_flag=True, help="Continue RUN from its latest checkpoint, exactly.")
@click.option("--rescore/--no-rescore", default=None,
              help="When the next stage is missing, score --trajectories with the current checkpoint and select it.")
@click.option("--trajectories", type=click.Path(path_type=Path), default=None, help="--rescore: the offline pool.")
@click.option("--selector", default=None, help="--rescore: popi | random | learnability | variance | pass-band | full [default: popi].")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), default=None, help="--rescore: stage fraction [default: 0.1].")
@click.option("--projector", type=click.Choice(["sjlt", "mask-dense", "dense", "identity", "trak", "kron"]), default=None,
              help="--rescore: projector [default: sjlt].")
@click.option("--k", type=click.IntRange(min=1), default=None, help="--rescore: projected dimension [default: 8192].")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this global step with a checkpoint (continue with --resume).")
@_train_options
def train_cmd(config_file, curriculum_dir, model, targets, heldout, run_dir, resume, rescore, trajectories, selector, ratio,
          projector, k, device, max_steps, **options):
    """GRPO on the curriculum, stage by stage: metrics, checkpoints, eval, plots in RUN/."""
    import time

    from cropi.train import loop

    if run_dir is None:
        if resume:
            raise schema.InputError("--resume", None, "--run", "name the run folder to resume")
        run_dir = Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    run_options = dict(curriculum=curriculum_dir, model=model, targets=targets, heldout=heldout, rescore=rescore,
                       trajectories=trajectories, selector=selector, ratio=ratio, projector=projector, k=k)
    spec = loop.resolve_spec(run_dir, resume=resume, config_file=config_file, run_options=run_options,
                             train_options=options)
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
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
def eval_cmd(model, targets, n_samples, temperature, max_new_tokens, seed, device, out):
    """Accuracy (greedy by default) and pass@k per set; JSON to stdout."""
    from cropi.distributed import default_device
    from cropi.evaluate import run_eval

    report = run_eval(model, list(targets), n_samples=n_samples, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, device=default_device(device), out=out)
    click.echo(json.dumps(report))
@main.command("run")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), default=None, help="Output folder (default: runs/NAME).")
@click.option("--method", "methods", multiple=True, help="Only these methods (default: the config's compare.methods).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Only these seeds (default: the config's compare.seeds).")
def run_cmd(config, root, methods, seeds):
    """The whole loop from a YAML config: data, offline rollout, score/select/train per stage, and
    the baselines beside CROPI on the same budget. Finished parts are skipped; a killed run resumes."""
    from pipelines import compare, cropi_loop

    cfg = cropi_loop.load_config(config)
    root = root or Path("runs") / cfg["name"]
    runs = cropi_loop.run(config, root, list(methods) or None, list(seeds) or None)
    comp = compare.summarize(root, runs)
    click.echo(compare.table(comp))
    click.echo(f"\nwrote {root}/comparison.md, {root}/comparison.json, {root}/comparison.png")


if __name__ == "__main__":
    main()
