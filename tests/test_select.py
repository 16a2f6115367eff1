"""Selectors, curriculum shards and exports.

Expected selections are worked out by hand in the comments; nothing here recomputes them with
the code under test.
"""

import calendar
import hashlib
import json
import time

import click
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cropi import curriculum as C
from cropi import export as E
from cropi import select as S
from cropi.cli import CropiGroup
from cropi.schema import InputError


def traj_table(rewards, tasks=None, prompts=None):
    """Trajectories with ids p0.., prompt "q<i>" (or `prompts`), answer "a<i>", difficulty i % 3."""
    n = len(rewards)
    return pa.table(
        {
            "id": [f"p{i}" for i in range(n)],
            "prompt": prompts or [f"q{i}" for i in range(n)],
            "answer": [f"a{i}" for i in range(n)],
            "task": tasks or ["add"] * n,
            "difficulty": pa.array([i % 3 for i in range(n)], pa.int32()),
            "split": ["train"] * n,
            "responses": [[f"r{j}" for j in range(len(r))] for r in rewards],
            "rewards": pa.array(rewards, pa.list_(pa.float32())),
            "behavior": ["tiny"] * n,
        }
    )


def binary(k, g=8):
    """g rewards, the first k correct."""
    return [1.0] * k + [0.0] * (g - k)


def write_pool(tmp_path, rewards, scores, status, tasks=None, prompts=None, checkpoint="ckpt/step-0"):
    """A trajectories file plus a `cropi score` output dir pointing at it. Returns the scores dir."""
    traj = traj_table(rewards, tasks, prompts)
    pq.write_table(traj, tmp_path / "traj.parquet")
    sdir = tmp_path / "scores"
    sdir.mkdir()
    n = len(rewards)
    order = sorted(range(n), key=lambda i: -(scores[i] if scores[i] == scores[i] else -9))
    rank = [order.index(i) + 1 for i in range(n)]
    pq.write_table(
        pa.table(
            {
                "id": [f"p{i}" for i in range(n)],
                "score": pa.array(scores, pa.float64()),
                "score__val": pa.array(scores, pa.float64()),
                "rank": pa.array(rank, pa.int64()),
                "pass_rate": pa.array([np.mean(np.array(r) >= 0.5) for r in rewards], pa.float64()),
                "status": status,
            }
        ),
        sdir / "scores.parquet",
    )
    meta = {"model": "tiny", "checkpoint": checkpoint, "seed": 7, "trajectories": str(tmp_path / "traj.parquet")}
    (sdir / "meta.json").write_text(json.dumps(meta))
    return sdir


# ---------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    "pool, ratio, n, want",
    [
        (20, 0.1, None, 2),
        (25, 0.1, None, 3),  # 2.5 rounds half up
        (24, 0.1, None, 2),  # 2.4
        (20, 0.01, None, 1),  # 0.2 rounds to 0: a stage holds at least one prompt
        (20, 1.0, None, 20),
        (30, None, None, 3),  # default ratio 0.1
        (10, None, 4, 4),
        (10, None, 50, 10),  # n beyond the pool: the whole pool
    ],
)
def test_stage_size(pool, ratio, n, want):
    assert S.stage_size(pool, ratio, n) == want


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_an_input_error(ratio):
    with pytest.raises(InputError, match=r"^--ratio: must be in \(0, 1\]"):
        S.stage_size(10, ratio)


def test_bad_count_and_both_sizes():
    with pytest.raises(InputError, match="^--n: must be a positive integer"):
        S.stage_size(10, None, 0)
    with pytest.raises(InputError, match="not both"):
        S.stage_size(10, 0.1, 3)


# ---------------------------------------------------------------------------- popi


def test_popi_top_scores_and_zero_signal_never_chosen():
    t = traj_table([binary(4)] * 6).append_column("score", pa.array([0.3, np.nan, 0.9, 0.99, -0.2, 0.5]))
    t = t.append_column("status", pa.array(["ok", "zero_signal", "ok", "skipped", "ok", "ok"]))
    # row 3 has the best number but status skipped; row 1 is zero-signal
    assert S.select(t, "popi", n=3).tolist() == [2, 5, 0]
    # asking for more than is eligible returns the 4 ok rows, best first
    assert S.select(t, "popi", n=6).tolist() == [2, 5, 0, 4]


