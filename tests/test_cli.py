import json
from pathlib import Path

import pytest
import yaml

from rsoft_nlp import cli
from rsoft_nlp.config import ConfigError, FinetuneConfig, load_yaml
from rsoft_nlp.patching import load_model, patched_layers

REPO = Path(__file__).resolve().parent.parent


def run_cli(*argv):
    cli.main([str(arg) for arg in argv])


def test_cli_fine_tunes_a_tiny_model_on_real_mrpc(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    run_cli(
        "--task", "mrpc", "--r", "0.2", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out,
        "--epochs", "2", "--batch-size", "8", "--max-train-samples", "32", "--max-eval-samples", "20",
        "--max-length", "256", "--layers", "0,2", "--log-every", "1",
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == "mrpc" and results["r"] == 0.2 and results["patched_layers"] == [0, 2]
    assert results["eval_samples"] == 20 and results["global_step"] == 8 and results["epoch"] == 2
    assert {"eval_accuracy", "eval_f1", "train_runtime", "train_samples_per_second"} <= set(results)
    assert set(results["attention_sparsity"]["per_layer"]) == {"0", "2"}
    assert 0.1 < results["eval_attention_sparsity"] < 0.3

    config = json.loads((out / "run_config.json").read_text())
    assert config["max_length_used"] == 64 and config["lr"] == 5e-5

    model = load_model(out)
    assert patched_layers(model) == {0: 0.2, 2: 0.2}
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}


def test_cli_without_r_runs_plain_softmax_from_csv_files(tiny_bert_dir, tmp_path):
    rows = ["sentence,label"] + [f"the film was {'good' if i % 2 else 'bad'} {i},{i % 2}" for i in range(12)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:7]) + "\n")
    out = tmp_path / "run"
    run_cli(
        "--task", "sst2", "--model", tiny_bert_dir, "--train-file", tmp_path / "train.csv",
        "--validation-file", tmp_path / "dev.csv", "--output-dir", out, "--epochs", "1", "--batch-size", "4",
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["r"] is None and results["patched_layers"] == [] and results["attention_sparsity"] is None
    assert results["eval_samples"] == 6 and results["global_step"] == 3
    assert not hasattr(load_model(out).config, "rsoftmax")


def test_stsb_is_regression(tiny_bert_dir, tmp_path):
    rows = ["sentence1\tsentence2\tlabel"] + [f"a man {i}\tthe dog\t{i % 6}.0" for i in range(8)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    run_cli(
        "--task", "stsb", "--model", tiny_bert_dir, "--train-file", tmp_path / "train.tsv", "--r", "0.5",
        "--validation-file", tmp_path / "train.tsv", "--output-dir", out, "--epochs", "1", "--batch-size", "4",
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert {"eval_pearson", "eval_spearmanr"} <= set(results)
    assert load_model(out).config.num_labels == 1


def test_offline_without_local_model_fails_before_training(offline, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--task", "mrpc", "--r", "0.2", "--output-dir", tmp_path / "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model 'bert-base-uncased'" in err and "pass --model with a local folder" in err
    assert not (tmp_path / "run").exists()


def test_offline_without_local_data_names_data_dir(offline, tiny_bert_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("--task", "rte", "--model", tiny_bert_dir, "--output-dir", tmp_path / "run")
    assert "pass --data-dir" in capsys.readouterr().err


def test_all_config_problems_are_reported_at_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--task", "mrpc", "--r", "1.5", "--epochs", "0", "--batch-size", "0", "--data-dir", "/nonexistent")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for message in (
        "--r must be a number in [0, 1]",
        "--epochs must be > 0, got 0.0",
        "--batch-size must be an integer >= 1, got 0",
        "--data-dir must be an existing folder, got '/nonexistent'",
    ):
        assert message in err


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: rte\nlr: 1.0e-5\nepochs: 2\n")
    args = cli.build_parser().parse_args(["--config", str(path), "--lr", "3e-5", "--r", "0.1"])
    cfg = cli.config_from_args(args)
    assert (cfg.task, cfg.lr, cfg.epochs, cfg.r, cfg.batch_size) == ("rte", 3e-5, 2, 0.1, 32)

    path.write_text("task: rte\nlearning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) learning_rate"):
        load_yaml(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    settings = load_yaml(path)
    if "task" in settings:
        cfg = FinetuneConfig(**settings).validate()
        assert cfg.task == path.stem
    else:
        assert yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert (config.num_machines > 1) == (path.stem == "multi-node")


def test_new_flags_are_validated_together():
    with pytest.raises(ConfigError) as error:
        FinetuneConfig(
            checkpoint_every=0, keep_checkpoints=0, eval_every=-1, lora_rank=0, lora_dropout=1.0, report_to="x",
            push_to_hub=True, resume_from="/nonexistent", hub_token="hf_secret",
        ).validate()  # fmt: skip
    message = str(error.value)
    for expected in (
        "--checkpoint-every must be an integer >= 1, got 0",
        "--keep-checkpoints must be an integer >= 1, got 0",
        "--eval-every must be an integer >= 1, got -1",
        "--lora-rank must be an integer >= 1, got 0",
        "--lora-dropout must lie in [0, 1), got 1.0",
        "--report-to must be one of",
        "--push-to-hub needs --hub-model-id NAME",
        "--resume-from must be 'latest' or an existing checkpoint folder, got '/nonexistent'",
    ):
        assert expected in message
    cfg = FinetuneConfig(hub_token="hf_secret")
    assert "hf_secret" not in repr(cfg) and "hub_token" not in cfg.to_dict()


def test_yaml_values_of_the_wrong_type_are_reported_by_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: mrpc\nlr: 2e-5\nepochs: three\nlayers: 3\nr: true\nmodel: null\n")
    with pytest.raises(ConfigError) as error:
        cli.config_from_args(cli.build_parser().parse_args(["--config", str(path)]))
    message = str(error.value)
    for expected in (
        "--epochs must be a finite number, got 'three'",
        "--layers must be a list of integers, got 3",
        "--r must be a finite number, got True",
        "--model must be set, got None",
    ):
        assert expected in message
    assert "--lr" not in message

    path.write_text("task: mrpc\nlr: 2e-5\n")
    assert cli.config_from_args(cli.build_parser().parse_args(["--config", str(path)])).lr == 2e-5
    path.write_text("task: [mrpc\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="--config must be a readable YAML file"):
        load_yaml(tmp_path / "missing.yaml")


def test_infinite_numbers_missing_model_folders_and_file_outputs_are_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        run_cli("--epochs", "inf", "--lr", "nan", "--output-dir", tmp_path / "a-file")
    err = capsys.readouterr().err
    assert "--epochs must be a finite number, got inf" in err and "--lr must be a finite number, got nan" in err
    assert "--output-dir must be a folder" in err

    with pytest.raises(SystemExit):
        run_cli("--model", "./no/such/model", "--output-dir", tmp_path / "run")
    assert (
        "--model must be an existing checkpoint folder or a Hub id, got './no/such/model'" in capsys.readouterr().err
    )


def test_results_are_strict_json_with_default_permissions(tmp_path):
    import os
    import stat

    from rsoft_nlp.checkpointing import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"pearson": float("nan"), "values": [1.0, float("inf")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"pearson": None, "values": [1.0, None]}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~mask


def test_lora_and_hub_flags_need_the_flag_that_enables_them(capsys):
    with pytest.raises(SystemExit):
        run_cli("--lora-rank", "4", "--lora-targets", "query", "--hub-model-id", "me/x", "--hub-private")
    err = capsys.readouterr().err
    assert "--lora-rank needs --peft lora, got --lora-rank 4 without it" in err
    assert "--lora-targets needs --peft lora" in err
    assert "--hub-model-id needs --push-to-hub" in err and "--hub-private needs --push-to-hub" in err
