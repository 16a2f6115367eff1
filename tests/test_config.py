"""Run configs: one validated layout for `cropi run` and `cropi train --config`.

Each bad config is refused before any work starts: exit 2, one line `FILE: field KEY: message`,
nothing written. Truths: the messages' named keys and values, the shipped configs, and the
TrainConfig dataclass the `train:` section is derived from.
"""

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from cropi import curriculum, models, tasks
from cropi.cli import main
from cropi.train.config import TrainConfig

GOOD = {  # a valid, small run config
    "name": "cfgtest",
    "data": {"pool": ["chain_sum:difficulty=0"], "pool_per_spec": 4},
    "rollout": {"n": 4},
    "train": {"stages": 1, "steps_per_stage": 1},
}


@pytest.fixture
def no_work(monkeypatch):
    """Make any work past validation fail loudly (a config must be refused before it)."""
    from pipelines import cropi_loop

    def boom(*a, **k):
        raise RuntimeError("work started before the config was validated")

    monkeypatch.setattr(models, "resolve", boom)
    monkeypatch.setattr(cropi_loop, "prepare_data", boom)


def run_cli(tmp_path, text, *overrides):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    root = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", str(path), *overrides, "--root", str(root)])
    return res, path, root


def dump(d) -> str:
    return yaml.safe_dump(d, sort_keys=False)


BAD_FILES = [  # (config text, the one line's expected tail after "FILE: ")
    ("rollout:\n  temprature: 1.0\n",
     "field rollout.temprature: unknown key in the run config; did you mean rollout.temperature?"),
    ("score:\n  projecter: sjlt\n", "field score.projecter: unknown key in the run config; did you mean score.projector?"),
    ("lr: 0.1\n", "field lr: unknown key in the run config; did you mean train.lr?"),
    ("train:\n  lrr: 0.1\n", "field train.lrr: unknown key in the run config; did you mean train.lr?"),
    ("rollout:\n  n: 0\n", "field rollout.n: must be >= 2, got 0"),
    ("rollout:\n  n: 8.5\n", "field rollout.n: expected an integer, got float 8.5"),
    ("rollout:\n  temperature: -1\n", "field rollout.temperature: must be > 0, got -1.0"),
    ("rollout:\n  temperature: .nan\n", "field rollout.temperature: must be a finite number, got nan"),
    ("compare: [full, cropi]\n",
     "field compare: expected a mapping (a section with keys methods, seeds), got a list"),
    ("compare:\n  seeds: 0\n", "field compare.seeds: expected a list of integers, got int 0"),
    ("compare:\n  seeds: [0, 0]\n", "field compare.seeds: 0 given twice"),
    ("compare:\n  methods: [full, bogus]\n",
     "field compare.methods[1]: must be one of full, random, learnability, vcrl, oracle, family-random, cropi-norescore, cropi, got 'bogus'"),
    ("data:\n  targets:\n    ../../../x: default\n",
     "field data.targets: name '../../../x' must be 1-64 letters, digits, _ or - (it becomes a file name)"),
    ("data:\n  heldout:\n    other_test: default\n",
     "field data.heldout.other_test: names ending in _test are the targeted test sets; rename it"),
    ("data:\n  pool: [no_such_task]\n", "field data.pool: unknown task 'no_such_task'"),
    ("name: ../escape\n", "field name: '../escape' is not a safe folder name (letters, digits, . _ -)"),
    ("device: gpu0\n", "field device: 'gpu0' is not cpu, cuda, cuda:N or mps"),
    ("train:\n  seed: 3\n", "field train.seed: set per run by compare.seeds (or seed), not in the train section"),
    ("train:\n  vcrl: true\n", "field train.vcrl: set per method: add vcrl to compare.methods"),
    ("train:\n  lr: -1\n", "field train.lr: must be > 0, got -1.0"),
    ("train:\n  stages: 0\n", "field train.stages: must be >= 1 in a run config (every method trains this many)"),
    ("train:\n  adv_mean: batch\n", "field train.adv_std: group with adv_mean batch is refused"),
    ("train:\n  clip_high: 0.28\n", "field train.clip_high: 0.28 has no effect with mu_updates=1"),
    ("rollout:\n  n: 4\n  n: 8\n", "line 3, column 3: invalid YAML: key 'n' given twice (again on line 3)"),
    ("rollout:\n  n: [1\n", "line 3, column 1: invalid YAML: expected ',' or ']', but got '<stream end>'"),
    ("- a\n- b\n", "must be a YAML mapping of keys, got a list"),
]


