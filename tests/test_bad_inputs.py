"""Bad inputs and options: exit code 2, exactly one line on stderr naming file / row / field,
no traceback, and nothing written (the case's folder holds the same files before and after).
Plus the output guarantees: plain-umask permissions, reproducible trainer_state.pt, no
temporary plot left by SIGTERM, a relative input path that still resolves, and real bugs that
keep their traceback.
"""

import gzip
import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cropi import cli, curriculum, models, schema
from cropi.cli import main


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart


def prompt_rows(n, seed=0):
    return [{"id": f"p{seed}-{i}", "prompt": f"{i} + {seed} =\n", "answer": str(i + seed), "task": "t",
             "difficulty": 0, "split": "train"} for i in range(n)]


def traj_rows(n, seed, reward_seed=None):
    """n trajectories rows of 4 responses with reward variance (ids depend on `seed` only)."""
    rng = np.random.default_rng(seed if reward_seed is None else reward_seed)
    rows = []
    for row in prompt_rows(n, seed):
        rewards = rng.integers(0, 2, 4).astype(float).tolist()
        if len(set(rewards)) == 1:
            rewards[0] = 1 - rewards[0]
        rows.append({**row, "behavior": "x", "rewards": rewards,
                     "responses": [f"Answer: {int(v)}" for v in rng.integers(0, 99, 4)]})
    return rows


def write(rows, path, keep=None):
    """Rows as a Parquet file; `keep` rows of them only (0: a valid table with no rows)."""
    schema.write_parquet_atomic(pa.Table.from_pylist(rows).slice(0, keep), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_policy):
    """A small model, prompts, a pool and a target set, and their `cropi score` output S/."""
    d = tmp_path_factory.mktemp("bad")
    models.save(small_policy.model, small_policy.tokenizer, d / "model", {"kind": "tiny"})
    write(prompt_rows(4), d / "prompts.parquet")
    write(traj_rows(8, 0), d / "pool.parquet")
    write(traj_rows(6, 1), d / "tgt.parquet")
    r = runner().invoke(main, score_args(d / "pool.parquet", d / "S", d / "tgt.parquet", d / "model"))
    assert r.exit_code == 0, r.output
    return d


def score_args(pool, out, target="tgt.parquet", model="model", *extra):
    return ["score", "--trajectories", str(pool), "--target", str(target), "--model", str(model), "--k", "16",
            "--shard-size", "4", "--batch", "4", *extra, "--out", str(out)]


def rollout_args(env, prompts, out, *extra):
    return ["rollout", "--prompts", str(prompts), "--model", str(env / "model"), "--n", "2",
            "--max-new-tokens", "4", *extra, "--out", str(out)]


def score_in(env, tmp, *extra, pool=None, out=None):
    return score_args(pool or env / "pool.parquet", out or tmp / "s", env / "tgt.parquet", env / "model", *extra)


def interrupted_store(env, tmp):
    """A copy of the fixture's score output as a killed run leaves it: no scores, no meta.json,
    the last pool shard missing."""
    s = tmp / "s"
    shutil.copytree(env / "S", s)
    for f in ("scores.parquet", "meta.json", "features/index.parquet", "features/shard-00001.npy",
              "features/shard-00001.parquet"):
        (s / f).unlink()
    return s


# ---------------------------------------------------------------------------- case builders
# Each takes (env, tmp) and returns (argv, substrings the one stderr line must hold).


def non_utf8_jsonl(env, tmp):
    f = tmp / "prompts.jsonl"
    f.write_bytes(b'{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "3"}\n')
    return rollout_args(env, f, tmp / "o.parquet"), ["prompts.jsonl", "row 1", "not UTF-8"]


def not_gzip(env, tmp):
    f = tmp / "prompts.jsonl.gz"
    f.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    return rollout_args(env, f, tmp / "o.parquet"), ["prompts.jsonl.gz", "not a gzip file"]


