"""SmolLM2-135M-Instruct, the real model that a package ships (`--model smollm2`)."""

import json

import pytest

pytestmark = pytest.mark.real


def test_chat_template_applied_exactly_as_the_tokenizer_does(smollm2):
    from cropi import models

    prompts = ["What is 2+3?", "Solve $x^2=4$ for x > 0.\nGive the answer in \\boxed{}."]
    ids = models.encode_prompts(smollm2, prompts)
    for p, got in zip(prompts, ids):
        text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False)
        assert got == smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert text.endswith("<|im_start|>assistant\n") and p in text


def test_converted_folder_saves_without_quantization_config(smollm2, tmp_path):
    from cropi import models

    assert smollm2.chat_template
    assert "quantization_config" not in json.loads((models.smollm2_path() / "config.json").read_text())
    smollm2.model.save_pretrained(tmp_path / "copy")  # failed while the GGUF quantizer was kept
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008


# ---------------------------------------------------------------------------- rollout and training

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "math_prompts.jsonl"


def test_rollout_rewards_reverify_and_logprobs_equal_a_fresh_forward(smollm2, tmp_path):
    """`cropi rollout --model smollm2`, 3 math prompts x 2 responses of <= 48 tokens: stored rewards
    equal rewards.rewards on the stored texts; stored behaviour log-probs equal one plain float32
    log-softmax over the full logits of each sequence alone (|diff| < 1e-4 nats: batch padding
    changes the matmul shapes, nothing else)."""
    import torch
    from click.testing import CliRunner

    from cropi import models, rewards, schema
    from cropi.cli import main

    out = tmp_path / "traj.parquet"
    res = CliRunner().invoke(main, ["rollout", "--prompts", str(FIXTURE), "--model", "smollm2", "--n", "2",
                                    "--max-new-tokens", "48", "--limit", "3", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = schema.read_table(out).to_pylist()
    assert len(rows) == 3 and all(len(r["responses"]) == 2 for r in rows)
    for r in rows:
        assert r["rewards"] == rewards.rewards(r["responses"], [r, r])
        assert models.decode_responses(smollm2, r["response_token_ids"]) == r["responses"]
        prompt = models.encode_prompts(smollm2, [r["prompt"]])[0]
        for resp, blp in zip(r["response_token_ids"], r["behavior_logprobs"]):
            with torch.no_grad():
                logits = smollm2.model(input_ids=torch.tensor([prompt + resp])).logits[0].float()
            fresh = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(resp)[:, None])[:, 0]
            assert len(blp) == len(resp) >= 1
            assert (torch.tensor(blp) - fresh).abs().max() < 1e-4


def _train_in_subprocess(cur, run, micro_batch: int) -> int:
    """`cropi train` two steps on SmolLM2 in a child process; returns its peak RSS in MiB."""
    import os
    import subprocess
    import sys

    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "cropi", "train", "--curriculum", str(cur),
           "--model", "smollm2", "--run", str(run), "--batch-prompts", "2", "--group-size", "4",
           "--max-new-tokens", "24", "--steps-per-stage", "2", "--eval-every", "0", "--checkpoint-every", "0",
           "--lr", "1e-5", "--rl-plus", "--micro-batch", str(micro_batch), "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CROPI_QUIET": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip().splitlines()[-1]) // 1024


def test_two_train_steps_micro_batch_2_and_8_same_weights(smollm2, tmp_path):
    """Two GRPO steps (2 prompts x (4 responses + the RL-PLUS demonstration "Answer: <gold>", whose
    reward 1 gives every group reward variance, so the update is never zero)) in passes of 2 or
    of 8 + 2 sequences: per tensor,
    ||w2 - w8|| <= 1e-3 ||w8 - w0|| (float32 summation order; Adam divides by sqrt(v), which
    amplifies rounding on near-zero gradient coordinates). Also: the final save of the
    GGUF-converted model works. Peak RSS of each run is printed (pytest -s)."""
    from safetensors.torch import load_file

    from cropi import curriculum, schema
    from cropi.train import checkpoint as ckpt

    curriculum.write_stage(tmp_path / "cur", schema.read_table(FIXTURE), {"selector": "test"})
    rss = {mb: _train_in_subprocess(tmp_path / "cur", tmp_path / f"mb{mb}", mb) for mb in (2, 8)}
    print(f"\npeak RSS MiB of two SmolLM2 train steps: {rss}")
    w = {mb: load_file(str(ckpt.latest(tmp_path / f"mb{mb}") / "model.safetensors")) for mb in (2, 8)}
    w0 = smollm2.model.state_dict()
    moved = 0
    for k, v8 in w[8].items():
        d = (v8 - w0[k]).norm()
        moved += d > 0
        assert (w[2][k] - v8).norm() <= 1e-3 * d, k
    assert moved > 100  # nearly every tensor took the update
