"""``rsoft-finetune``: fine-tune a BERT-style encoder on a GLUE task, with r-softmax attention when ``--r`` is given.

Settings come from the defaults, then a ``--config`` YAML file, then the flags typed, each overriding the last.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from rsoft_nlp.config import MIXED_PRECISION, PEFT_METHODS, REPORT_TO, ConfigError, FinetuneConfig, load_yaml
from rsoft_nlp.glue import GLUE_TASKS

__all__ = ["build_parser", "config_from_args", "main"]


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be layer indices separated by commas, e.g. 0,1,5, got {text!r}"
        ) from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsoft-finetune",
        description="Fine-tune a BERT-style encoder on a GLUE task with r-softmax attention.",
        epilog="Example: rsoft-finetune --task mrpc --r 0.2 --model ./my-bert --data-dir ./glue",
    )
    add = parser.add_argument
    # Every default is None: unset flags fall back to the config file, then to FinetuneConfig's defaults.
    add("--config", help="YAML file of settings (keys are flag names); flags typed override it")
    add("--task", type=str.lower, help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    add("--model", help="checkpoint: a local folder or a Hub id (default bert-base-uncased)")
    add("--r", type=_rate, help="r-softmax sparsity rate in [0, 1]; leave out for plain softmax")
    add("--layers", type=_layer_list, help="patch only these layers, e.g. 0,1,2 or -1 (default: all)")
    add("--data-dir", help="folder in the classic GLUE TSV layout (<dir>/MRPC/train.tsv ...); default: the Hub")
    add("--train-file", help="local CSV/JSON training file (with --validation-file)")
    add("--validation-file", help="local CSV/JSON evaluation file")
    add("--test-file", help="local CSV/JSON test file")
    add(
        "--output-dir",
        help="where results, config and the model go (default runs/<task>-r<r>, or runs/<task>-softmax without --r)",
    )
    add("--epochs", type=float, help="passes over the training data; a fraction stops part-way (default 3)")
    add("--lr", type=float, help="peak learning rate of AdamW")
    add("--batch-size", type=int, help="training batch size per process")
    add("--eval-batch-size", type=int, help="evaluation batch size per process (default: --batch-size)")
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--max-length", type=int, help="token limit per example (also capped by tokenizer and model)")
    add("--warmup-ratio", type=float, help="fraction of optimizer steps spent warming up")
    add("--weight-decay", type=float, help="AdamW weight decay, not applied to biases and LayerNorm (default 0.01)")
    add("--max-grad-norm", type=float, help="gradient clipping norm; 0 turns clipping off")
    add("--seed", type=int, help="seed for initialisation, shuffling and dropout (default 42)")
    add("--max-train-samples", type=int, help="use the first N training examples")
    add("--max-eval-samples", type=int, help="use the first N examples of each evaluation split")
    add("--max-predict-samples", type=int, help="predict only the first N examples of each test split")
    add("--mixed-precision", choices=MIXED_PRECISION, help="autocast precision (default no)")
    add("--log-every", type=int, help="log the training loss every N optimizer steps")
    flag = dict(action="store_true", default=None)
    add("--gradient-checkpointing", **flag, help="recompute activations in the backward pass to save memory")
    add("--eval-every", type=int, help="also evaluate every N optimizer steps (always after each epoch)")
    add("--save-best", **flag, help="keep the model with the best main metric of the task in <output>/best")
    add("--early-stopping-patience", type=int, help="stop after N evaluations without a better main metric")
    add("--do-predict", **flag, help="write GLUE submission files for the test split(s) to <output>/predictions")
    add("--report-to", choices=REPORT_TO, help="experiment trackers to log to (default none)")

    group = parser.add_argument_group("checkpoints and resuming")
    group.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N optimizer steps")
    group.add_argument("--keep-checkpoints", type=int, help="keep the newest N checkpoints (default 2)")
    group.add_argument("--resume-from", help="a checkpoint folder, or 'latest' for the newest in <output>/checkpoints")

    group = parser.add_argument_group("LoRA")
    group.add_argument("--peft", choices=PEFT_METHODS, help="train adapters instead of every weight")
    group.add_argument("--lora-rank", type=int, help="rank of the LoRA updates (default 8)")
    group.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (default 16)")
    group.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0.1)")
    group.add_argument("--lora-targets", type=_name_list, help="modules to adapt, e.g. query,value (the default)")

    group = parser.add_argument_group("publishing")
    group.add_argument("--push-to-hub", **flag, help="upload the finished run to the Hugging Face Hub")
    group.add_argument("--hub-model-id", help="the Hub repository, e.g. user/mrpc-rsoftmax")
    group.add_argument("--hub-private", **flag, help="create the repository private")
    group.add_argument("--hub-token", help="a write token (default: HF_TOKEN or the saved login); never printed")
    return parser


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Merges defaults, the ``--config`` file and the flags typed into a validated :class:`FinetuneConfig`."""
    settings = load_yaml(args.config) if args.config else {}
    typed = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in {**settings, **typed}.items() if k in fields}).validate()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs ``rsoft-finetune``: results, resolved config and model go to the output folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ConfigError, OSError) as error:
        parser.error(str(error))

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr
    )
    from rsoft_nlp.hub import HubUnreachableError
    from rsoft_nlp.publish import HubAccessError
    from rsoft_nlp.trainer import finetune

    try:
        finetune(cfg)
    except (ConfigError, HubUnreachableError, HubAccessError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