def truncated_gzip(env, tmp):
    f = tmp / "prompts.jsonl.gz"
    data = gzip.compress("".join(json.dumps({"prompt": f"{i} =", "answer": str(i)}) + "\n" for i in range(200)).encode())
    f.write_bytes(data[: len(data) // 2])
    return rollout_args(env, f, tmp / "o.parquet"), ["prompts.jsonl.gz", "truncated"]


def zero_row_prompts(env, tmp):
    f = write(prompt_rows(2), tmp / "p0.parquet", keep=0)
    return rollout_args(env, f, tmp / "o.parquet"), ["p0.parquet", "no rows"]


def jsonl_float_difficulty(env, tmp):
    f = tmp / "prompts.jsonl"
    f.write_text('{"prompt": "1 + 1 =", "answer": "2", "difficulty": 1.5}\n')
    return rollout_args(env, f, tmp / "o.parquet"), ["prompts.jsonl", "row 0", "field difficulty", "1.5"]


def parquet_text_difficulty(env, tmp):
    f = tmp / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "difficulty": "3"} for r in prompt_rows(2)]), f)
    return rollout_args(env, f, tmp / "o.parquet"), ["prompts.parquet", "row 0", "field difficulty", "text"]


def out_is_a_folder(env, tmp):
    (tmp / "o.parquet").mkdir()
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet"), ["--out", "o.parquet", "is a folder"]


def out_under_a_file(env, tmp):
    (tmp / "f").write_text("x")
    return rollout_args(env, env / "prompts.parquet", tmp / "f" / "o.parquet"), ["--out", "f", "is a file"]


def out_in_read_only_folder(env, tmp):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere; a read-only file system still refuses
        ro = Path("/sys/cropi-test")
        if os.access("/sys", os.W_OK) and not Path("/sys/class").is_dir():
            pytest.skip("no read-only folder available to this user")
    return rollout_args(env, env / "prompts.parquet", ro / "o.parquet"), ["--out", "cannot create files in this folder"]


def score_out_is_a_file(env, tmp):
    (tmp / "s").write_text("x")
    return score_in(env, tmp), ["--out", "s: is a file; this output is a folder"]


def select_out_is_a_file(env, tmp):
    (tmp / "cur").write_text("x")
    return ["select", "--scores", str(env / "S"), "--out", str(tmp / "cur")], ["--out", "cur: is a file"]


def train_run_is_a_file(env, tmp):
    (tmp / "run").write_text("x")
    return ["train", "--curriculum", str(tmp / "none"), "--run", str(tmp / "run")], ["--run", "run: is a file"]


def params_bad_regex(env, tmp):
    return score_in(env, tmp, "--params", "["), ["--params", "not a regular expression"]


def params_last_0(env, tmp):
    return score_in(env, tmp, "--params", "last:0"), ["--params", "last:0", "N ≥ 1"]


def params_last_minus_1(env, tmp):
    return score_in(env, tmp, "--params", "last:-1"), ["--params", "last:-1", "N ≥ 1"]


def temperature_nan(env, tmp):
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet", "--temperature", "nan"), ["--temperature", "nan"]


def temperature_zero(env, tmp):
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet", "--temperature", "0"), ["--temperature", "x>0"]


def temperature_inf(env, tmp):
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet", "--temperature", "inf"), ["--temperature", "finite"]


def top_p_nan(env, tmp):
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet", "--top-p", "nan"), ["--top-p", "finite"]


def device_bogus(env, tmp):
    return rollout_args(env, env / "prompts.parquet", tmp / "o.parquet", "--device", "bogus"), ["--device", "bogus"]


def ratio_clip_nan(env, tmp):
    return score_in(env, tmp, "--ratio-clip", "nan"), ["--ratio-clip", "finite"]


def k_larger_than_d(env, tmp):
    return score_in(env, tmp, "--k", "10000000"), ["--k", "10000000", "dimensions"]


def zero_row_trajectories(env, tmp):
    f = write(traj_rows(2, 0), tmp / "t0.parquet", keep=0)
    return score_in(env, tmp, pool=f), ["t0.parquet", "no rows"]


def token_ids_differ_in_second_response(env, tmp):
    tok = models.load(str(env / "model")).tokenizer
    rows = traj_rows(3, 0)
    for row in rows:
        row["response_token_ids"] = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in row["responses"]]
    rows[0]["response_token_ids"][1] = tok("Answer: zzz", add_special_tokens=False)["input_ids"]
    f = write(rows, tmp / "pool.parquet")
    return score_in(env, tmp, pool=f), ["pool.parquet", "row 0", "field response_token_ids", "response 1"]


def pickled_feature_shard(env, tmp):
    s = interrupted_store(env, tmp)
    (s / "features" / "shard-00000.npy").write_bytes(pickle.dumps({"features": [1.0, 2.0]}))
    return score_in(env, tmp, "--resume", out=s), ["shard-00000.npy", "not a .npy"]


