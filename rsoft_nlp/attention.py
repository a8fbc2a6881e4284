"""Where r-softmax enters an encoder's attention: the registry function and the per-family adapters.

Most encoders in transformers compute attention through its attention-function registry; r-softmax is registered
there as the implementation ``"rsoftmax"``, with a mask function of the same name so the padding (and sliding
window) mask reaches it as an additive float mask. A few strong encoders (DeBERTa, DeBERTa-v2/v3, MPNet,
MegatronBERT, RemBERT) compute their softmax in their own attention code; for these an adapter forward is bound to
each patched attention module and removed again by unpatching.

Every path ends in :func:`attention_probs`, the single place that calls :func:`~rsoft_nlp.rsoftmax.r_softmax`.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from rsoft_nlp.rsoftmax import r_softmax

ATTN_IMPLEMENTATION = "rsoftmax"
RATE_ATTR = "rsoftmax_r"
STATS_ATTR = "_rsoftmax_stats"

# Encoders (by their transformers package) whose attention neither dispatches through the registry nor has an
# adapter here, and why.
UNSUPPORTED = {
    "convbert": "its span-based dynamic convolution heads are mixed into the attention heads",
    "squeezebert": "its attention is built from grouped 1-D convolutions in a channels-first layout",
    "funnel": "its relative attention pools the query sequence between blocks",
    "xlm": "its attention (shared with Flaubert) applies its own boolean mask and float casts",
    "flaubert": "its attention (shared with XLM) applies its own boolean mask and float casts",
    "luke": "its entity-aware attention splits word and entity queries into four score blocks",
    "big_bird": "its block-sparse attention computes several partial softmaxes",
    "longformer": "its sliding-window attention computes banded scores with global tokens",
    "nystromformer": "it approximates softmax attention with landmark matrices",
    "yoso": "it approximates attention with locality-sensitive hashing, without a softmax",
    "mra": "it approximates attention with multi-resolution blocks",
    "fnet": "it mixes tokens with a Fourier transform and has no attention",
}


def attention_probs(module: nn.Module, scores: Tensor) -> Tensor:
    """r-softmax of ``scores`` with the module's rate, or plain softmax when the module is not marked.

    Args:
        module: The attention module; ``rsoftmax_r`` (set by the patcher) holds a float or a ``(1, heads, 1, 1)``
            tensor of per-head rates.
        scores: ``(batch, heads, q_len, k_len)`` with the mask already applied: masked keys are ``-inf`` or at
            most ``torch.finfo(dtype).min``, so r-softmax gives them exactly 0 and leaves them out of ``r``.

    Returns:
        Probabilities of the same shape and dtype as ``scores``.
    """
    r = getattr(module, RATE_ATTR, None)
    if r is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    if isinstance(r, Tensor):
        r = r.to(scores.device)
    probs = r_softmax(scores, r, dim=-1)

    stats = getattr(module, STATS_ATTR, None)
    if stats is not None:
        stats.update(probs.detach(), scores.detach())
    return probs


def rsoftmax_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention through :func:`attention_probs`, registered as ``"rsoftmax"``.

    Args:
        module: The attention module.
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, k_len, head_dim)``; grouped key/value heads are repeated to ``heads``.
        value: ``(batch, kv_heads, k_len, head_dim)``.
        attention_mask: Additive float mask broadcasting to ``(batch, heads, q_len, k_len)``, or ``None``.
        scaling: Factor on the scores; ``head_dim ** -0.5`` when ``None``.
        dropout: Dropout on the probabilities, applied in training mode only.
        position_bias: Additive bias on the scores (T5-style relative positions), or ``None``.
        **kwargs: Other arguments of transformers' attention call; ones that would change the scores in ways
            implemented here only for softmax (logit soft-capping, attention sinks) are refused.

    Returns:
        The attention output ``(batch, q_len, heads, head_dim)`` and the probabilities
        ``(batch, heads, q_len, k_len)``.

    Raises:
        NotImplementedError: If the model passes soft-capping or attention sinks.
    """
    refused = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None]
    if refused:
        raise NotImplementedError(
            f"r-softmax attention does not support {', '.join(refused)}, which {type(module).__name__} uses"
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.size(1) != query.size(1):
        groups = query.size(1) // key.size(1)
        # (batch, kv_heads, k_len, head_dim) -> (batch, heads, k_len, head_dim)
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)

    # (batch, heads, q_len, k_len)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.size(-2)]

    probs = attention_probs(module, scores)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    # (batch, heads, q_len, head_dim) -> (batch, q_len, heads, head_dim)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