@pytest.mark.parametrize("text,message", BAD_FILES, ids=[m[:40] for _, m in BAD_FILES])
def test_bad_run_config_is_one_line_before_any_work(tmp_path, no_work, text, message):
    res, path, root = run_cli(tmp_path, text)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
    assert res.output.startswith(f"cropi: error: {path}: {message}"), res.output
    assert not root.exists()


BAD_OVERRIDES = [
    (["rollout.n=0"], "command line: field rollout.n: must be >= 2, got 0"),
    (["rollout.temprature=1"], "command line: field rollout.temprature: unknown key in the run config; "
                               "did you mean rollout.temperature?"),
    (["train.lr=fast"], "command line: field train.lr: expected a number, got a string"),
    (["compare.seeds=[0"], "override 'compare.seeds=[0': line 1, column 3: invalid YAML: expected ',' or ']'"),
    (["train.lr"], "override 'train.lr': expected KEY=VALUE, e.g. train.lr=1e-3"),
    (["rollout=3"], "command line: field rollout: expected a mapping (a section with keys n, temperature, "
                    "max_new_tokens), got int 3"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_naming_the_command_line(tmp_path, no_work, overrides, message):
    res, _, root = run_cli(tmp_path, dump(GOOD), *overrides)
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith(f"cropi: error: {message}"), res.output
    assert not root.exists()


def test_overrides_are_yaml_values_validated_like_the_file():
    from cropi import config

    base = config.load_run("configs/tiny.yaml")
    got = config.load_run("configs/tiny.yaml", ["train.lr=1e-3", "compare.seeds=[0]", "rollout.n=4",
                                                "data.targets.extra=[count_bits:difficulty=1]"])
    assert got["train"]["lr"] == 0.001 and isinstance(got["train"]["lr"], float)
    assert got["compare"]["seeds"] == [0] and got["rollout"]["n"] == 4
    assert got["data"]["targets"] == {**base["data"]["targets"], "extra": ["count_bits:difficulty=1"]}
    assert "extra" not in base["data"]["targets"]
    for section in ("score", "select", "compare"):
        if section != "compare":
            assert got[section] == base[section]
    assert {k: v for k, v in got["train"].items() if k != "lr"} == {k: v for k, v in base["train"].items() if k != "lr"}


def test_defaults_are_filled_and_the_train_section_is_trainconfig(tmp_path):
    from cropi import config

    path = tmp_path / "minimal.yaml"
    path.write_text("seed: 3\ntrain:\n  stages: 2\n")
    cfg = config.load_run(path)
    assert cfg["name"] == "minimal" and cfg["compare"] == {"methods": ["cropi"], "seeds": [3]}
    assert cfg["rollout"] == {"n": 8, "temperature": 1.0, "max_new_tokens": 16}
    assert cfg["data"]["targets"] == {"target": "default"} and cfg["data"]["columns"] == {
        "prompt": None, "answer": None, "id": None}
    want = {k: v for k, v in TrainConfig(stages=2).to_dict().items() if k not in ("seed", "vcrl")}
    assert cfg["train"] == want
    layout = {k.name: k for k in config.run_layout().keys}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("seed", "vcrl"):
            assert f"train.{f.name}" not in layout
        else:
            key = layout[f"train.{f.name}"]
            assert (key.default, key.help, key.choices) == (f.default, f.metadata["help"], f.metadata["choices"])
    for shipped in ("configs/tiny.yaml", "configs/qwen2.5-1.5b.yaml"):
        assert config.load_run(shipped)["name"] == shipped.split("/")[1][: -len(".yaml")]


def test_run_writes_the_resolved_config_and_refuses_a_folder_made_otherwise(tmp_path, monkeypatch):
    from pipelines import cropi_loop

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(models, "resolve", stop)
    path = tmp_path / "cfg.yaml"
    path.write_text(dump(GOOD))
    root = tmp_path / "out"
    with pytest.raises(Stop):
        cropi_loop.run(path, root, overrides=["train.lr=0.001"])
    written = yaml.safe_load((root / "config.yaml").read_text())
    from cropi import config

    assert written == config.load_run(path, ["train.lr=0.001"])
    assert written["train"]["lr"] == 0.001 and written["select"] == {"ratio": 0.1}
    # same settings (other seeds may be added): accepted; other settings: refused, folder untouched
    with pytest.raises(Stop):
        cropi_loop.run(path, root, overrides=["train.lr=0.001", "compare.seeds=[0, 1]"])
    res = CliRunner().invoke(main, ["run", str(path), "train.lr=0.01", "--root", str(root)])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert (f"{root / 'config.yaml'}: field train.lr: this folder was made with 0.001, the config now gives 0.01"
            in res.output)
    assert yaml.safe_load((root / "config.yaml").read_text())["compare"]["seeds"] == [0, 1]


# ---------------------------------------------------------------------------- cropi train --config


@pytest.fixture(scope="module")
def cur(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgtrain")
    curriculum.write_stage(root / "cur", tasks.make_pool(["chain_sum:difficulty=0"], 4, 0, "train"),
                           {"selector": "test"})
    return root / "cur"


@pytest.mark.parametrize("text,overrides,message", [
    ("curriculm: {cur}\n", [], "{cfg}: field curriculm: unknown key in the train config; did you mean curriculum?"),
    ("curriculum: {cur}\ntrain:\n  lrr: 1\n", [], "{cfg}: field train.lrr: unknown key in the train config; "
                                                 "did you mean train.lr?"),
    ("curriculum: {cur}\n", ["train.group_size=1"], "command line: field train.group_size: must be >= 2 "
                                                    "(advantages need a group), got 1"),
    ("curriculum: {cur}\nratio: 0\n", [], "{cfg}: field ratio: must be > 0, got 0.0"),
    ("curriculum: {cur}\nselector: best\n", [], "{cfg}: field selector: must be one of popi, random"),
    ("curriculum: [a]\n", [], "{cfg}: field curriculum: expected a string, got a list"),
])
def test_bad_train_config_is_one_line(tmp_path, cur, text, overrides, message):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text.format(cur=cur))
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), *overrides, "--run", str(tmp_path / "run")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith("cropi: error: " + message.format(cfg=cfg)), res.output
    assert not (tmp_path / "run").exists()


def test_train_writes_its_resolved_config(tmp_path, cur, monkeypatch):
    from cropi.train import loop

    monkeypatch.setattr(loop, "plot_curves", lambda *a: None)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"curriculum: {cur}\ntrain:\n  group_size: 2\n  max_new_tokens: 4\n  eval_every: 0\n")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), "train.batch_prompts=2", "combine=rrf",
                                    "--steps-per-stage", "1", "--run", str(run)])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    want = TrainConfig(group_size=2, max_new_tokens=4, eval_every=0, batch_prompts=2, steps_per_stage=1, stages=1)
    assert saved["train"] == want.to_dict()
    assert saved["combine"] == "rrf" and saved["curriculum"] == str(cur) and saved["model"] == models.TINY
    assert json.loads(res.output.splitlines()[-1])["step"] == 1
    # resuming with an override that differs from the run's settings is refused
    again = CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "train.lr=0.5"])
    assert again.exit_code == 2 and "field lr: --resume: given 0.5, but the run has 0.0001" in again.output