def pickled_store_meta(env, tmp):
    s = interrupted_store(env, tmp)
    (s / "features" / "meta.json").write_bytes(pickle.dumps({"k": 16}))
    return score_in(env, tmp, "--resume", out=s), ["features/meta.json", "not a JSON file"]


def select_unrelated_trajectories(env, tmp):
    other = write(traj_rows(8, 0, reward_seed=7), tmp / "other.parquet")  # same ids, another rollout
    return (["select", "--scores", str(env / "S"), "--trajectories", str(other), "--out", str(tmp / "cur")],
            ["other.parquet", "is not the trajectories", "scored"])


def resume_on_replaced_trajectories(env, tmp):
    pool = write(traj_rows(8, 0), tmp / "pool.parquet")
    out = tmp / "s"
    r = runner().invoke(main, score_in(env, tmp, pool=pool, out=out))
    assert r.exit_code == 0, r.output
    for f in ("scores.parquet", "meta.json", "features/index.parquet", "features/shard-00001.npy",
              "features/shard-00001.parquet"):
        (out / f).unlink()
    write(traj_rows(8, 0, reward_seed=7), pool)  # same path and ids, other content
    return score_in(env, tmp, "--resume", pool=pool, out=out), ["features", "source_sha256", "pool.parquet", "not the file"]


def _broken_datasets_folder(tmp):
    d = tmp / "ds"
    d.mkdir()
    (d / "state.json").write_text("{}")  # looks like a save_to_disk folder, is not one
    return d


def check_broken_datasets_folder(env, tmp):
    return ["check", str(_broken_datasets_folder(tmp))], ["ds", "not a readable saved `datasets` dataset"]


def rollout_broken_datasets_folder(env, tmp):
    return rollout_args(env, _broken_datasets_folder(tmp), tmp / "o.parquet"), ["ds", "not a readable saved"]


def select_negative_seed(env, tmp):
    return ["select", "--scores", str(env / "S"), "--seed", "-1", "--out", str(tmp / "cur")], ["--seed", "≥ 0", "-1"]


def score_model_folder_without_tokenizer(env, tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text("{}")
    return score_in(env, tmp, "--model", str(tmp / "m")), ["m: not a model cropi can load"]


def score_folder_without_config(env, tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "weights.bin").write_bytes(b"x")
    return score_in(env, tmp, "--model", str(tmp / "m")), ["m: not a model cropi can load", "config.json"]


def score_empty_token_list(env, tmp):
    tok = models.load(str(env / "model")).tokenizer
    rows = traj_rows(3, 0)
    for row in rows:
        row["response_token_ids"] = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in row["responses"]]
    rows[1]["responses"][2], rows[1]["response_token_ids"][2] = "", []
    f = write(rows, tmp / "pool.parquet")
    return score_in(env, tmp, pool=f), ["pool.parquet", "row 1", "field response_token_ids", "response 2: empty token list"]


def train_missing_target(env, tmp):
    from cropi import tasks

    curriculum.write_stage(tmp / "cur", tasks.make_pool(["count_bits:difficulty=0"], 4, 0, "train"), {"selector": "t"})
    return (["train", "--curriculum", str(tmp / "cur"), "--model", str(env / "model"), "--target", str(tmp / "nope.parquet"),
             "--run", str(tmp / "run"), "--steps-per-stage", "1"], ["nope.parquet", "no such file"])


CASES = [non_utf8_jsonl, not_gzip, truncated_gzip, zero_row_prompts, jsonl_float_difficulty, parquet_text_difficulty,
         out_is_a_folder, out_under_a_file, out_in_read_only_folder, score_out_is_a_file, select_out_is_a_file,
         train_run_is_a_file, params_bad_regex, params_last_0, params_last_minus_1, temperature_nan, temperature_zero,
         temperature_inf, top_p_nan, device_bogus, ratio_clip_nan, k_larger_than_d, zero_row_trajectories,
         token_ids_differ_in_second_response, pickled_feature_shard, pickled_store_meta, select_unrelated_trajectories,
         resume_on_replaced_trajectories, check_broken_datasets_folder, rollout_broken_datasets_folder,
         select_negative_seed, score_model_folder_without_tokenizer, score_folder_without_config, score_empty_token_list,
         train_missing_target]


