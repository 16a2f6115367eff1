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