AttentionInterface.register(ATTN_IMPLEMENTATION, rsoftmax_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def _merge_heads(context: Tensor) -> Tensor:
    # (batch, heads, q_len, head_dim) -> (batch, q_len, heads * head_dim)
    context = context.permute(0, 2, 1, 3).contiguous()
    return context.view(*context.shape[:2], -1)


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    # (batch, len, heads * head_dim) -> (batch, heads, len, head_dim)
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _self_attention_only(module: nn.Module, encoder_hidden_states, cache) -> None:
    if encoder_hidden_states is not None or cache is not None:
        raise NotImplementedError(
            f"r-softmax supports self-attention without a cache in {type(module).__name__}, not cross-attention "
            "or cached decoding"
        )


def _attend(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *terms: Tensor | None):
    """Scaled dot-product attention with additive ``terms`` (biases, masks) through :func:`attention_probs`.

    Args:
        module: The attention module, with ``attention_head_size`` and ``dropout``.
        query: ``(batch, heads, q_len, head_dim)``; ``key`` and ``value`` likewise with ``k_len``.
        *terms: Additive terms broadcasting to ``(batch, heads, q_len, k_len)``; ``None`` ones are skipped.

    Returns:
        The merged heads ``(batch, q_len, heads * head_dim)`` and the probabilities ``(batch, heads, q_len, k_len)``.
    """
    # (batch, heads, q_len, k_len)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(module.attention_head_size)
    for term in terms:
        if term is not None:
            scores = scores + term
    probs = module.dropout(attention_probs(module, scores))
    return _merge_heads(torch.matmul(probs, value)), probs


def _bert_style_forward(
    self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, output_attentions=False, **kw
):
    """Adapter forward for MegatronBERT and RemBERT self-attention (query/key/value projections, additive mask)."""
    _self_attention_only(self, encoder_hidden_states, cache)
    query = _split_heads(self.query(hidden_states), self.attention_head_size)
    key = _split_heads(self.key(hidden_states), self.attention_head_size)
    value = _split_heads(self.value(hidden_states), self.attention_head_size)
    return _attend(self, query, key, value, attention_mask)


def _mpnet_forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    """Adapter forward for MPNet self-attention: relative position bias plus the additive padding mask."""
    query = _split_heads(self.q(hidden_states), self.attention_head_size)
    key = _split_heads(self.k(hidden_states), self.attention_head_size)
    value = _split_heads(self.v(hidden_states), self.attention_head_size)
    context, probs = _attend(self, query, key, value, position_bias, attention_mask)
    output = self.o(context)
    return (output, probs) if output_attentions else (output,)


def _masked_scores(scores: Tensor, attention_mask: Tensor) -> Tensor:
    # DeBERTa's mask is boolean (batch, 1, q_len, k_len); masked entries get the dtype's minimum, as it does.
    return scores.masked_fill(~attention_mask.bool(), torch.finfo(scores.dtype).min)


def _deberta_forward(
    self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None, **kwargs
):
    """Adapter forward for DeBERTa (v1) disentangled self-attention."""
    rel_embeddings = kwargs.get("rel_embeddings")
    if query_states is not None:
        raise NotImplementedError("r-softmax in DeBERTa supports self-attention, not the enhanced mask decoder")
    # (batch, len, 3 * hidden) -> (batch, heads, len, 3 * head_dim), split into query, key and value
    query, key, value = self.transpose_for_scores(self.in_proj(hidden_states)).chunk(3, dim=-1)
    query = query + self.transpose_for_scores(self.q_bias[None, None, :])
    value = value + self.transpose_for_scores(self.v_bias[None, None, :])

    scale_factor = 1 + len(self.pos_att_type)
    query = query / math.sqrt(query.size(-1) * scale_factor)
    # (batch, heads, q_len, k_len)
    scores = torch.matmul(query, key.transpose(-1, -2))
    if self.relative_attention and rel_embeddings is not None and relative_pos is not None:
        rel_embeddings = self.pos_dropout(rel_embeddings)
        scores = scores + self.disentangled_att_bias(query, key, relative_pos, rel_embeddings, scale_factor)
    if self.head_logits_proj is not None:
        # (batch, heads, q, k) -> (batch, q, k, heads) -> (batch, heads, q, k)
        scores = self.head_logits_proj(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    probs = self.dropout(attention_probs(self, _masked_scores(scores, attention_mask)))
    mixed = probs
    if self.head_weights_proj is not None:
        # NOTE: talking-heads DeBERTa (off by default) mixes the heads' probabilities after r-softmax, so the mixed
        # rows need not keep the exact zeros; `output_attentions` returns the r-softmax probabilities before mixing.
        # (batch, heads, q, k) -> (batch, q, k, heads) -> (batch, heads, q, k)
        mixed = self.head_weights_proj(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return _merge_heads(torch.matmul(mixed, value)), (probs if output_attentions else None)


def _deberta_v2_forward(
    self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None, **kwargs
):
    """Adapter forward for DeBERTa-v2/v3 disentangled self-attention."""
    rel_embeddings = kwargs.get("rel_embeddings")
    if query_states is not None:
        raise NotImplementedError("r-softmax in DeBERTa-v2 supports self-attention, not the enhanced mask decoder")
    heads = self.num_attention_heads
    # Each is (batch * heads, len, head_dim), as the relative bias expects.
    query = self.transpose_for_scores(self.query_proj(hidden_states), heads)
    key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    value = self.transpose_for_scores(self.value_proj(hidden_states), heads)

    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = math.sqrt(query.size(-1) * scale_factor)
    # (batch * heads, q_len, k_len)
    scores = torch.bmm(query, key.transpose(-1, -2) / scale)
    if self.relative_attention:
        rel_embeddings = self.pos_dropout(rel_embeddings)
        scores = scores + self.disentangled_attention_bias(query, key, relative_pos, rel_embeddings, scale_factor)
    # (batch * heads, q_len, k_len) -> (batch, heads, q_len, k_len)
    scores = scores.view(-1, heads, scores.size(-2), scores.size(-1))

    probs = self.dropout(attention_probs(self, _masked_scores(scores, attention_mask)))
    # (batch, heads, q_len, k_len) -> (batch * heads, q_len, k_len)
    context = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), value)
    # (batch * heads, q_len, head_dim) -> (batch, heads, q_len, head_dim)
    context = context.view(-1, heads, context.size(-2), context.size(-1))
    return _merge_heads(context), (probs if output_attentions else None)


@functools.cache
def _adapters() -> dict[type, Callable]:
    from transformers.models.deberta.modeling_deberta import DisentangledSelfAttention as DebertaSelfAttention
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention as DebertaV2SelfAttention
    from transformers.models.megatron_bert.modeling_megatron_bert import MegatronBertSelfAttention
    from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention
    from transformers.models.rembert.modeling_rembert import RemBertSelfAttention

    return {
        DebertaSelfAttention: _deberta_forward,
        DebertaV2SelfAttention: _deberta_v2_forward,
        MPNetSelfAttention: _mpnet_forward,
        MegatronBertSelfAttention: _bert_style_forward,
        RemBertSelfAttention: _bert_style_forward,
    }


@functools.cache
def dispatches_through_registry(cls: type) -> bool:
    """Whether the class's ``forward`` looks its attention function up in transformers' registry."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of ``model`` that r-softmax can enter, in layer order.

    These are modules that dispatch through transformers' attention registry and modules with an adapter forward.
    Cross-attention modules (named ``crossattention``) are left out: encoders have none.
    """
    adapters = _adapters()
    return [
        module
        for name, module in model.named_modules()
        if (type(module) in adapters or dispatches_through_registry(type(module)))
        and "crossattention" not in name.split(".")
    ]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be patched, when it holds modules of a family known to compute attention its own way."""
    for module in model.modules():
        parts = type(module).__module__.split(".")
        if parts[:2] == ["transformers", "models"] and len(parts) > 2 and parts[2] in UNSUPPORTED:
            return f"{type(module).__name__} ({parts[2]}) is not supported: {UNSUPPORTED[parts[2]]}"
    return None


def needs_adapter(module: nn.Module) -> bool:
    return type(module) in _adapters()


def bind_adapter(module: nn.Module) -> None:
    """Binds the family's adapter forward to ``module`` (an instance attribute, so the class stays untouched)."""
    module.forward = types.MethodType(_adapters()[type(module)], module)


def unbind_adapter(module: nn.Module) -> None:
    if "forward" in vars(module):
        del module.forward
