"""Experiment trackers through Accelerate: TensorBoard event files read back."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rsoft_nlp.config import ConfigError, FinetuneConfig
from rsoft_nlp.trainer import finetune


def test_tensorboard_receives_loss_lr_metrics_and_sparsity(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    cfg = FinetuneConfig(
        task="mrpc", model=str(tiny_bert_dir), data_dir=str(glue_dir), output_dir=str(out), r=0.3, epochs=2,
        batch_size=4, max_train_samples=16, max_eval_samples=8, max_length=48, log_every=1, report_to="tensorboard",
    )  # fmt: skip
    finetune(cfg)

    # The run's scalars; the settings go to a sub-folder as hyperparameters.
    run_logs = out / "logs" / "mrpc-finetune"
    assert len(list(run_logs.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run_logs))
    events.Reload()
    scalars = events.Tags()["scalars"]

    def steps(tag):
        return [event.step for event in events.Scalars(tag)]

    assert steps("train_loss") == steps("learning_rate") == list(range(1, 9))
    assert events.Scalars("learning_rate")[-1].value == 0.0
    for tag in ("eval_accuracy", "eval_f1", "eval_attention_sparsity", "train_loss", "epoch"):
        assert tag in scalars
    assert steps("eval_accuracy") == [4, 8]
    assert {f"eval_attention_sparsity_layer_{i}" for i in range(3)} <= set(scalars)
    assert 0.2 < events.Scalars("eval_attention_sparsity")[-1].value < 0.4


def test_a_missing_tracker_package_is_reported_with_the_flag():
    missing = [name for name in ("wandb", "mlflow") if __import__("importlib.util").util.find_spec(name) is None]
    if not missing:
        pytest.skip("wandb and mlflow are both installed")
    with pytest.raises(ConfigError, match=f"--report-to {missing[0]} needs the {missing[0]} package"):
        FinetuneConfig(report_to=missing[0]).validate()
    with pytest.raises(ConfigError, match="--report-to must be one of none, tensorboard, wandb, mlflow, all"):
        FinetuneConfig(report_to="comet").validate()
