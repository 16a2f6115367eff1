"""CI-sized smoke test of `cropi run`: 2 stages × 2 steps on a tiny pool, every artefact checked."""

import json

import yaml
from click.testing import CliRunner

from cropi import curriculum, features, schema
from cropi.cli import main


def test_cropi_run_smoke(tmp_path, tiny_policy):
    cfg = {
        "name": "smoke",
        "seed": 0,
        "model": "tiny",
        "data": {
            "pool": ["count_bits:difficulty=0", "spell_backward:difficulty=0", "chain_sum:difficulty=1"],
            "pool_per_spec": 8,
            "targets": {"target": ["basic_arithmetic:difficulty=0"]},
            "target_per_spec": 6,
            "heldout": {"heldout": ["count_bits:difficulty=0"]},
            "heldout_per_spec": 4,
        },
        "rollout": {"n": 4, "max_new_tokens": 12},
        "score": {"projector": "sjlt", "k": 256},
        "select": {"ratio": 0.25},
        "train": {"stages": 2, "steps_per_stage": 2, "batch_prompts": 2, "group_size": 4, "max_new_tokens": 12,
                  "eval_every": 2, "checkpoint_every": 2},
        "compare": {"methods": ["full", "random", "cropi"], "seeds": [0]},
    }
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "runs"
    r = CliRunner().invoke(main, ["run", str(path), "--root", str(root)])
    assert r.exit_code == 0, r.output
    # data: prompts, one offline rollout of pool and targets, all valid
    schema.read_table(root / "data" / "pool.parquet", "prompts")
    traj = schema.read_table(root / "data" / "pool.traj.parquet", "trajectories")
    assert traj.num_rows == 24 and "behavior_logprobs" in traj.column_names
    schema.read_table(root / "data" / "targets" / "target.traj.parquet", "trajectories")
    # cropi: a stage per stage, each scored by the checkpoint before it
    cur = root / "cropi-s0" / "curriculum"  # stage 0 (θ_0's scores); later stages in the run's own
    assert sorted(curriculum.stage_dirs(cur)) == [0]
    assert sorted(curriculum.stage_dirs(root / "cropi-s0" / "run" / "curriculum")) == [1]
    for s in (0, 1):
        rows, manifest = curriculum.read_stage(cur if s == 0 else root / "cropi-s0" / "run" / "curriculum", s)
        assert manifest["selector"] == "popi" and rows.num_rows == 6
        sdir = root / "data" / "scores-stage-0" if s == 0 else root / "cropi-s0" / "run" / "scores" / f"stage-{s:03d}"
        scores = schema.read_table(sdir / "scores.parquet", "scores")
        assert scores.num_rows == 24
        features.check_compatible(sdir / "features", sdir / "targets" / "target")
    m0 = json.loads((root / "data" / "scores-stage-0" / "meta.json").read_text())
    m1 = json.loads((root / "cropi-s0" / "run" / "scores" / "stage-001" / "meta.json").read_text())
    assert m0["fingerprint"] != m1["fingerprint"]  # re-scored with the trained checkpoint
    for method in ("full", "random", "cropi"):
        run = root / f"{method}-s0" / "run"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows if x["event"] == "train"] == [1, 2, 3, 4]
        assert any(x["event"] == "eval" for x in rows)
        assert (run / "config.yaml").exists() and (run / "plots" / "curves.png").exists()
        assert (root / f"{method}-s0" / "done.json").exists()
    resolved = yaml.safe_load((root / "config.yaml").read_text())  # defaults filled in
    assert resolved["rollout"] == {"n": 4, "temperature": 1.0, "max_new_tokens": 12}
    assert resolved["train"]["lr"] == 1e-4 and resolved["compare"]["seeds"] == [0]
    comp = json.loads((root / "comparison.json").read_text())
    assert set(comp["metrics"]) == {"gold", "accuracy"}
    for block in comp["metrics"].values():
        assert set(block["methods"]) == {"full", "random", "cropi"}
        assert all(r["final_target"] is not None for d in block["methods"].values() for r in d["seeds"])
    assert (root / "comparison.png").stat().st_size > 1000
    assert "| cropi |" in (root / "comparison.md").read_text()
    # re-running a finished comparison skips everything and gives the same table
    r2 = CliRunner().invoke(main, ["run", str(path), "--root", str(root)])
    assert r2.exit_code == 0 and (root / "comparison.md").read_text() in r2.output + "\n"