def test_popi_ties_are_broken_by_seed_not_file_order():
    t = traj_table([binary(4)] * 5).append_column("score", pa.array([0.5, 0.7, 0.7, 0.7, 0.2]))
    t = t.append_column("status", pa.array(["ok"] * 5))
    # n=4: the three tied 0.7 rows then 0.5, whatever the seed
    for seed in range(5):
        got = S.select(t, "popi", n=4, seed=seed).tolist()
        assert sorted(got[:3]) == [1, 2, 3] and got[3] == 0
    # n=2: two of the tied rows; which two depends on the seed, and every tied row gets a turn
    picks = [tuple(S.select(t, "popi", n=2, seed=s).tolist()) for s in range(30)]
    assert all(set(p) <= {1, 2, 3} for p in picks)
    assert set().union(*map(set, picks)) == {1, 2, 3}
    assert picks == [tuple(S.select(t, "popi", n=2, seed=s).tolist()) for s in range(30)]


def test_popi_all_zero_signal_pool_selects_nothing():
    t = traj_table([binary(8)] * 4).append_column("score", pa.array([np.nan] * 4))
    t = t.append_column("status", pa.array(["zero_signal"] * 4))
    assert S.select(t, "popi", ratio=1.0).tolist() == []


def test_popi_without_score_column_is_an_input_error():
    with pytest.raises(InputError, match=r"^traj.parquet: field score: missing column"):
        S.select(traj_table([binary(4)] * 3), "popi", source="traj.parquet")


def test_unknown_selector():
    with pytest.raises(InputError, match=r"^--selector: unknown selector 'best'"):
        S.select(traj_table([binary(4)]), "best")


# ---------------------------------------------------------------------------- random, full, duplicates


def test_random_is_a_seeded_uniform_sample():
    t = traj_table([binary(0)] * 10)
    a = S.select(t, "random", n=3, seed=1)
    assert len(a) == 3 and len(set(a.tolist())) == 3
    assert a.tolist() == S.select(t, "random", n=3, seed=1).tolist()
    # each of 10 rows is in a 2-sample with probability 0.2: 3000 draws, sd of a frequency ≈ 0.0073
    counts = np.zeros(10)
    for seed in range(3000):
        counts[S.order_random(10, seed)[:2]] += 1
    assert np.all(np.abs(counts / 3000 - 0.2) < 0.03)


def test_duplicate_texts_are_selected_once_and_size_counts_distinct_prompts():
    prompts = ["same", "same", "other", "third", "fourth"]
    t = traj_table([binary(4)] * 5, prompts=prompts)
    t = t.append_column("score", pa.array([0.8, 0.9, 0.1, 0.5, 0.4])).append_column("status", pa.array(["ok"] * 5))
    # the better copy (row 1) wins; row 0 is skipped, so the next two are rows 3 and 4
    assert S.select(t, "popi", n=3).tolist() == [1, 3, 4]
    # ratio 0.5 of 4 distinct prompts = 2
    assert S.select(t, "popi", ratio=0.5).tolist() == [1, 3]
    # full: every distinct prompt once, in table order
    assert S.select(t, "full").tolist() == [0, 2, 3, 4]


# ---------------------------------------------------------------------------- learnability, pass-band


def test_learnability_ranks_by_p_times_one_minus_p():
    # pass rates k/8 for k = 0, 4, 2, 6, 8, 3: p(1-p) = 0, .25, .1875, .1875, 0, .234375
    t = traj_table([binary(k) for k in (0, 4, 2, 6, 8, 3)])
    got = S.select(t, "learnability", n=4, seed=0).tolist()
    assert got[:2] == [1, 5] and sorted(got[2:]) == [2, 3]  # 2 and 3 tie (p and 1-p)
    got = S.select(t, "learnability", n=3, seed=0).tolist()
    assert got[:2] == [1, 5] and got[2] in (2, 3)
    # a pass_rate column, when present, is used as given
    t2 = traj_table([binary(0)] * 3).append_column("pass_rate", pa.array([0.9, 0.5, 0.2]))
    assert S.select(t2, "learnability", n=3).tolist() == [1, 2, 0]


