"""rsoft_nlp: fine-tune pretrained BERT-style encoders with r-softmax attention.

Glossary:
    r: the sparsity rate in [0, 1], the fraction of a row's unmasked keys that r-softmax sets exactly to zero.
    t: the threshold (the paper's symbol) that r is turned into, row by row.
    scores / probabilities: what goes into an attention softmax (one row per query) and what comes out.
    global_step: the number of optimizer updates; micro-batches of gradient accumulation are not steps.
    task: a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), with its label names and metric.
"""

from rsoft_nlp.patching import (
    attention_stats,
    linear_schedule,
    load_model,
    patch_model,
    patched_layers,
    record_sparsity,
    unpatch_model,
)
from rsoft_nlp.rsoftmax import RSoftmax, r_softmax, t_softmax

__version__ = "0.1.0"

__all__ = [
    "RSoftmax",
    "attention_stats",
    "linear_schedule",
    "load_model",
    "patch_model",
    "patched_layers",
    "r_softmax",
    "record_sparsity",
    "t_softmax",
    "unpatch_model",
]
