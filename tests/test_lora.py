"""LoRA fine-tuning: adapter and trained head saved together; reloaded and merged models agree and keep r-softmax."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rsoft_nlp import cli
from rsoft_nlp.modeling import load_finetuned
from rsoft_nlp.patching import load_model, patched_layers


def test_lora_adapter_with_head_reloads_and_merges_to_the_same_logits(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    cli.main([str(arg) for arg in (
        "--task", "mrpc", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out, "--r", "0.2",
        "--layers", "0,2", "--peft", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.0",
        "--lora-targets", "query,value,dense", "--epochs", "1", "--batch-size", "8", "--lr", "1e-2",
        "--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "48",
    )])  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["peft"] == "lora" and results["patched_layers"] == [0, 2]

    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in name and "query" in name for name in adapter)
    heads = [name for name in adapter if "classifier" in name]
    assert heads, "the classifier head is saved with the adapter"
    base_head = load_file(tiny_bert_dir / "model.safetensors")["classifier.weight"]
    trained_head = next(adapter[name] for name in heads if name.endswith("weight"))
    assert not torch.allclose(trained_head, base_head), "the head was trained"

    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(
        ["the man saw a dog", "a film"], ["the dog ran", "a good film"], padding=True, return_tensors="pt"
    )
    reloaded, merged = load_finetuned(out).eval(), load_model(str(out / "merged")).eval()
    with torch.no_grad():
        adapter_logits, merged_logits = reloaded(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-5, rtol=0)
    assert patched_layers(reloaded.get_base_model()) == {0: 0.2, 2: 0.2}
    assert patched_layers(merged) == {0: 0.2, 2: 0.2}
