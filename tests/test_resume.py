"""Checkpoints, resuming after a crash or a SIGKILL, and gradient accumulation with a short last group."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config
from safetensors.torch import load_file

from rsoft_nlp.checkpointing import find_checkpoints, resolve_checkpoint
from rsoft_nlp.config import FinetuneConfig
from rsoft_nlp.trainer import finetune

REPO = Path(__file__).resolve().parent.parent
WORDS = "good bad great film movie story man woman car house dog cat".split()


class Crash(RuntimeError):
    pass


class Recorder:
    """Records each optimizer step's micro-batches and learning rate; optionally crashes before a step."""

    def __init__(self, crash_before_step: int | None = None):
        self.batches: dict[int, list] = {}
        self.lrs: dict[int, float] = {}
        self.crash_before_step = crash_before_step

    def on_micro_batch(self, global_step, batch):
        if global_step + 1 == self.crash_before_step:
            raise Crash(f"stopped before step {self.crash_before_step}")
        self.batches.setdefault(global_step + 1, []).append(batch["input_ids"].tolist())

    def on_step_end(self, global_step, lr):
        self.lrs[global_step] = lr


def write_sst2(folder: Path, examples: int) -> dict:
    rows = ["sentence,label"] + [
        f"the {WORDS[i % 12]} {WORDS[(3 * i) % 12]} was {'good' if i % 3 else 'bad'} {i},{int(i % 3 > 0)}"
        for i in range(examples)
    ]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    (folder / "dev.csv").write_text("\n".join(rows[:8]) + "\n")
    return {"train_file": str(folder / "train.csv"), "validation_file": str(folder / "dev.csv")}


@pytest.fixture(scope="module")
def dropout_bert_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny BERT with dropout on, so that resuming must also restore the RNG that draws the dropout masks."""
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("dropout-bert")
    torch.manual_seed(1)
    config = tiny_bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def resume_config(model_dir, data: dict, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(
        task="sst2", model=str(model_dir), r=0.25, output_dir=str(out), epochs=2, batch_size=2, lr=1e-3,
        warmup_ratio=0.2, seed=3, checkpoint_every=1, keep_checkpoints=2, log_every=1, **data,
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def test_resume_mid_epoch_matches_an_uninterrupted_run(dropout_bert_dir, tmp_path):
    data = write_sst2(tmp_path, 20)  # batch 2: 10 steps per epoch, 20 in all
    full = Recorder()
    finetune(resume_config(dropout_bert_dir, data, tmp_path / "full"), callbacks=[full])
    assert sorted(full.lrs) == list(range(1, 21)) and full.lrs[20] == 0.0

    out = tmp_path / "crashed"
    first = Recorder(crash_before_step=14)
    with pytest.raises(Crash):
        finetune(resume_config(dropout_bert_dir, data, out), callbacks=[first])
    assert [path.name for path in find_checkpoints(out / "checkpoints")] == ["checkpoint-12", "checkpoint-13"]
    state = json.loads((out / "checkpoints" / "checkpoint-13" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batches_done"]) == (13, 1, 3)

    second = Recorder()
    results = finetune(resume_config(dropout_bert_dir, data, out, resume_from="latest"), callbacks=[second])
    assert sorted(second.batches) == list(range(14, 21))
    assert second.batches == {step: full.batches[step] for step in range(14, 21)}
    for step in range(14, 21):
        assert second.lrs[step] == pytest.approx(full.lrs[step], abs=1e-12)

    weights, reference = load_file(out / "model.safetensors"), load_file(tmp_path / "full" / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)
    expected = json.loads((tmp_path / "full" / "all_results.json").read_text())
    assert results["global_step"] == 20 and results["eval_accuracy"] == expected["eval_accuracy"]
    assert [h["global_step"] for h in results["history"]] == [10, 20]
    # The first epoch's entry comes from the checkpoint; the second epoch's loss spans the crash.
    for resumed, uninterrupted in zip(results["history"], expected["history"], strict=True):
        assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-6)


KILL_SCRIPT = """
import os, signal, sys
from rsoft_nlp import checkpointing
from rsoft_nlp.config import FinetuneConfig
from rsoft_nlp.trainer import finetune

write = checkpointing.write_json_atomic

def write_then_die(path, data):
    # Dies while checkpoint-6 is being written: weights and optimizer saved, trainer state not yet.
    if path.name == "trainer_state.json" and data["global_step"] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)

