"""Publishing a finished run to the Hugging Face Hub, with a generated model card; ``rsoft-push RUN_DIR``.

The token is checked before anything else (it must be valid and allowed to write, and the repository must be
creatable), so that ``rsoft-finetune --push-to-hub`` fails before training rather than after. The token never
appears in a message or a file. A repository is never made public: an existing one keeps its visibility, and a
private run is refused for an existing public repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsoft_nlp import hub

__all__ = ["HubAccessError", "check_write_access", "main", "model_card", "push_run"]

logger = logging.getLogger(__name__)

PAPER = "https://arxiv.org/abs/2304.05243"
# Run files that stay local: resumable state, tracker logs and temporary files.
LOCAL_ONLY = ["checkpoints/**", "logs/**", "best/**", ".*", "**/.*", "*.tmp"]


class HubAccessError(RuntimeError):
    """The Hub cannot be written to with the token given, or the repository's visibility forbids the push."""


def check_write_access(repo_id: str, token: str | None = None, private: bool = False) -> None:
    """Checks that ``token`` may write to ``repo_id``, creating the repository (private if asked) if missing.

    Raises:
        HubAccessError: If there is no token, the Hub refuses it, it is read-only, the repository cannot be created,
            or a private push would land in an existing public repository.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    if not hub.hub_reachable():
        raise HubAccessError("--push-to-hub needs the Hugging Face Hub, which is not reachable (offline)")
    api = HfApi(token=token)
    try:
        identity = api.whoami()
    except LocalTokenNotFoundError:
        raise HubAccessError(
            "--push-to-hub needs a token with write access: pass --hub-token, set HF_TOKEN or run `hf auth login`"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        raise HubAccessError(f"--hub-token must be a valid Hub token, the Hub refused it (HTTP {status})") from None
    role = identity.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubAccessError("--hub-token must be allowed to write, got a read-only token")

    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.repo_info(repo_id)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        raise HubAccessError(
            f"--hub-model-id must name a repository this token can write, got {repo_id!r} (HTTP {status})"
        ) from None
    if private and not info.private:
        raise HubAccessError(
            f"--hub-private: {repo_id!r} already exists and is public, and a private run is never pushed to a public "
            "repository; choose another --hub-model-id or make the repository private on the Hub first"
        )


def _metric_rows(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, value in results.items():
        if key.startswith("eval_") and isinstance(value, float) and not key.endswith(("runtime", "per_second")):
            rows.append(f"| {key} | {value:.4f} |")
    return rows


def model_card(run_dir: Path, repo_id: str) -> str:
    """A model card for a finished run: base model, task, r-softmax settings, metrics and how to load it."""
    results = json.loads((run_dir / "all_results.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "run_config.json").read_text(encoding="utf-8"))
    base = config["model"]
    on_hub = not Path(base).exists()
    layers = results.get("patched_layers") or []
    attention = (
        f"r-softmax with sparsity rate r = {results['r']:g} in layers {layers}"
        if results.get("r") is not None
        else "plain softmax"
    )
    adapter = results.get("peft") == "lora"
    loading = (
        [
            "from rsoft_nlp.modeling import load_finetuned",
            "from huggingface_hub import snapshot_download",
            "",
            f'model = load_finetuned(snapshot_download("{repo_id}"))  # base model + LoRA adapter, r-softmax restored',
        ]
        if adapter
        else [
            "import rsoft_nlp",
            "",
            f'model = rsoft_nlp.load_model("{repo_id}")  # restores r-softmax from config.json',
        ]
    )
    front = ["---", "library_name: transformers", "pipeline_tag: text-classification", "datasets:", "- nyu-mll/glue"]
    front += [f"base_model: {base}"] if on_hub else []
    front += ["tags:", "- r-softmax", "- glue", f"- {results['task']}", "---"]
    lines = [
        *front,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"`{base}` fine-tuned on GLUE {results['task'].upper()} with {attention}.",
        "",
        "r-softmax is softmax with a controllable sparsity rate r: about a fraction r of each attention row is "
        f"exactly zero ([arXiv 2304.05243]({PAPER})). Loaded with plain `transformers`, the model runs ordinary "
        "softmax; load it with `rsoft_nlp` to get the attention it was trained with.",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`" + ("" if on_hub else " (a local checkpoint)"),
        f"- Task: {results['task']}, main metric `{results.get('metric', '')}`",
        f"- Attention: {attention}",
        f"- Optimizer steps: {results['global_step']}, epochs: {results['epoch']}, "
        f"examples: {results['train_samples']}",
        f"- Training: {'LoRA adapters and the classifier head' if adapter else 'every weight'}",
        "",
        "## Evaluation",
        "",
        "| metric | value |",
        "|---|---|",
        *_metric_rows(results),
        "",
        "## Loading",
        "",
        "```python",
        *loading,
        "```",
        "",
        "## Citation",
        "",
        f"Bałazy, Struski, Śmieja and Tabor, r-softmax: Generalized Softmax with Controllable Sparsity Rate, {PAPER}",
        "",
    ]
    return "\n".join(lines)


def push_run(run_dir: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Uploads a finished run (model, tokenizer, r-softmax settings, results, model card) to ``repo_id``.

    Returns:
        The URL of the commit.

    Raises:
        FileNotFoundError: If ``run_dir`` holds no finished run.
        HubAccessError: As :func:`check_write_access`.
    """
    from huggingface_hub import HfApi

    from rsoft_nlp.checkpointing import write_text_atomic

    run_dir = Path(run_dir)
    if not (run_dir / "all_results.json").is_file():
        raise FileNotFoundError(
            f"RUN_DIR must be a finished run's output folder (with all_results.json), got {run_dir}"
        )
    check_write_access(repo_id, token=token, private=private)

    settings = (
        json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("rsoftmax")
        if (run_dir / "config.json").is_file()
        else None
    )
    if settings is None and (run_dir / "rsoftmax_base.json").is_file():
        settings = json.loads((run_dir / "rsoftmax_base.json").read_text(encoding="utf-8"))["rsoftmax"]
    write_text_atomic(run_dir / "rsoftmax.json", json.dumps({"rsoftmax": settings, "paper": PAPER}, indent=2) + "\n")
    write_text_atomic(run_dir / "README.md", model_card(run_dir, repo_id))

    commit = HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=run_dir,
        ignore_patterns=LOCAL_ONLY,
        commit_message="Upload fine-tuned model with r-softmax attention",
    )
    return commit.commit_url


def main(argv: Sequence[str] | None = None) -> None:
    """Runs ``rsoft-push RUN_DIR --hub-model-id NAME``."""
    parser = argparse.ArgumentParser(prog="rsoft-push", description="Upload a finished rsoft-finetune run to the Hub.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    parser.add_argument("--hub-model-id", required=True, help="the Hub repository, e.g. user/mrpc-rsoftmax")
    parser.add_argument("--hub-private", action="store_true", help="create the repository private")
    parser.add_argument("--hub-token", help="a write token (default: HF_TOKEN or the saved login); never printed")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    try:
        url = push_run(args.run_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private)
    except (HubAccessError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    logger.info("pushed to %s", url)


if __name__ == "__main__":
    main()
