"""Chunked log-probs equal the plain full-logits computation; sampling uses the current cache API."""

import warnings

import pytest
import torch

from cropi import models


def _batch(policy, seed=0):
    """Three right-padded prompt+response sequences of different lengths."""
    g = torch.Generator().manual_seed(seed)
    V = policy.model.config.vocab_size
    prompts = models.encode_prompts(policy, ["12+30=\n", "What is 2*7?\n", "x\n"])
    responses = [torch.randint(4, V, (k,), generator=g).tolist() for k in (9, 3, 6)]
    return models.pack(prompts, responses, policy.tokenizer.pad_token_id)


def _reference(model, ids, attn, temperature):
    """log π and entropy from the model's full logits in one float32 log-softmax: [N, T] each."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    lp = torch.nn.functional.pad(logp.gather(-1, ids[:, 1:, None]).squeeze(-1), (1, 0))
    ent = torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0))
    return lp, ent


@pytest.mark.parametrize("chunk_rows", [1, 4, 10_000])
@pytest.mark.parametrize("plain_head", [True, False])
def test_chunked_logprobs_and_entropy_equal_full_logits(small_policy, chunk_rows, plain_head, monkeypatch):
    model = small_policy.model
    ids, attn, _ = _batch(small_policy)
    if not plain_head:  # an architecture cropi cannot split: the full-logits fallback path
        monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
        assert models.split_head(model) is None
    else:
        assert models.split_head(model) is not None
    V = model.config.vocab_size
    with torch.no_grad():
        lp, ent = models.token_logprobs(model, ids, attn, 0.7, return_entropy=True, chunk=chunk_rows * V)
        ref_lp, ref_ent = _reference(model, ids, attn, 0.7)
    live = torch.nn.functional.pad(attn[:, 1:].bool(), (1, 0))
    # float32, same operations per position: agreement to rounding (tolerance 1e-5 nats)
    torch.testing.assert_close(lp[live], ref_lp[live], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[live], ref_ent[live], atol=1e-5, rtol=0)
    assert (lp[~live] == 0).all() and (ent[~live] == 0).all()


def test_chunked_logprob_gradients_equal_plain_autograd(small_policy):
    """Recomputed chunks (activation checkpointing) give the plain-autograd gradient: relative
    error ||ours - ref|| / ||ref|| < 1e-5 per parameter (measured ~2e-7: float32 summation order)."""
    model = small_policy.model
    ids, attn, rmask = _batch(small_policy, seed=1)
    w = torch.linspace(-1, 2, ids.numel()).view_as(ids) * rmask

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * w).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    V = model.config.vocab_size
    ours = grads(lambda: models.token_logprobs(model, ids, attn, 1.0, chunk=3 * V))
    ref = grads(lambda: _reference(model, ids, attn, 1.0)[0])
    model.zero_grad(set_to_none=True)
    for n in ref:
        assert (ours[n] - ref[n]).norm() <= 1e-5 * ref[n].norm(), n


def test_bf16_autocast_logprobs_close_to_float32(small_policy):
    ids, attn, rmask = _batch(small_policy)
    with torch.no_grad():
        fp32 = models.token_logprobs(small_policy.model, ids, attn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = models.token_logprobs(small_policy.model, ids, attn)
    assert bf16.dtype == torch.float32
    err = (bf16 - fp32)[rmask].abs()
    assert 0 < err.max() < 0.1  # bf16 matmuls (8-bit mantissa) did run, and stay close


def test_sampling_warns_nothing_and_matches_uncached_greedy_decoding(small_policy):
    ids = models.encode_prompts(small_policy, ["7+8=\n", "a longer prompt\n"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = models.sample(small_policy, ids, temperature=0, max_new_tokens=10)
    bad = [w for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]
    assert not bad, [str(w.message) for w in bad]
    eos = small_policy.tokenizer.eos_token_id
    for p, resp in zip(ids, got):  # the KV cache changes nothing: recompute the whole prefix each token
        seq = list(p)
        for _ in range(10):
            with torch.no_grad():
                nxt = int(small_policy.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
            if nxt == eos:
                break
        assert resp == seq[len(p):]
