import subprocess
import sys

import pytest
import torch
from conftest import padded_batch, tiny_bert_config, tiny_family_model
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.masking_utils import AttentionMaskInterface

from rsoft_nlp import patching
from rsoft_nlp.patching import (
    attention_stats,
    load_model,
    patch_model,
    patched_layers,
    record_sparsity,
    unpatch_model,
)


def tiny_model(family: str, attn_implementation=None):
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(tiny_bert_config(attn_implementation=attn_implementation))
    else:
        config = RobertaConfig(**tiny_bert_config().to_dict() | {"max_position_embeddings": 66, "pad_token_id": 1})
        config._attn_implementation = attn_implementation
        model = RobertaForSequenceClassification(config)
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("load_path", [None, "eager", "sdpa"])
def test_every_layer_runs_r_softmax_and_gets_the_mask(family, load_path, count_calls):
    model = patch_model(tiny_model(family, load_path), r=0.5)
    ids, mask = padded_batch()
    if family == "roberta":
        ids = torch.where(ids == 0, 1, ids)

    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(count_calls) == model.config.num_hidden_layers
    alone = model(input_ids=ids[:1, :5]).logits
    torch.testing.assert_close(out.logits[:1], alone, atol=1e-5, rtol=0)

    # The mask arrived: padded keys get exactly zero probability in every layer.
    for probs in out.attentions:
        assert (probs[0, :, :, 5:] == 0).all()
        assert (probs[..., :5] == 0).any()


def test_unpatched_model_leaks_padding_without_the_mask_function(monkeypatch):
    """Guards the mask function: without it, transformers passes no mask to a custom attention function."""
    model = patch_model(tiny_model("bert"), r=0.5)
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, patching.ATTN_IMPLEMENTATION)
    ids, mask = padded_batch()
    leaked = model(input_ids=ids, attention_mask=mask).logits[:1]
    alone = model(input_ids=ids[:1, :5]).logits
    assert (leaked - alone).abs().max() > 1e-4


def test_layers_subset_and_unpatch_restore_softmax(count_calls):
    model = tiny_model("bert", "sdpa")
    ids, mask = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits

    patch_model(model, r=0.3, layers=[0, -1])
    assert patched_layers(model) == {0: 0.3, 2: 0.3}
    patched = model(input_ids=ids, attention_mask=mask).logits
    assert len(count_calls) == 2 and not torch.allclose(patched, before)

    patch_model(model, r=0.6, layers=slice(-1, None))
    assert patched_layers(model) == {2: 0.6}

    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "rsoftmax")
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-6, rtol=0)


def test_per_head_and_per_layer_rates():
    model = tiny_model("bert")
    patch_model(model, r=torch.tensor([0.0, 0.2, 0.5, 0.9]))
    assert patched_layers(model)[1] == pytest.approx([0.0, 0.2, 0.5, 0.9])
    patch_model(model, r=[0.1, 0.2, 0.3])
    assert patched_layers(model) == {0: 0.1, 1: 0.2, 2: 0.3}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"r": 1.5}, ValueError, "`r` must be a number in \\[0, 1\\]"),
        ({"r": [0.1, 0.2]}, ValueError, "one rate per patched layer"),
        ({"r": torch.tensor([0.1, 0.2])}, ValueError, "per head must have 4 values"),
        ({"r": 0.2, "layers": [3]}, ValueError, "`layers` must hold indices in \\[-3, 2\\]"),
        ({"r": 0.2, "layers": "0"}, TypeError, "`layers` must be None"),
    ],
)
def test_bad_settings_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        patch_model(tiny_model("bert"), **kwargs)


def test_model_without_registry_dispatch_is_refused():
    class OwnSoftmax(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1)

    with pytest.raises(NotImplementedError, match="OwnSoftmax computes its attention softmax in its own code"):
        patch_model(OwnSoftmax(), r=0.2)


