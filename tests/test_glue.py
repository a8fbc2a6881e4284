import json

import datasets
import pytest

from rsoft_nlp import glue
from rsoft_nlp.glue import GLUE_TASKS, get_task, load_glue, load_glue_files, load_glue_tsv
from rsoft_nlp.hub import HubUnreachableError

REAL_COUNTS = {
    "cola": (8551, 1043, 1063),
    "sst2": (67349, 872, 1821),
    "mrpc": (3668, 408, 1725),
    "stsb": (5749, 1500, 1379),
    "rte": (2490, 277, 3000),
    "wnli": (635, 71, 146),
}


def test_task_table_covers_glue():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert get_task("SST-2") is GLUE_TASKS["sst2"]
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    with pytest.raises(ValueError, match="`task` must be one of"):
        get_task("squad")


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_tsv_files_load_with_their_quirks(glue_dir, name):
    task = get_task(name)
    data = load_glue_tsv(task, glue_dir)
    assert tuple(len(data[split]) for split in ("train", "validation", "test")) == REAL_COUNTS[name]
    assert list(data["train"].features) == [*task.text_columns, "label", "idx"]
    assert all(label == -1 for label in data["test"]["label"])
    labels = data["validation"]["label"]
    if task.is_regression:
        assert 0 <= min(labels) and max(labels) <= 5 and any(label % 1 for label in labels)
    else:
        assert set(labels) == set(range(task.num_labels))
    for split in data.values():
        # No merged rows: quotes are kept as text, and no field swallowed a tab or newline.
        assert not any("\t" in text or "\n" in text for text in split[task.text_columns[0]])


def test_mrpc_bom_and_quotes(glue_dir):
    data = load_glue_tsv("mrpc", glue_dir)
    first = data["train"][0]
    assert first["label"] == 1 and first["sentence1"].startswith("Amrozi accused")
    assert '" the witness "' in first["sentence1"]
    assert sum(data["validation"]["label"]) == 279


def test_rte_string_labels_map_to_hub_ids(glue_dir):
    data = load_glue_tsv("rte", glue_dir)
    assert data["train"][0]["label"] == get_task("rte").label_names.index("not_entailment")


def write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([("\t".join(header))] if header else []) + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mnli_and_qqp_in_classic_layout(tmp_path):
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    row = lambda i, label: [str(i), "1", "2", "fiction", f"premise {i}", f'hyp "{i}', label, label]  # noqa: E731
    write_tsv(tmp_path / "MNLI" / "train.tsv", mnli_header, [row(0, "neutral"), row(1, "contradiction")])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", mnli_header, [row(2, "entailment")])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", mnli_header, [row(3, "contradiction")])
    write_tsv(tmp_path / "MNLI" / "test_matched.tsv", mnli_header[:6], [row(4, "")[:6]])
    data = load_glue_tsv("mnli", tmp_path)
    assert set(data) == {"train", "validation_matched", "validation_mismatched", "test_matched"}
    assert data["train"]["label"] == [1, 2] and data["validation_mismatched"]["label"] == [2]
    assert data["train"][0]["hypothesis"] == 'hyp "0' and data["test_matched"]["label"] == [-1]

    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "QQP" / "train.tsv", qqp_header, [["0", "1", "2", "q one?", "q two?", "1"], ["1", "3"]])
    write_tsv(tmp_path / "QQP" / "dev.tsv", qqp_header, [["5", "1", "2", "a?", "b?", "0"]])
    data = load_glue_tsv("qqp", tmp_path)
    assert len(data["train"]) == 1 and data["train"][0]["question2"] == "q two?"


def test_missing_folder_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="`--data-dir` must hold MRPC/train.tsv"):
        load_glue_tsv("mrpc", tmp_path)


def test_bad_label_names_the_file_and_line(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"], [["0", "a", "b", "maybe"]])
    with pytest.raises(ValueError, match="line 2: label must be one of"):
        load_glue_tsv("rte", tmp_path)


def test_csv_and_json_files_yield_the_same_schema(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('sentence1,sentence2,label\n"A ""quoted"" one",B,equivalent\nC,D,0\n')
    json_path = tmp_path / "dev.jsonl"
    json_path.write_text("\n".join(json.dumps({"sentence1": s, "sentence2": "x", "label": 1}) for s in "ab") + "\n")
    data = load_glue_files("mrpc", {"train": str(csv_path), "validation": str(json_path)})
    assert data["train"]["label"] == [1, 0] and data["train"][0]["sentence1"] == 'A "quoted" one'
    assert data["train"].features == data["validation"].features
    assert list(data["validation"].features) == ["sentence1", "sentence2", "label", "idx"]
    with pytest.raises(ValueError, match="expected text column"):
        load_glue_files("sst2", {"train": str(csv_path)})


def test_hub_source_offline_fails_fast_naming_the_flag(offline):
    with pytest.raises(HubUnreachableError, match="--data-dir"):
        load_glue("mrpc")


def test_hub_source_normalises_to_the_schema(monkeypatch):
    monkeypatch.setattr(glue, "require_hub", lambda what, fix: None)
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        split = datasets.Dataset.from_dict(
            {"sentence1": ["a"], "sentence2": ["b"], "label": [1], "idx": [0]},
            features=datasets.Features(
                {
                    "sentence1": datasets.Value("string"),
                    "sentence2": datasets.Value("string"),
                    "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
                    "idx": datasets.Value("int32"),
                }
            ),
        )
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_glue("mrpc")
    assert calls == [("nyu-mll/glue", "mrpc")]
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].features == glue._features(get_task("mrpc"))
    assert data["train"][0] == {"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}


def test_missing_labels_are_refused_outside_test_files(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence1,sentence2,label\na,b,1\nc,,\n")
    with pytest.raises(ValueError, match="train.csv row 2: label is missing"):
        load_glue_files("mrpc", {"train": str(path)})
    test = load_glue_files("mrpc", {"test": str(path)})["test"]
    assert test["label"] == [1, -1] and test["sentence2"] == ["b", ""]

    scores = tmp_path / "train.tsv"
    scores.write_text("sentence1\tsentence2\tlabel\na\tb\t3.2\nc\td\t\n")
    with pytest.raises(ValueError, match="row 2: label is missing"):
        load_glue_files("stsb", {"train": str(scores)})
    with pytest.raises(ValueError, match="class id in \\[0, 1\\], got -1"):
        load_glue_files("mrpc", {"train": _write(tmp_path / "bad.csv", "sentence1,sentence2,label\na,b,-1\n")})


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_tsv_files_are_read_with_quoting_off(tmp_path):
    path = _write(tmp_path / "train.tsv", 'sentence1\tsentence2\tlabel\n"Hi there\tB\t1\nA2\t"B2"\t0\n')
    data = load_glue_files("mrpc", {"train": path})["train"]
    assert data["sentence1"] == ['"Hi there', "A2"] and data["sentence2"] == ["B", '"B2"'] and data["label"] == [1, 0]
