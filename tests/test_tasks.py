"""Every GLUE task from the command line: real files where the shared folder has them, classic-layout fixtures for
QQP and MNLI; test-split submission files; best model, early stopping and evaluation every N steps."""

import json
from pathlib import Path

import pytest

from rsoft_nlp import cli
from rsoft_nlp.glue import get_task, load_glue_tsv
from rsoft_nlp.modeling import load_finetuned
from rsoft_nlp.patching import patched_layers
from rsoft_nlp.predict import submission_rows

SMALL = ["--epochs", "1", "--batch-size", "8", "--max-train-samples", "16", "--max-eval-samples", "9", "--r", "0.2"]


def run_cli(*argv):
    cli.main([str(arg) for arg in argv])


def read_submission(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


REAL_TASKS = {
    # task: (submission file, allowed predictions; None for scores)
    "cola": ("CoLA", {"0", "1"}),
    "sst2": ("SST-2", {"0", "1"}),
    "mrpc": ("MRPC", {"0", "1"}),
    "stsb": ("STS-B", None),
    "rte": ("RTE", {"entailment", "not_entailment"}),
    "wnli": ("WNLI", {"0", "1"}),
}


@pytest.mark.parametrize("task", sorted(REAL_TASKS))
def test_real_task_trains_evaluates_and_writes_its_submission(task, tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    run_cli("--config", Path("configs") / f"{task}.yaml", "--model", tiny_bert_dir, "--data-dir", glue_dir,
            "--output-dir", out, "--do-predict", "--max-predict-samples", "40", "--max-length", "48",
            *SMALL)  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == task and results["eval_samples"] == 9
    assert f"eval_{get_task(task).metric}" in results

    name, allowed = REAL_TASKS[task]
    rows = read_submission(out / "predictions" / f"{name}.tsv")
    test = load_glue_tsv(task, glue_dir)["test"]
    assert [int(index) for index, _ in rows] == list(test["idx"])[:40]
    if allowed is None:
        assert all(0.0 <= float(score) <= 5.0 for _, score in rows)
    else:
        assert {prediction for _, prediction in rows} <= allowed
    assert results["predictions"] == [str(out / "predictions" / f"{name}.tsv")]


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n")


def qqp_folder(root: Path) -> Path:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [[str(i), str(2 * i), str(2 * i + 1), f"is the dog {i} good", f"is the cat {i % 3} good", str(i % 2)]
            for i in range(14)]  # fmt: skip
    write_tsv(root / "QQP" / "train.tsv", header, rows)
    write_tsv(root / "QQP" / "dev.tsv", header, rows[:7])
    write_tsv(
        root / "QQP" / "test.tsv",
        ["id", "question1", "question2"],
        [[str(100 + i), r[3], r[4]] for i, r in enumerate(rows[:5])],
    )
    return root


MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]  # fmt: skip
LABELS = ["entailment", "neutral", "contradiction"]


def mnli_rows(count: int, genre: str, labels: int) -> list[list[str]]:
    rows = []
    for i in range(count):
        premise, hypothesis = f"the man saw a {genre} {i}", f"a woman ran {i % 4}"
        gold = LABELS[i % 3]
        rows.append([str(i), str(i), f"{i}n", genre, "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise, hypothesis]
                    + [gold] * labels + [gold])  # fmt: skip
    return rows


def mnli_folder(root: Path) -> Path:
    folder = root / "MNLI"
    write_tsv(folder / "train.tsv", [*MNLI_COLUMNS, "label1", "gold_label"], mnli_rows(15, "fiction", 1))
    dev_header = [*MNLI_COLUMNS, *(f"label{i}" for i in range(1, 6)), "gold_label"]
    write_tsv(folder / "dev_matched.tsv", dev_header, mnli_rows(11, "fiction", 5))
    write_tsv(folder / "dev_mismatched.tsv", dev_header, mnli_rows(13, "letters", 5))
    write_tsv(folder / "test_matched.tsv", MNLI_COLUMNS, mnli_rows(4, "fiction", 0))
    write_tsv(folder / "test_mismatched.tsv", MNLI_COLUMNS, mnli_rows(6, "letters", 0))
    return root


def test_qqp_in_the_classic_layout(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    run_cli("--config", "configs/qqp.yaml", "--model", tiny_bert_dir, "--data-dir", qqp_folder(tmp_path / "glue"),
            "--output-dir", out, "--do-predict", "--max-length", "32", *SMALL)  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 7 and {"eval_accuracy", "eval_f1"} <= set(results)
    rows = read_submission(out / "predictions" / "QQP.tsv")
    assert [index for index, _ in rows] == ["100", "101", "102", "103", "104"]
    assert {prediction for _, prediction in rows} <= {"0", "1"}


def test_mnli_evaluates_matched_and_mismatched_with_the_same_limit(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    run_cli("--config", "configs/mnli.yaml", "--model", tiny_bert_dir, "--data-dir", mnli_folder(tmp_path / "glue"),
            "--output-dir", out, "--do-predict", "--max-length", "32", *SMALL)  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 9 and results["eval_mm_samples"] == 9
    assert {"eval_accuracy", "eval_mm_accuracy"} <= set(results)
    matched = read_submission(out / "predictions" / "MNLI-m.tsv")
    mismatched = read_submission(out / "predictions" / "MNLI-mm.tsv")
    assert len(matched) == 4 and len(mismatched) == 6
    assert {prediction for _, prediction in matched + mismatched} <= set(LABELS)


def test_submission_rows_use_the_servers_labels_and_clip_scores():
    assert submission_rows(get_task("stsb"), [-0.5, 2.3456, 7.0]) == ["0.000", "2.346", "5.000"]
    assert submission_rows(get_task("rte"), [1, 0]) == ["not_entailment", "entailment"]
    assert submission_rows(get_task("mrpc"), [1, 0]) == ["1", "0"]


def test_do_predict_without_a_test_split_fails_before_training(tiny_bert_dir, tmp_path, capsys):
    folder = qqp_folder(tmp_path / "glue")
    (folder / "QQP" / "test.tsv").unlink()
    with pytest.raises(SystemExit):
        run_cli("--task", "qqp", "--model", tiny_bert_dir, "--data-dir", folder, "--output-dir", tmp_path / "run",
                "--do-predict")  # fmt: skip
    assert "--do-predict needs the test split(s) ['test']" in capsys.readouterr().err
    assert not (tmp_path / "run" / "all_results.json").exists()


def test_best_checkpoint_early_stopping_and_eval_every(tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    # A learning rate too small to change a prediction: the second evaluation is no better, so the run stops.
    run_cli("--task", "mrpc", "--model", tiny_bert_dir, "--data-dir", glue_dir, "--output-dir", out, "--r", "0.2",
            "--epochs", "3", "--batch-size", "4", "--max-train-samples", "24", "--max-eval-samples", "9",
            "--lr", "1e-9", "--eval-every", "2", "--save-best", "--early-stopping-patience", "1",
            "--max-length", "48")  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert [h["global_step"] for h in results["history"]] == [2, 4]
    assert results["early_stopped"] and results["global_step"] == 4
    assert results["best_global_step"] == 2 and results["metric"] == "f1"
    assert results["best_metric"] == results["history"][0]["eval_f1"]
    best = load_finetuned(out / "best")
    assert patched_layers(best) == {0: 0.2, 1: 0.2, 2: 0.2}
