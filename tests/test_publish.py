"""Pushing runs with the real huggingface_hub client over loopback HTTP to a protocol stand-in (no real Hub)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hub_standin
import pytest
import torch

from rsoft_nlp.config import FinetuneConfig
from rsoft_nlp.patching import load_model
from rsoft_nlp.trainer import finetune

REPO = Path(__file__).resolve().parent.parent
WRITE, READ = "hf_test_write", "hf_test_read"

DOWNLOAD = """
import json, sys, torch
from huggingface_hub import snapshot_download
from transformers import AutoTokenizer
import rsoft_nlp
folder = snapshot_download(sys.argv[1], token=sys.argv[2])
model = rsoft_nlp.load_model(folder).eval()
batch = AutoTokenizer.from_pretrained(folder)(["the man saw a dog"], ["a dog ran"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"logits": logits.tolist(), "patched": rsoft_nlp.patched_layers(model), "folder": folder}))
"""


@pytest.fixture
def hub(tmp_path):
    server = hub_standin.start()
    yield server
    server.shutdown()
    server.server_close()


def client(hub, tmp_path, *argv, script: str | None = None) -> subprocess.CompletedProcess:
    """Runs the real client in a fresh interpreter, so that HF_ENDPOINT is set before huggingface_hub is imported."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(
        PYTHONPATH=f"{REPO}:{REPO / 'tests'}", HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
    )  # fmt: skip
    command = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "rsoft_nlp.publish", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    finetune(FinetuneConfig(
        task="mrpc", model=str(tiny_bert_dir), data_dir=str(glue_dir), output_dir=str(out), r=0.3, layers=[0, 2],
        epochs=1, batch_size=8, max_train_samples=16, max_eval_samples=8, max_length=48, checkpoint_every=1,
    ))  # fmt: skip
    return out


def test_push_download_and_load_give_the_same_logits(hub, finished_run, tmp_path):
    done = client(hub, tmp_path, str(finished_run), "--hub-model-id", "alice/tiny-mrpc", "--hub-token", WRITE,
                  "--hub-private")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert WRITE not in done.stdout + done.stderr

    repo = hub.repos["alice/tiny-mrpc"]
    assert repo.private
    assert {"model.safetensors", "config.json", "tokenizer.json", "all_results.json", "run_config.json",
            "rsoftmax.json", "README.md"} <= set(repo.files)  # fmt: skip
    assert not [name for name in repo.files if name.startswith(("checkpoints/", "logs/", "."))]
    card = repo.files["README.md"].decode()
    for text in ("2304.05243", "r = 0.3", "layers [0, 2]", 'rsoft_nlp.load_model("alice/tiny-mrpc")', "eval_f1"):
        assert text in card
    assert json.loads(repo.files["rsoftmax.json"])["rsoftmax"]["layers"] == [0, 2]

    downloaded = client(hub, tmp_path, "alice/tiny-mrpc", WRITE, script=DOWNLOAD)
    assert downloaded.returncode == 0, downloaded.stderr[-3000:]
    answer = json.loads(downloaded.stdout.strip().splitlines()[-1])
    assert answer["patched"] == {"0": 0.3, "2": 0.3}

    local = load_model(str(finished_run)).eval()
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(finished_run)(["the man saw a dog"], ["a dog ran"], return_tensors="pt")
    with torch.no_grad():
        expected = local(**batch).logits
    torch.testing.assert_close(torch.tensor(answer["logits"]), expected, atol=1e-6, rtol=0)


def test_a_read_only_token_fails_fast_without_showing_it(hub, finished_run, tmp_path):
    done = client(hub, tmp_path, str(finished_run), "--hub-model-id", "alice/tiny", "--hub-token", READ)
    assert done.returncode == 2
    assert "--hub-token must be allowed to write, got a read-only token" in done.stderr
    assert READ not in done.stdout + done.stderr and not hub.repos

    done = client(hub, tmp_path, str(finished_run), "--hub-model-id", "alice/tiny", "--hub-token", "hf_wrong")
    assert done.returncode == 2 and "the Hub refused it (HTTP 401)" in done.stderr


def test_a_private_run_is_never_pushed_to_a_public_repository(hub, finished_run, tmp_path):
    assert (
        client(hub, tmp_path, str(finished_run), "--hub-model-id", "alice/open", "--hub-token", WRITE).returncode == 0
    )
    assert not hub.repos["alice/open"].private
    done = client(hub, tmp_path, str(finished_run), "--hub-model-id", "alice/open", "--hub-token", WRITE,
                  "--hub-private")  # fmt: skip
    assert done.returncode == 2 and "already exists and is public" in done.stderr


def test_push_to_hub_checks_the_token_before_training(hub, tiny_bert_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    script = "import sys; from rsoft_nlp import cli; cli.main(sys.argv[1:])"
    done = client(hub, tmp_path, "--task", "mrpc", "--model", str(tiny_bert_dir), "--data-dir", str(glue_dir),
                  "--output-dir", str(out), "--push-to-hub", "--hub-model-id", "alice/x", "--hub-token", READ,
                  script=script)  # fmt: skip
    assert done.returncode == 2 and "read-only token" in done.stderr and READ not in done.stderr
    assert not out.exists()


def test_push_to_hub_offline_fails_before_training_naming_the_flag(offline):
    from rsoft_nlp import hub
    from rsoft_nlp.publish import HubAccessError, check_write_access

    assert not hub.hub_reachable()
    with pytest.raises(HubAccessError, match="--push-to-hub needs the Hugging Face Hub, which is not reachable"):
        check_write_access("me/x", token="hf_secret")