def test_pass_band_keeps_rates_inside_inclusive_band():
    # pass rates: 0, .125, .25, .375, .5, .625, .75, 1
    t = traj_table([binary(k) for k in (0, 1, 2, 3, 4, 5, 6, 8)])
    assert sorted(S.select(t, "pass-band", n=8, band=(0.25, 0.5)).tolist()) == [2, 3, 4]
    two = S.select(t, "pass-band", n=2, band=(0.25, 0.5), seed=3).tolist()
    assert len(two) == 2 and set(two) <= {2, 3, 4}
    assert S.select(t, "pass-band", n=8, band=(0.9, 0.95)).tolist() == []
    with pytest.raises(InputError, match="^--band"):
        S.select(t, "pass-band", n=2, band=(0.6, 0.4))


# ---------------------------------------------------------------------------- variance (VCRL)


def test_vcrl_threshold_at_g8_keeps_three_to_five_correct():
    # G=8, k correct: unbiased σ² = k(8-k)/56, σ²_max = 8/(4·7) = 2/7, p = k(8-k)/16
    # k: 0..8 -> p = 0, 7/16, 12/16, 15/16, 1, 15/16, 12/16, 7/16, 0; κ = 0.8 keeps k ∈ {3, 4, 5}
    t = traj_table([binary(k) for k in range(9)])
    got = S.select(t, "variance", n=9, kappa=0.8).tolist()
    assert got[0] == 4 and sorted(got[1:]) == [3, 5]
    # κ = 0.75 is met exactly by k = 2 and 6 (p = 12/16)
    assert sorted(S.select(t, "variance", n=9, kappa=0.75).tolist()) == [2, 3, 4, 5, 6]


def test_vcrl_odd_group_and_mixed_group_sizes():
    # G=5: σ² = k(5-k)/20, σ²_max = (5+1)/(4·5) = 6/20, p = k(5-k)/6 -> k=2,3: 1; k=1,4: 2/3
    rewards = [binary(k, 5) for k in range(6)] + [binary(3, 8), binary(2, 8)]
    t = traj_table(rewards)
    assert sorted(S.select(t, "variance", n=8, kappa=0.8).tolist()) == [2, 3, 6]
    assert sorted(S.select(t, "variance", n=8, kappa=0.6).tolist()) == [1, 2, 3, 4, 6, 7]


def test_vcrl_non_binary_rewards_use_the_observed_range():
    # rewards in {0, 0.5}: observed range (0, 0.5), σ²_max = 2/7 · 0.25 = 1/14.
    # row 0: four 0.5s of 8 -> σ² = 8·0.25²/7 = 1/14, p = 1; row 1: two of 8 -> σ² = 2·6·0.25/56 = 3/56, p = 0.75
    t = traj_table([[0.5] * 4 + [0.0] * 4, [0.5] * 2 + [0.0] * 6, [0.5] * 8])
    assert S.select(t, "variance", n=3, kappa=0.8).tolist() == [0]
    assert S.select(t, "variance", n=3, kappa=0.7).tolist() == [0, 1]
    # all rewards equal: no variance anywhere, nothing selected
    assert S.select(traj_table([binary(8)] * 3), "variance", n=3, kappa=0.0).tolist() == []


# ---------------------------------------------------------------------------- stratification


def test_stratum_quotas_largest_remainder():
    # n=5 over a:6, b:3, c:1 -> exact 3, 1.5, 0.5 -> floors 3,1,0; the seat left goes to b (tie with c, b < c)
    assert S.stratum_quotas(["a"] * 6 + ["b"] * 3 + ["c"], 5) == {"a": 3, "b": 2, "c": 0}
    # n=3 over a:5, b:3, c:2 -> 1.5, 0.9, 0.6 -> floors 1,0,0; seats to b (.9) then c (.6)
    assert S.stratum_quotas(["a"] * 5 + ["b"] * 3 + ["c"] * 2, 3) == {"a": 1, "b": 1, "c": 1}


