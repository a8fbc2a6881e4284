"""Runs on the real MiniLM checkpoint and real MRPC text: minutes on a CPU, so marked slow."""

import json

import pytest

from rsoft_nlp import cli

pytestmark = pytest.mark.slow


def test_minilm_learns_mrpc_with_r_softmax(minilm_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    cli.main(
        [
            "--config", "configs/mrpc.yaml", "--r", "0.2", "--model", str(minilm_dir), "--data-dir", str(glue_dir),
            "--output-dir", str(out), "--epochs", "3", "--batch-size", "16", "--max-train-samples", "320",
            "--max-eval-samples", "128", "--max-length", "96",
        ]
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    losses = [epoch["train_loss"] for epoch in results["history"]]
    assert losses[-1] < losses[0] - 0.02, losses
    assert results["eval_samples"] == 128 and results["global_step"] == 60
    assert 0 < results["eval_f1"] <= 1 and 0 < results["eval_accuracy"] <= 1
    assert 0.15 < results["eval_attention_sparsity"] < 0.3
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