def test_save_and_load_restore_the_settings(tmp_path):
    model = patch_model(tiny_model("bert"), r=0.4, layers=[1, 2])
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    reloaded = load_model(tmp_path).eval()
    assert patched_layers(reloaded) == {1: 0.4, 2: 0.4}
    assert reloaded.config._attn_implementation == "rsoftmax"
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert plain.config.rsoftmax["layers"] == [1, 2]


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert", "deberta-v2", "mpnet"])
def test_plain_from_pretrained_restores_per_head_rates(family, tmp_path):
    model = patch_model(tiny_family_model(family), r=torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]))
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)

    for reloaded in (load_model(tmp_path), AutoModelForSequenceClassification.from_pretrained(tmp_path)):
        assert patched_layers(reloaded.eval()) == patched_layers(model)
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)

    unpatch_model(model)
    model.save_pretrained(tmp_path / "unpatched")
    assert patched_layers(AutoModelForSequenceClassification.from_pretrained(tmp_path / "unpatched")) == {}


def test_transformers_alone_refuses_a_patched_checkpoint(tmp_path):
    """Without this package imported, loading fails loudly rather than running softmax."""
    patch_model(tiny_model("bert"), r=0.4).save_pretrained(tmp_path)
    code = (
        "from transformers import AutoModelForSequenceClassification as A\n"
        f"try:\n    A.from_pretrained({str(tmp_path)!r})\nexcept ValueError as e:\n    print(e)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 'attn_implementation="rsoftmax"` is not supported' in result.stdout


def test_record_sparsity_counts_unmasked_keys_only():
    model = patch_model(tiny_model("bert"), r=0.5)
    ids, mask = padded_batch()
    with record_sparsity(model) as stats:
        model(input_ids=ids, attention_mask=mask)
    # Rows of 5 keys (5 rows) and of 9 keys (9 rows) at r = 0.5 leave 2-3 and 4-5 exact zeros.
    overall = stats.overall()
    assert 0.4 <= overall <= 0.65
    assert set(stats.per_layer()) == {0, 1, 2} and len(stats.per_head()[0]) == 4
    assert not hasattr(patching.attention_modules(model)[0], "_rsoftmax_stats")


def test_decoder_models_are_found_too():
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = patch_model(GPT2LMHeadModel(config), r=0.5)
    assert patched_layers(model) == {0: 0.5, 1: 0.5}


def test_attention_stats_reports_achieved_sparsity_beside_the_requested_rates():
    model = patch_model(tiny_model("bert"), r=torch.tensor([[0.0, 0.3, 0.6, 0.9], [0.5] * 4]), layers=[0, 2])
    ids, mask = padded_batch()
    stats = attention_stats(model, {"input_ids": ids, "attention_mask": mask})

    assert set(stats["layers"]) == {0, 2}
    assert stats["layers"][0]["r"] == pytest.approx([0.0, 0.3, 0.6, 0.9])
    heads = stats["layers"][0]["heads"]
    # Rows of 5 and 9 unmasked keys: r = 0.9 keeps one key per row, r = 0 zeroes at most the smallest.
    assert heads[3] == pytest.approx((5 * 4 + 9 * 8) / (5 * 5 + 9 * 9))
    assert heads[0] <= 14 / 106 and heads[0] < heads[1] < heads[2] < heads[3]
    assert 0 < stats["overall"] < 1 and stats["layers"][2]["achieved"] == pytest.approx(
        sum(stats["layers"][2]["heads"]) / 4
    )


def test_per_layer_rates_follow_the_order_of_layers():
    model = tiny_model("bert")
    patch_model(model, r=[0.1, 0.9], layers=[2, 0])
    assert patched_layers(model) == {0: 0.9, 2: 0.1}
    with pytest.raises(ValueError, match="must not name a layer twice"):
        patch_model(model, r=0.2, layers=[0, -3])
    with pytest.raises(ValueError, match="must select at least one of the 3 layers"):
        patch_model(model, r=0.2, layers=slice(5, 9))


def test_t5_position_bias_is_kept_on_every_layer():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state

    patch_model(model, r=0.0, layers=[0])
    patching.attention_modules(model)[0].rsoftmax_r = None  # every layer on the softmax path
    output = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=0)