def test_stratify_keeps_task_shares():
    tasks = ["mul"] * 12 + ["add"] * 6 + ["sort"] * 2  # 60% / 30% / 10%
    t = traj_table([binary(4)] * 20, tasks=tasks)
    t = t.append_column("score", pa.array(np.linspace(1, 0, 20))).append_column("status", pa.array(["ok"] * 20))
    # unstratified top-10 by score are all "mul" (rows 0..9)
    assert S.select(t, "popi", n=10).tolist() == list(range(10))
    got = S.select(t, "popi", n=10, stratify="task").tolist()
    # quotas 6 / 3 / 1: the best 6 mul (0..5), best 3 add (12..14), best sort (18), in score order
    assert got == [0, 1, 2, 3, 4, 5, 12, 13, 14, 18]
    r = S.select(t, "random", n=10, stratify="task", seed=4)
    assert sorted(np.asarray(tasks)[r].tolist()) == ["add"] * 3 + ["mul"] * 6 + ["sort"]
    with pytest.raises(InputError, match="field family: missing column"):
        S.select(t, "random", n=2, stratify="family")


# ---------------------------------------------------------------------------- curriculum


def pool_for_stages(tmp_path):
    # 10 prompts; k correct of 8 and scores chosen by hand; p4 zero-signal (k = 8)
    ks = [4, 3, 2, 6, 8, 5, 1, 7, 4, 3]
    scores = [0.9, 0.8, 0.7, 0.6, np.nan, 0.5, 0.4, 0.3, 0.2, 0.1]
    status = ["ok"] * 4 + ["zero_signal"] + ["ok"] * 5
    tasks = ["add", "mul"] * 5
    return write_pool(tmp_path, [binary(k) for k in ks], scores, status, tasks=tasks)


def test_make_stage_writes_shard_and_manifest(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    before = time.time()
    d = C.make_stage(scores_dir=sdir, selector="popi", ratio=0.3, seed=5, out=out)
    assert d == out / "stage-000"
    train = pq.read_table(d / "train.parquet")
    # top 3 of 10 by score: p0 (.9), p1 (.8), p2 (.7)
    assert train.column("id").to_pylist() == ["p0", "p1", "p2"]
    assert train.column_names == ["id", "prompt", "answer", "task", "difficulty", "split", "pass_rate", "score"]
    assert train.column("pass_rate").to_pylist() == [0.5, 0.375, 0.25]
    m = json.loads((d / "manifest.json").read_text())
    assert m["stage"] == 0 and m["selector"] == "popi" and m["params"] == {}
    assert m["ratio"] == 0.3 and m["pool_size"] == 10 and m["selected"] == 3 and m["seed"] == 5
    assert m["checkpoint"] == "ckpt/step-0" and m["model"] == "tiny" and m["scores_seed"] == 7
    assert m["scores_sha256"] == hashlib.sha256((sdir / "scores.parquet").read_bytes()).hexdigest()
    assert m["trajectories_file"] == str(tmp_path / "traj.parquet")
    assert m["task_counts"] == {"add": 2, "mul": 1}
    assert m["mean_pass_rate"] == pytest.approx((0.5 + 0.375 + 0.25) / 3)
    assert m["mean_score"] == pytest.approx(0.8)
    assert before - 1 <= calendar.timegm(time.strptime(m["time"], "%Y-%m-%dT%H:%M:%SZ")) <= time.time() + 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_stage_numbering_and_exclude_previous(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    assert C.next_stage_dir(out) == out / "stage-000"
    C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out, exclude_previous=True)  # nothing to exclude yet
    # without exclusion the same scores give the same prompts again, as stage 1
    d2 = C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out, checkpoint="ckpt/step-10")
    assert d2.name == "stage-001"
    assert C.read_stage(out, 1)[0].column("id").to_pylist() == ["p0", "p1", "p2"]
    assert C.read_stage(out, 1)[1]["checkpoint"] == "ckpt/step-10"
    # with exclusion: the next 3 by score among the rest (p3 .6, p5 .5, p6 .4)
    d3 = C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out, exclude_previous=True)
    assert d3.name == "stage-002"
    assert C.read_stage(out, 2)[0].column("id").to_pylist() == ["p3", "p5", "p6"]
    assert C.read_stage(out, 2)[1]["excluded"] == 3
    assert C.previous_ids(out) == {"p0", "p1", "p2", "p3", "p5", "p6"}
    # ratio 0.3 keeps its size (3 of the 10-prompt pool) even as candidates shrink: p7 .3, p8 .2, p9 .1
    C.make_stage(scores_dir=sdir, selector="popi", ratio=0.3, out=out, exclude_previous=True)
    assert C.read_stage(out, 3)[0].column("id").to_pylist() == ["p7", "p8", "p9"]
    # only the zero-signal p4 is left: popi chooses nothing, and no stage 5 appears
    with pytest.raises(InputError, match="chose nothing: no candidate has status ok"):
        C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out, exclude_previous=True)
    assert sorted(C.stage_dirs(out)) == [0, 1, 2, 3]
    assert C.next_stage_dir(out) == out / "stage-004"
    with pytest.raises(InputError, match="no stage 9"):
        C.read_stage(out, 9)


