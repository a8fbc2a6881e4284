"""Every encoder family in the README's table, through every load path, on tiny random models."""

import pytest
import torch
from conftest import NO_SDPA, PATCHED_FAMILIES, padded_batch, tiny_family_model

from rsoft_nlp import attention
from rsoft_nlp.attention import attention_modules
from rsoft_nlp.patching import linear_schedule, patch_model, patched_layers, unpatch_model

LOAD_PATHS = [None, "eager", "sdpa"]


def family_model(family, load_path=None, **overrides):
    if load_path == "sdpa" and family in NO_SDPA:
        pytest.skip(f"transformers offers no sdpa attention for {family}")
    return tiny_family_model(family, load_path, **overrides)


@pytest.mark.parametrize("load_path", LOAD_PATHS, ids=lambda p: str(p))
@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_family_runs_r_softmax_once_per_layer_with_the_mask(family, load_path, count_calls):
    model = patch_model(family_model(family, load_path), r=0.5)
    ids, mask = padded_batch()

    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(count_calls) == 2
    alone = model(input_ids=ids[:1, :5]).logits
    torch.testing.assert_close(out.logits[:1], alone, atol=1e-5, rtol=0)

    # The probabilities returned are the sparse ones: padded keys exactly zero for real queries, zeros elsewhere too.
    assert len(out.attentions) == 2
    for probs in out.attentions:
        assert (probs[0, :, :5, 5:] == 0).all()
        assert (probs[0, :, :5, :5] == 0).any()
        torch.testing.assert_close(probs[1].sum(-1), torch.ones(probs.shape[1:3]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_family_adapter_is_faithful_to_the_original_attention(family, monkeypatch):
    """With softmax in place of r-softmax, the patched model computes exactly what the original does."""
    model = family_model(family)
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask).logits

    monkeypatch.setattr(attention, "r_softmax", lambda scores, r, dim=-1: torch.softmax(scores, dim=dim))
    patch_model(model, r=0.5)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", PATCHED_FAMILIES)
def test_family_rates_per_layer_and_head_unpatch_and_repatch(family, count_calls):
    model = family_model(family)
    ids, mask = padded_batch()
    before = model(input_ids=ids, attention_mask=mask).logits

    # ALBERT shares one attention module between its layers, so it has one patchable layer.
    n = len(attention_modules(model))
    patch_model(model, r=torch.tensor([[0.9, 0.5, 0.2, 0.0], [0.0, 0.2, 0.5, 0.9]])[:n])
    assert patched_layers(model)[0] == pytest.approx([0.9, 0.5, 0.2, 0.0])
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    # Head 0 of layer 0 (r = 0.9) keeps one key per row; head 3 (r = 0) keeps all but at most the smallest.
    real = out.attentions[0][1]
    assert ((real[0] > 0).sum(-1) == 1).all() and ((real[3] > 0).sum(-1) >= 8).all()

    patch_model(model, r=linear_schedule(0.1, 0.6, n))
    once = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, r=linear_schedule(0.1, 0.6, n))
    assert list(patched_layers(model).values()) == pytest.approx(linear_schedule(0.1, 0.6, n))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, once, atol=0, rtol=0)
    patch_model(model, r=0.3, layers=[-1])
    assert patched_layers(model) == {n - 1: 0.3}

    unpatch_model(model)
    assert patched_layers(model) == {} and not hasattr(model.config, "rsoftmax")
    count_calls.clear()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0)
    assert count_calls == []


def test_modernbert_sliding_window_keys_do_not_count_toward_r():
    # Layer 1 is local with a window of 4 (2 keys each side); 12 tokens, so most rows see 5 keys of 12.
    model = family_model("modernbert", global_attn_every_n_layers=2, local_attention=4)
    patch_model(model, r=0.5)
    ids = torch.arange(5, 17).unsqueeze(0)
    local = model(input_ids=ids, output_attentions=True).attentions[1][0]
    window = (torch.arange(12)[:, None] - torch.arange(12)[None, :]).abs() <= 2
    assert (local[:, ~window] == 0).all()
    # r = 0.5 of a row's n visible keys zeroes ceil(0.5 * (n - 1)) of them: r counts the window, not the row.
    kept = (local > 0).sum(-1)
    visible = window.sum(-1)
    assert (kept == visible - torch.ceil((visible - 1) * 0.5).long()).all()


UNSUPPORTED = {
    "convbert": {},
    "squeezebert": {"embedding_size": 32, "intermediate_size": 32, "q_groups": 1, "k_groups": 1, "v_groups": 1},
    "funnel": {"block_sizes": [1, 1], "num_hidden_layers": None, "d_model": 32, "n_head": 4, "d_head": 8},
    "xlm": {"emb_dim": 32, "n_layers": 2, "n_heads": 4},
    "flaubert": {"emb_dim": 32, "n_layers": 2, "n_heads": 4},
    "luke": {"entity_vocab_size": 10, "entity_emb_size": 16},
    "big_bird": {"attention_type": "block_sparse", "block_size": 2, "num_random_blocks": 1},
    "longformer": {"attention_window": 4},
    "nystromformer": {"num_landmarks": 4, "segment_means_seq_len": 8},
    "yoso": {},
    "mra": {},
    "fnet": {},
}


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_is_refused_by_name(family):
    model = tiny_family_model(family, **UNSUPPORTED[family])
    with pytest.raises(NotImplementedError, match=f"\\({family}\\) is not supported: .*see the README's table"):
        patch_model(model, r=0.2)
