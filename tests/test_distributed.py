"""Two real CPU processes (gloo DDP through torchrun) against one process on the same data and weights."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from rsoft_nlp import cli
from rsoft_nlp.glue import load_glue_tsv, subsample
from rsoft_nlp.metrics import compute_metrics
from rsoft_nlp.patching import load_model

REPO = Path(__file__).resolve().parent.parent
DEV_SAMPLES = 21  # odd, so the last evaluation batch is padded across the two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "rsoft_nlp.cli", "--", *argv,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_args(model_dir, glue_dir, out, *extra) -> list[str]:
    return [
        str(arg)
        for arg in (
            "--task", "mrpc", "--r", "0.3", "--model", model_dir, "--data-dir", glue_dir, "--output-dir", out,
            "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "4", "--max-train-samples", "16",
            "--max-eval-samples", DEV_SAMPLES, "--max-length", "48", "--log-every", "1", "--seed", "7", *extra,
        )
    ]  # fmt: skip


def single_process_metrics(model_dir: Path, glue_dir: Path) -> tuple[dict, int]:
    """Metrics of the saved weights on the same dev examples, computed in this one process with plain torch."""
    model = load_model(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dev = subsample(load_glue_tsv("mrpc", glue_dir)["validation"], DEV_SAMPLES)
    batch = tokenizer(
        list(dev["sentence1"]),
        list(dev["sentence2"]),
        truncation=True,
        max_length=48,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    return compute_metrics("mrpc", predictions, np.array(dev["label"])), len(predictions)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_two_processes_score_each_dev_example_once_and_match_one_process(
    tiny_bert_dir, glue_dir, tmp_path, checkpointing
):
    out = tmp_path / "ddp"
    extra = ["--gradient-checkpointing"] if checkpointing else []
    done = launch_two_processes(run_args(tiny_bert_dir, glue_dir, out, "--checkpoint-every", "3", *extra), tmp_path)

    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == DEV_SAMPLES
    # 16 examples, 4 per process and step: 2 optimizer steps per epoch.
    assert results["global_step"] == 4 and [h["global_step"] for h in results["history"]] == [2, 4]

    metrics, scored = single_process_metrics(out, glue_dir)
    assert scored == DEV_SAMPLES
    assert results["eval_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert results["eval_f1"] == pytest.approx(metrics["f1"], abs=1e-12)

    # Only the main process logs: the summary, each step's line and the results line appear once.
    assert done.stderr.count("***** Fine-tuning *****") == 1
    assert done.stderr.count("step 3: loss") == 1 and done.stderr.count("results written to") == 1
    # Only the main process writes: no leftovers of a second writer, each process's RNG state in the checkpoint.
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }

    # One process with the same global batch (8) sees the same examples per step: same weights.
    single = tmp_path / "single"
    cli.main(run_args(tiny_bert_dir, glue_dir, single, "--batch-size", "8", *extra))
    ddp_weights, single_weights = load_file(out / "model.safetensors"), load_file(single / "model.safetensors")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=1e-5, rtol=1e-4)
    single_results = json.loads((single / "all_results.json").read_text())
    assert single_results["eval_accuracy"] == results["eval_accuracy"]
