"""Tiny default policy: tokenizer, offline save/load, batched sampling, log-probs."""

import torch

from cropi import models


def test_char_tokenizer_round_trip():
    tok = models.build_tiny_tokenizer()
    text = "Solve: 3*x + 4 = 19\nAnswer: 5"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"][1] == tok.unk_token_id


def test_tiny_model_size_and_offline_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = models.build_tiny_tokenizer()
    m = models.build_tiny_model(tok, seed=3)
    n = sum(p.numel() for p in m.parameters())
    assert 0.2e6 < n < 1.5e6
    models.save(m, tok, tmp_path / "tiny", {"kind": "tiny"})
    p = models.load(str(tmp_path / "tiny"))
    assert type(p.tokenizer).__name__ != "Qwen2TokenizerFast"
    assert p.tokenizer("ab 1")["input_ids"] == tok("ab 1")["input_ids"]
    assert models.fingerprint(p.model) == models.fingerprint(m)
    x = torch.tensor([tok("12+3=")["input_ids"]])
    assert torch.equal(p.model(input_ids=x).logits, m(input_ids=x).logits)
    # a seed changes the weights, and the fingerprint sees it
    assert models.fingerprint(models.build_tiny_model(tok, seed=4)) != models.fingerprint(m)


def test_missing_model_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="never downloads"):
        models.load("no-such-org/no-such-model")


def test_sample_is_batched_deterministic_and_ends_with_eos(small_policy):
    ids = models.encode_prompts(small_policy, ["1+1=\n", "What is 22*3?\n", "x\n"])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = models.sample(small_policy, ids, max_new_tokens=12, generator=g1)
    b = models.sample(small_policy, ids, max_new_tokens=12, generator=g2)
    assert a == b and len(a) == 3
    eos = small_policy.tokenizer.eos_token_id
    for r in a:
        assert 1 <= len(r) <= 12
        assert eos not in r[:-1]  # nothing after EOS
        assert models.is_truncated(r, eos) == (r[-1] != eos)


def test_left_padded_sampling_matches_unpadded(small_policy):
    """Greedy decoding of a short prompt is the same alone and in a batch with a longer one."""
    ids = models.encode_prompts(small_policy, ["7\n", "a much longer prompt here\n"])
    alone = models.sample(small_policy, ids[:1], temperature=0, max_new_tokens=8)
    both = models.sample(small_policy, ids, temperature=0, max_new_tokens=8)
    assert alone[0] == both[0]


def test_response_logprobs_equal_a_fresh_forward(small_policy):
    p = models.encode_prompts(small_policy, ["12+30=\n"])[0]
    r = [10, 11, 12, small_policy.tokenizer.eos_token_id]
    lp = models.response_logprobs(small_policy, [p, p[:3]], [r, r[:2]])
    full = torch.log_softmax(small_policy.model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
    expect = [full[len(p) - 1 + t, r[t]].item() for t in range(len(r))]
    assert torch.allclose(torch.tensor(lp[0]), torch.tensor(expect), atol=1e-5)
    assert len(lp[1]) == 2