def test_unscored_selectors_read_trajectories_and_same_seed_same_stage(tmp_path):
    pool_for_stages(tmp_path)
    traj = tmp_path / "traj.parquet"
    a = C.make_stage(trajectories=traj, selector="random", n=4, seed=11, out=tmp_path / "a")
    b = C.make_stage(trajectories=traj, selector="random", n=4, seed=11, out=tmp_path / "b")
    ids_a = pq.read_table(a / "train.parquet").column("id").to_pylist()
    assert ids_a == pq.read_table(b / "train.parquet").column("id").to_pylist()
    assert len(set(ids_a)) == 4
    m = json.loads((a / "manifest.json").read_text())
    assert m["checkpoint"] is None and m["scores_sha256"] is None and m["n"] == 4 and m["ratio"] is None
    assert "score" not in pq.read_table(a / "train.parquet").column_names
    # variance over the pool's k = 4,3,2,6,8,5,1,7,4,3: κ=0.8 keeps k ∈ {3,4,5} -> p0,p1,p5,p8,p9
    v = C.make_stage(trajectories=traj, selector="variance", ratio=1.0, out=tmp_path / "v", kappa=0.8)
    assert sorted(pq.read_table(v / "train.parquet").column("id").to_pylist()) == ["p0", "p1", "p5", "p8", "p9"]
    assert json.loads((v / "manifest.json").read_text())["params"] == {"kappa": 0.8}
    # full: all 10
    f = C.make_stage(trajectories=traj, selector="full", out=tmp_path / "f")
    assert pq.read_table(f / "train.parquet").num_rows == 10