checkpointing.write_json_atomic = write_then_die
finetune(FinetuneConfig(**__import__("json").loads(sys.argv[1])))
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_bert_dir, tmp_path):
    data = write_sst2(tmp_path, 12)  # 6 steps per epoch
    full = tmp_path / "full"
    finetune(resume_config(tiny_bert_dir, data, full, checkpoint_every=None))

    out = tmp_path / "killed"
    cfg = resume_config(tiny_bert_dir, data, out)
    # Same thread count as this process, so that both runs add up floats in the same order.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict())], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".tmp-checkpoint-6" / "model.safetensors").is_file()
    assert resolve_checkpoint("latest", checkpoints).name == "checkpoint-5"

    results = finetune(resume_config(tiny_bert_dir, data, out, resume_from="latest"))
    assert results["global_step"] == 12
    assert not (checkpoints / ".tmp-checkpoint-6").exists()
    assert [path.name for path in find_checkpoints(checkpoints)] == ["checkpoint-11", "checkpoint-12"]
    weights, reference = load_file(out / "model.safetensors"), load_file(full / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)


def test_resume_from_a_folder_without_a_complete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match="--resume-from must name a complete checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "checkpoint-3"), tmp_path)
    assert resolve_checkpoint("latest", tmp_path) is None


class GroupGradients:
    """At each optimizer step, keeps the accumulated gradients and a reference: the mean over the group's batches."""

    def __init__(self):
        self.group: list = []
        self.steps: dict[int, tuple[int, float]] = {}

    def on_micro_batch(self, global_step, batch):
        self.group.append({key: value.clone() for key, value in batch.items()})

    def before_optimizer_step(self, global_step, model):
        reference = copy.deepcopy(model)
        reference.zero_grad()
        for batch in self.group:
            (reference(**batch).loss / len(self.group)).backward()
        worst = max(
            (param.grad - ref.grad).abs().max().item()
            for param, ref in zip(model.parameters(), reference.parameters(), strict=True)
            if param.grad is not None
        )
        self.steps[global_step + 1] = (len(self.group), worst)
        self.group = []


def test_accumulation_with_a_short_last_group(tiny_bert_dir, tmp_path):
    data = write_sst2(tmp_path, 10)
    recorder, gradients = Recorder(), GroupGradients()
    cfg = resume_config(tiny_bert_dir, data, tmp_path / "run", batch_size=1, grad_accum=4, checkpoint_every=2)
    results = finetune(cfg, callbacks=[recorder, gradients])

    # 10 micro-batches per epoch in groups of 4, 4 and 2: 3 optimizer steps per epoch.
    assert results["global_step"] == 6 and sorted(recorder.lrs) == list(range(1, 7))
    assert recorder.lrs[6] == 0.0 and all(lr > 0 for step, lr in recorder.lrs.items() if step < 6)
    assert {step: size for step, (size, _) in gradients.steps.items()} == {1: 4, 2: 4, 3: 2, 4: 4, 5: 4, 6: 2}
    assert max(worst for _, worst in gradients.steps.values()) < 1e-6
    assert [h["global_step"] for h in results["history"]] == [3, 6]
    names = [path.name for path in find_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-4", "checkpoint-6"]


def test_resuming_from_the_final_checkpoint_trains_no_more(tiny_bert_dir, tmp_path):
    data = write_sst2(tmp_path, 12)
    out = tmp_path / "run"
    first = finetune(resume_config(tiny_bert_dir, data, out, epochs=1, checkpoint_every=3))
    recorder = Recorder()
    again = finetune(resume_config(tiny_bert_dir, data, out, epochs=1, checkpoint_every=3, resume_from="latest"),
                     callbacks=[recorder])  # fmt: skip
    assert not recorder.batches and again["global_step"] == first["global_step"] == 6
    assert again["history"] == first["history"]
    # The runtime covers the whole run up to its last checkpoint, not only the (empty) resumed part.
    state = json.loads((find_checkpoints(out / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert again["train_runtime"] >= state["train_runtime"] > 0


def test_resuming_with_other_settings_is_refused(tiny_bert_dir, tmp_path):
    from rsoft_nlp.config import ConfigError

    data = write_sst2(tmp_path, 8)
    out = tmp_path / "run"
    finetune(resume_config(tiny_bert_dir, data, out, epochs=1, checkpoint_every=2))
    with pytest.raises(ConfigError, match="same settings.*r 0.25 -> 0.5, batch_size 2 -> 4"):
        finetune(resume_config(tiny_bert_dir, data, out, epochs=1, batch_size=4, r=0.5, resume_from="latest"))