# ---------------------------------------------------------------------------- one config form


def test_every_settings_dataclass_is_declared_with_config_keys():
    """TrainConfig, RunSpec, ScoreConfig and GradConfig declare every plain field as a config Key
    (only nested settings objects are not): one description, one checker."""
    from cropi import config
    from cropi.policy_grad import GradConfig
    from cropi.score import ScoreConfig
    from cropi.train.config import RunSpec

    for cls, nested in ((TrainConfig, ()), (RunSpec, ("train",)), (ScoreConfig, ("grad",)), (GradConfig, ())):
        names = [f.name for f in dataclasses.fields(cls)]
        assert [k.name for k in config.keys_of(cls)] == [n for n in names if n not in nested], cls


@pytest.mark.parametrize("key,value", [("lr", 0), ("group_size", 1), ("clip_low", 1.0), ("vcrl_kappa", 1.5),
                                       ("seed", 1.5), ("adv_std", "mean"), ("dynamic_sampling", "yes"),
                                       ("rlve_tau_acc", 0.0)])
def test_a_trainer_option_is_refused_alike_in_yaml_and_in_python(tmp_path, key, value):
    """The same check and the same words for `train.KEY` in RUN/config.yaml and TrainConfig(KEY=...)."""
    from cropi import config, schema

    with pytest.raises(ValueError) as py:
        TrainConfig.from_dict({key: value})
    with pytest.raises(schema.InputError) as yml:
        config.resolve({"curriculum": "cur", "train": {key: value}}, config.train_layout(), "cfg.yaml")
    assert str(yml.value) == f"cfg.yaml: field train.{str(py.value)}"


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k: must be >= 1, got 0"),
    ({"projector": "bogus"}, "projector: must be one of sjlt, mask-dense, dense, identity, trak, kron, got 'bogus'"),
    ({"combine": "sum"}, "combine: must be one of mean, max, rrf, got 'sum'"),
    ({"density": 1.5}, "density: must be <= 1, got 1.5"),
    ({"influence_eps": (1e-3, -1.0)}, "influence_eps[1]: must be > 0, got -1.0"),
    ({"dtype": "fp8"}, "dtype: must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"shard_size": 2.5}, "shard_size: expected an integer, got float 2.5"),
])
def test_score_config_is_checked_when_made(kwargs, message):
    from cropi.score import ScoreConfig

    with pytest.raises(ValueError) as e:
        ScoreConfig(**kwargs)
    assert str(e.value) == message
    assert ScoreConfig(influence_eps=[1, 2]).influence_eps == (1.0, 2.0)  # normalised like YAML values


@pytest.mark.parametrize("kwargs,message", [
    ({"ratio_clip": float("nan")}, "ratio_clip: must be a finite number, got nan"),
    ({"ratio_clip": 0.0}, "ratio_clip: must be > 0, got 0.0"),
    ({"aggregation": "sum"}, "aggregation: must be one of seq-mean-token-mean, token-mean, got 'sum'"),
    ({"temperature": -1}, "temperature: must be > 0, got -1.0"),
])
def test_grad_config_is_checked_when_made(kwargs, message):
    from cropi.policy_grad import GradConfig

    with pytest.raises(ValueError) as e:
        GradConfig(**kwargs)
    assert str(e.value) == message


def test_no_import_circle_between_config_loop_and_stages():
    """The train layout is built without the training loop, and the stage code's RunSpec is a
    real import (not one hidden behind TYPE_CHECKING)."""
    import subprocess
    import sys

    code = ("import sys, typing; from cropi import config; config.train_layout(); "
            "assert 'cropi.train.loop' not in sys.modules, 'config imported the loop'; "
            "from cropi.train import stages; typing.get_type_hints(stages.open_stage); "
            "assert 'cropi.train.loop' not in sys.modules, 'stages imported the loop'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
