"""Export a trained model as a publishable sentence-transformers folder, with a model card.

    python scripts/export_model.py runs/x/best out/my-model
    python scripts/export_model.py runs/x/checkpoints/checkpoint-00000500 out/my-model --sts_results results.json
    python scripts/export_model.py runs/x/best out/my-model --push_to_hub user/name [--private]

SOURCE is a model folder written by training (``final/``, ``best/``) or a checkpoint folder. ``--sts_results`` is
the JSON written by ``evaluate_sts.py --output``; its table goes into the card.

DESTINATION must be a new or empty folder, or an earlier export (replaced only with ``--overwrite``): a folder
holding anything else is refused untouched, before the model is read.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from simcse_flat.cli import run_cli
from simcse_flat.export import (
    embeddings_match,
    load_trained_encoder,
    model_card,
    portable_config,
    push_to_hub,
    save_sentence_transformers_folder,
)
from simcse_flat.losses import loss_class
from simcse_flat.run_folder import check_destination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--sts_results", help="JSON from evaluate_sts.py --output, for the card's table")
    parser.add_argument("--data_license", help="licence of the training data, for the card")
    parser.add_argument("--push_to_hub", metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at DESTINATION")
    args = parser.parse_args()

    check_destination(args.destination, args.overwrite)  # before minutes of loading
    encoder, config = load_trained_encoder(args.source)
    config = portable_config(config) if config else config
    loss_name = config.get("loss", "infonce")
    loss_config = {"loss": loss_name, "temperature": config.get("temperature"), "hard_negative_weight": config.get("hard_negative_weight")}
    card = model_card(
        base_model=config.get("model_name_or_path", "unknown"),
        loss_config=loss_config,
        config=config,
        sts_table=_sts_table(args.sts_results) if args.sts_results else None,
        command="accelerate launch train.py --config training_config.yaml" if config else None,
        train_data=config.get("train_file"),
        data_license=args.data_license or config.get("data_license"),
        citation=loss_class(loss_name).citation,
    )
    training_config = yaml.safe_dump(config, sort_keys=False) if config else None
    path = save_sentence_transformers_folder(
        encoder, args.destination, model_card=card, training_config=training_config, overwrite=args.overwrite
    )
    gap = embeddings_match(encoder, path, ["A sentence to check the export.", "Another one."])
    print(f"wrote {path} (sentence-transformers reproduces the embeddings to {gap:.1e})")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(path, args.push_to_hub, private=args.private)}")


def _sts_table(results_file: str) -> str:
    from simcse_flat.evaluation.sts import format_sts_table

    return format_sts_table(json.loads(open(results_file).read()))


if __name__ == "__main__":
    sys.exit(run_cli(main))
