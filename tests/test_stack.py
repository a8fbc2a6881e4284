"""The patcher with the rest of the stack: PEFT/LoRA, gradient checkpointing and torch.compile."""

import pytest
import torch
from conftest import padded_batch, tiny_family_model
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file

from rsoft_nlp.patching import patch_model, patched_layers

TARGETS = {"bert": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "mpnet": ["q", "v"]}


def padded_inputs():
    ids, mask = padded_batch()
    return {"input_ids": ids, "attention_mask": mask}


def lora(model, family):
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=TARGETS[family])
    peft_model = get_peft_model(model, config)
    # LoRA's B starts at zero; give it values so the adapters change the logits.
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    return peft_model.eval()


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("order", ["patch-then-wrap", "wrap-then-patch"])
def test_lora_keeps_r_softmax_saves_the_head_and_merges(family, order, tmp_path):
    batch = padded_inputs()
    if order == "patch-then-wrap":
        model = lora(patch_model(tiny_family_model(family), r=0.5, layers=[-1]), family)
    else:
        model = patch_model(lora(tiny_family_model(family), family), r=0.5, layers=[-1])
    assert patched_layers(model) == {1: 0.5}
    out = model(**batch, output_attentions=True)
    assert (out.attentions[1][1] == 0).any() and not (out.attentions[0][1] == 0).any()

    # The adapter file holds the classifier head (modules_to_save), and loads back onto a patched base.
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lora_B" in key for key in saved)
    assert any("classifier" in key or "out_proj" in key for key in saved)
    base = patch_model(tiny_family_model(family), r=0.5, layers=[-1])
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, out.logits, atol=1e-6, rtol=0)

    merged = model.merge_and_unload()
    assert patched_layers(merged) == {1: 0.5} and merged.config.rsoftmax["layers"] == [1]
    torch.testing.assert_close(merged(**batch).logits, out.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "deberta-v2", "distilbert", "modernbert"])
def test_gradient_checkpointing_gives_the_same_logits_and_gradients(family):
    batch = padded_inputs()
    labels = torch.tensor([0, 1])
    results = []
    for checkpointing in (False, True):
        model = patch_model(tiny_family_model(family), r=0.4).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # the new name of gradient_checkpointing_enable
        out = model(**batch, labels=labels)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))

    (logits_off, grads_off), (logits_on, grads_on) = results
    torch.testing.assert_close(logits_on, logits_off, atol=1e-6, rtol=0)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=1e-5)


def test_torch_compile_of_a_patched_model():
    model = patch_model(tiny_family_model("bert"), r=0.5)
    batch = padded_inputs()
    expected = model(**batch).logits
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, expected, atol=1e-5, rtol=0)