def test_bad_inputs_leave_no_stage(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    with pytest.raises(InputError, match="^--ratio"):
        C.make_stage(scores_dir=sdir, selector="popi", ratio=2.0, out=out)
    with pytest.raises(InputError, match="^--selector"):
        C.make_stage(scores_dir=sdir, selector="nope", out=out)
    with pytest.raises(InputError, match="^--scores: selector popi needs"):
        C.make_stage(trajectories=tmp_path / "traj.parquet", selector="popi", out=out)
    # a trajectories file given as the scores file: its missing score column is named
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scores.parquet").write_bytes((tmp_path / "traj.parquet").read_bytes())
    (bad / "meta.json").write_text(json.dumps({"trajectories": str(tmp_path / "traj.parquet")}))
    with pytest.raises(InputError, match=r"scores.parquet: field score: missing column"):
        C.make_stage(scores_dir=bad, selector="popi", out=out)
    assert not out.exists() or not any(out.iterdir())


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    sdir = pool_for_stages(tmp_path)

    @click.group(cls=CropiGroup)
    def cli():
        pass

    @cli.command()
    @click.option("--scores", default=None)
    @click.option("--selector", default="popi")
    @click.option("--ratio", type=float, default=None)
    def select(scores, selector, ratio):
        C.make_stage(scores_dir=scores, selector=selector, ratio=ratio, out=tmp_path / "cur")

    runner = CliRunner()
    for args, want in [
        (["--scores", str(sdir), "--ratio", "0"], "--ratio: must be in (0, 1], got 0.0"),
        (["--scores", str(sdir), "--selector", "top"], "--selector: unknown selector 'top'"),
        (["--scores", str(tmp_path / "nowhere")], "nowhere/scores.parquet: no such file"),
    ]:
        res = runner.invoke(cli, ["select", *args])
        assert res.exit_code == 2
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and want in lines[0]
    assert not (tmp_path / "cur").exists()


def test_show_table(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out)
    C.make_stage(scores_dir=sdir, selector="learnability", n=4, out=out, seed=2)
    lines = C.show(out).splitlines()
    assert lines[0].split() == ["stage", "selector", "size", "task", "mix", "mean", "pass", "mean", "score"]
    # stage 0: p0,p1,p2 -> tasks add, mul, add; pass rates 4/8, 3/8, 2/8 -> mean 0.375; scores .9 .8 .7 -> .8
    assert lines[1].split() == ["0", "popi", "3", "add:2", "mul:1", "0.375", "0.8000"]
    # stage 1 (learnability, scores joined): p(1-p) best are k=4 (p0, p8), then k=3/5 (p1, p5, p9) tie;
    # pass-rate mean is (.5 + .5 + two of {.375, .625, .375}) / 4
    row = lines[2].split()
    assert row[:3] == ["1", "learnability", "4"]
    ids = C.read_stage(out, 1)[0].column("id").to_pylist()
    assert set(ids[:2]) == {"p0", "p8"} and set(ids[2:]) <= {"p1", "p5", "p9"}
    with pytest.raises(InputError, match="no curriculum stages"):
        C.show(tmp_path / "empty")


# ---------------------------------------------------------------------------- exports


def test_exports_round_trip(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    C.make_stage(scores_dir=sdir, selector="popi", n=3, out=out)
    # stage 0 = p0 (add, diff 0), p1 (mul, diff 1), p2 (add, diff 2)

    v = datasets.Dataset.from_parquet(str(E.export_stage(out, 0, "verl", tmp_path / "verl.parquet")))
    assert v.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert v[1] == {
        "data_source": "cropi/mul",
        "prompt": [{"role": "user", "content": "q1"}],
        "ability": "mul",
        "reward_model": {"style": "rule", "ground_truth": "a1"},
        "extra_info": {"index": 1, "id": "p1", "task": "mul", "difficulty": 1, "split": "train", "metadata": None},
    }
    assert [r["extra_info"]["index"] for r in v] == [0, 1, 2]
    assert [r["reward_model"]["ground_truth"] for r in v] == ["a0", "a1", "a2"]

    t = datasets.Dataset.from_parquet(str(E.export_stage(out, 0, "trl", tmp_path / "trl.parquet")))
    assert t.column_names == ["prompt", "answer", "id", "task", "difficulty", "metadata"]
    assert t.to_dict() == {
        "prompt": ["q0", "q1", "q2"],
        "answer": ["a0", "a1", "a2"],
        "id": ["p0", "p1", "p2"],
        "task": ["add", "mul", "add"],
        "difficulty": [0, 1, 2],
        "metadata": [None, None, None],
    }
    meta = json.loads(pq.read_schema(tmp_path / "trl.parquet").metadata[b"cropi"])
    assert meta["format"] == "trl" and meta["manifest"]["stage"] == 0

    j = E.export_stage(out, 0, "jsonl", tmp_path / "s1.jsonl")
    rows = [json.loads(line) for line in j.read_text().splitlines()]
    assert rows[2] == {"id": "p2", "prompt": "q2", "answer": "a2", "task": "add", "difficulty": 2,
                       "split": "train", "pass_rate": 0.25, "score": 0.7}
    assert datasets.Dataset.from_json(str(j)).num_rows == 3

    with pytest.raises(InputError, match="^--format: unknown format 'csv'"):
        E.export_stage(out, 0, "csv", tmp_path / "x.csv")
    with pytest.raises(InputError, match="no stage 2"):
        E.export_stage(out, 2, "verl", tmp_path / "x.parquet")


def test_jsonl_export_writes_nan_score_as_null(tmp_path):
    sdir = pool_for_stages(tmp_path)
    out = tmp_path / "cur"
    C.make_stage(scores_dir=sdir, selector="full", out=out)  # includes zero-signal p4 (score NaN)
    rows = [json.loads(x) for x in E.export_stage(out, 0, "jsonl", tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows if r["id"] == "p4"] == [None]