def snapshot(root: Path) -> dict:
    """Every path under root, with size and mtime for files (a folder's own mtime moves when the
    output check's probe file comes and goes)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(env, tmp_path, case):
    argv, expected = case(env, tmp_path)
    before = snapshot(tmp_path)
    r = runner().invoke(main, argv)
    lines = r.stderr.splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("cropi: error: "), r.stderr
    assert "Traceback" not in r.output + r.stderr
    for s in expected:
        assert s in lines[0], (s, lines[0])
    assert snapshot(tmp_path) == before  # no output, no temporary file, nothing touched
    print(f"{case.__name__}\t{lines[0]}")


# ---------------------------------------------------------------------------- outputs


def test_relative_input_path_resolves_from_another_folder_and_after_a_move(env, tmp_path, monkeypatch):
    """Scored with a path relative to the project folder; selected from another folder, then
    after moving the project; a different file under the trajectories' name is refused."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(env / "pool.parquet", proj / "pool.parquet")
    monkeypatch.chdir(proj)
    r = runner().invoke(main, score_args("pool.parquet", "S", env / "tgt.parquet", env / "model"))
    assert r.exit_code == 0, r.output
    meta = json.loads((proj / "S" / "meta.json").read_text())
    assert Path(meta["trajectories"]).is_absolute() and meta["trajectories_sha256"] == schema.file_sha256(env / "pool.parquet")
    monkeypatch.chdir(tmp_path)
    r = runner().invoke(main, ["select", "--scores", "proj/S", "--ratio", "0.5", "--out", "cur"])
    assert r.exit_code == 0, r.output
    table, manifest = curriculum.read_stage(tmp_path / "cur", 0)
    assert table.num_rows == 4 and manifest["trajectories_sha256"] == meta["trajectories_sha256"]
    proj.rename(tmp_path / "moved")
    r = runner().invoke(main, ["select", "--scores", "moved/S", "--ratio", "0.5", "--out", "cur"])
    assert r.exit_code == 0, r.output
    assert curriculum.read_stage(tmp_path / "cur", 1)[1]["trajectories_file"] == str(tmp_path / "moved" / "pool.parquet")
    write(traj_rows(8, 0, reward_seed=7), tmp_path / "moved" / "pool.parquet")
    r = runner().invoke(main, ["select", "--scores", "moved/S", "--ratio", "0.5", "--out", "cur"])
    assert r.exit_code == 2 and "is not the trajectories" in r.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_of_a_plain_open_and_mkdir(tmp_path, umask):
    old = os.umask(umask)
    try:
        schema.write_parquet_atomic(pa.Table.from_pylist(prompt_rows(2)), tmp_path / "p.parquet")
        with schema.atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
        stage = curriculum.write_stage(tmp_path / "cur", pa.Table.from_pylist(prompt_rows(2)), {"selector": "t"})
        with open(tmp_path / "plain", "w"):
            pass
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    want_file, want_dir = mode(tmp_path / "plain"), mode(tmp_path / "plain_dir")
    assert (want_file, want_dir) == (0o666 & ~umask, 0o777 & ~umask)
    for f in (tmp_path / "p.parquet", tmp_path / "d" / "x", stage / "train.parquet", stage / "manifest.json"):
        assert mode(f) == want_file, f
    for d in (tmp_path / "d", stage):
        assert mode(d) == want_dir, d
    (tmp_path / "p.parquet").chmod(0o640)  # replacing a file keeps its mode, as open("w") does
    schema.write_parquet_atomic(pa.Table.from_pylist(prompt_rows(3)), tmp_path / "p.parquet")
    assert mode(tmp_path / "p.parquet") == 0o640


def test_trainer_state_is_identical_between_identical_runs(env, tmp_path):
    """Two runs with the same seed, the process-global RNGs disturbed in between (as a fresh
    process would find them): byte-identical trainer_state.pt."""
    from cropi import tasks
    from cropi.train import loop
    from cropi.train.config import TrainConfig

    curriculum.write_stage(tmp_path / "cur", tasks.make_pool(["count_bits:difficulty=0"], 4, 0, "train"), {"selector": "t"})
    spec = loop.RunSpec(curriculum=str(tmp_path / "cur"), model=str(env / "model"),
                        train=TrainConfig(batch_prompts=2, group_size=2, max_new_tokens=4, steps_per_stage=1))
    states = []
    for name, disturb in (("a", 1), ("b", 2)):
        torch.manual_seed(disturb)
        np.random.seed(disturb)
        random.seed(disturb)
        loop.train(tmp_path / name, spec)
        states.append((tmp_path / name / "checkpoints" / "step-1" / "trainer_state.pt").read_bytes())
    assert states[0] == states[1]


