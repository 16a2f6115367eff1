"""The CLI explains itself: every subcommand's --help lists its choices and defaults, shell
completion offers the choices, and --quiet / --verbose reach the progress display."""

from __future__ import annotations

import inspect
import os

import click
import pytest
from click.testing import CliRunner

from cropi.cli import main


def _commands(group=main, prefix=("cropi",)):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


COMMANDS = list(_commands())


def _help_record(cmd, path, opt):
    ctx = click.Context(cmd, info_name=" ".join(path))
    return " ".join(opt.get_help_record(ctx) or ("", ""))


def test_every_command_is_covered():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"cropi check", "cropi rollout", "cropi score", "cropi select", "cropi train", "cropi eval",
            "cropi export", "cropi run", "cropi warmup", "cropi tasks make", "cropi curriculum show"} <= names


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p[1:]) for p, _ in COMMANDS])
def test_help_lists_choices_and_defaults(path, cmd):
    r = CliRunner().invoke(main, list(path[1:]) + ["--help"])
    assert r.exit_code == 0, r.output
    text = "".join(r.output.split())  # wrapping may break lines at spaces and hyphens
    for opt in cmd.params:
        if not isinstance(opt, click.Option) or opt.name == "help":
            continue
        record = " ".join(_help_record(cmd, path, opt).split())
        assert "".join(record.split()) in text  # what the record says is what --help prints
        if isinstance(opt.type, click.Choice):
            for choice in opt.type.choices:
                assert choice in record, f"{opt.name}: choice {choice!r} not listed"
        unset = opt.default is None or type(opt.default).__name__ == "Sentinel"  # click 8.2+: UNSET
        given = not unset and not opt.required and not opt.is_flag and not opt.multiple
        if given:
            assert "default:" in record, f"{' '.join(path)} {opt.opts[0]}: default {opt.default!r} not shown"


def test_fixed_sets_are_choices_from_the_library():
    from cropi.export import FORMATS
    from cropi.select import SELECTORS
    from pipelines.cropi_loop import METHODS

    opts = {(" ".join(p), o.name): o for p, c in COMMANDS for o in c.params}
    assert tuple(opts[("cropi select", "selector")].type.choices) == SELECTORS
    assert tuple(opts[("cropi train", "selector")].type.choices) == SELECTORS
    assert tuple(opts[("cropi export", "fmt")].type.choices) == FORMATS
    assert tuple(opts[("cropi run", "methods")].type.choices) == METHODS


def test_one_generation_budget_and_warmup_default():
    from cropi import rollout
    from cropi.evaluate import run_eval
    from cropi.runtime import MAX_NEW_TOKENS
    from cropi.train.config import TrainConfig
    from cropi.warmup import warmup

    opts = {(" ".join(p), o.name): o for p, c in COMMANDS for o in c.params}
    assert opts[("cropi rollout", "max_new_tokens")].default == MAX_NEW_TOKENS
    assert opts[("cropi eval", "max_new_tokens")].default == MAX_NEW_TOKENS
    assert TrainConfig().max_new_tokens == MAX_NEW_TOKENS
    assert inspect.signature(rollout.rollout).parameters["max_new_tokens"].default == MAX_NEW_TOKENS
    assert inspect.signature(run_eval).parameters["max_new_tokens"].default == MAX_NEW_TOKENS
    # the CLI shows the library's warm-up recipe, not a copy that can drift
    assert opts[("cropi warmup", "steps")].default == inspect.signature(warmup).parameters["max_steps"].default
    r = CliRunner().invoke(main, ["train", "--help"])
    assert f"[default: {MAX_NEW_TOKENS}]" in " ".join(r.output.split())


def test_completion_script_and_choice_completion():
    r = CliRunner().invoke(main, [], prog_name="cropi", env={"_CROPI_COMPLETE": "bash_source"})
    assert "_cropi_completion" in r.output and "complete " in r.output
    env = {"_CROPI_COMPLETE": "bash_complete", "COMP_WORDS": "cropi select --selector ", "COMP_CWORD": "3"}
    r = CliRunner().invoke(main, [], prog_name="cropi", env=env)
    offered = {line.split(",", 1)[1] for line in r.output.splitlines() if "," in line}
    assert {"popi", "random", "learnability", "variance", "pass-band", "full"} <= offered


@pytest.mark.parametrize("flag,var", [("--quiet", "CROPI_QUIET"), ("--verbose", "CROPI_VERBOSE"),
                                      ("-q", "CROPI_QUIET"), ("-v", "CROPI_VERBOSE")])
def test_quiet_and_verbose_set_the_env_form(flag, var, monkeypatch):
    from cropi import runtime

    monkeypatch.setenv("CROPI_QUIET", "0")  # recorded, so the flag's "1" is undone after the test
    monkeypatch.setenv("CROPI_VERBOSE", "0")
    r = CliRunner().invoke(main, [flag, "tasks", "list"])
    assert r.exit_code == 0, r.output
    assert os.environ.get(var) == "1"
    assert runtime.verbosity() == (0 if var == "CROPI_QUIET" else 2)