def test_sigterm_while_the_plot_is_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    import matplotlib.figure

    from cropi.train.plot import plot_curves

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "stage": 0, "loss": 0.5}) + "\n")

    def savefig_killed(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_killed)
    with pytest.raises(SystemExit) as e, cli._sigterm_exits():
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    assert e.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_bug_keeps_its_traceback_and_a_cropi_check_is_one_line(env, tmp_path, monkeypatch):
    """A ValueError from inside numpy (cropi let bad data through) is a bug: not turned into a
    one-line exit 2. The same class raised by cropi's own check is."""
    from cropi import rollout

    def numpy_fails(*a, **k):
        return np.concatenate([])

    monkeypatch.setattr(rollout, "rollout", numpy_fails)
    r = runner().invoke(main, rollout_args(env, env / "prompts.parquet", tmp_path / "o.parquet"))
    assert r.exit_code == 1 and isinstance(r.exception, ValueError) and "cropi: error" not in r.stderr

    def cropi_check(*a, **k):
        from cropi.policy_grad import check_params_spec

        check_params_spec("last:x")

    monkeypatch.setattr(rollout, "rollout", cropi_check)
    r = runner().invoke(main, rollout_args(env, env / "prompts.parquet", tmp_path / "o.parquet"))
    assert r.exit_code == 2 and r.stderr.startswith("cropi: error: params 'last:x'")


# ---------------------------------------------------------------------------- --resume, remote code


def test_resume_with_nothing_to_resume_starts_fresh_and_says_so_in_one_line(env, tmp_path):
    r = runner().invoke(main, rollout_args(env, env / "prompts.parquet", tmp_path / "o.parquet", "--resume"))
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"cropi: note: --resume: nothing to resume at {tmp_path / 'o.parquet'}; starting a fresh run"]
    assert schema.read_table(tmp_path / "o.parquet").num_rows == 4
    r = runner().invoke(main, rollout_args(env, env / "prompts.parquet", tmp_path / "o.parquet", "--resume"))
    assert r.exit_code == 0 and "note" not in r.stderr  # something to resume: no note
    r = runner().invoke(main, score_in(env, tmp_path, "--resume"))
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"cropi: note: --resume: nothing to resume at {tmp_path / 's'}; starting a fresh run"]
    assert (tmp_path / "s" / "scores.parquet").exists()


def _remote_code_folder(env, tmp, where: str) -> Path:
    """A copy of the test model whose `where` JSON asks for its own code: a module that, once
    imported (transformers imports a copy from its modules cache), writes the folder's RAN."""
    m = tmp / "evil"
    shutil.copytree(env / "model", m)
    (m / "cropi.json").unlink()  # load through the Auto classes, as any downloaded folder does
    (m / "evil_code.py").write_text(
        f"from pathlib import Path\nPath({str(m / 'RAN')!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((m / where).read_text())
    if where == "config.json":
        cfg["model_type"] = "evil"  # a type transformers does not know: only the folder's code builds it
        cfg["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    else:
        cfg["tokenizer_class"] = "EvilTokenizer"
        cfg["auto_map"] = {"AutoTokenizer": ["evil_code.EvilTokenizer", "evil_code.EvilTokenizer"]}
    (m / where).write_text(json.dumps(cfg))
    return m


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_asking_for_its_own_code_is_refused_and_nothing_of_it_runs(env, tmp_path, where):
    m = _remote_code_folder(env, tmp_path, where)
    r = runner().invoke(main, score_in(env, tmp_path, "--model", str(m)), input="y\n" * 5)  # a "yes" on stdin changes nothing
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [f"cropi: error: {m / where}: field auto_map: the model folder asks to run its own "
                                     "Python code; cropi never runs code from a model folder (use a model transformers implements)"]
    assert "Do you wish to run" not in r.output and not (m / "RAN").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_transformers_is_told_never_to_run_folder_code(env, tmp_path, monkeypatch, where):
    """Without cropi's own refusal, the loaders' trust_remote_code=False still keeps the folder's
    code out: no question on stdin (answered "y" here, which would run it), no code run, one
    line. (Without the flag transformers asks, reads the "y", imports the module and loads.)"""
    import io

    m = _remote_code_folder(env, tmp_path, where)
    monkeypatch.setattr(models, "refuse_remote_code", lambda path: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))
    with pytest.raises(schema.InputError, match="not a model cropi can load .* contains custom code"):
        models.load(str(m))
    assert not (m / "RAN").exists()
