"""Export a trained model as a publishable sentence-transformers folder, with a model card.

    python scripts/export_model.py runs/x/best out/my-model
    python scripts/export_model.py runs/x/checkpoint-500 out/my-model --sts_results results.json
    python scripts/export_model.py runs/x/best out/my-model --push_to_hub user/name [--private]

SOURCE is a model folder written by training (``final/``, ``best/``) or a checkpoint folder. The export keeps what
the run measured: the step, and a model folder's ``eval_results.json`` (its STS-B dev figures), which go into the
card's evaluation results (the hub shows them). ``--sts_results``, the JSON written by ``evaluate_sts.py --output``,
replaces them. ``--license`` is the model's licence (a hub identifier: apache-2.0, cc-by-sa-4.0, ...), the
publisher's choice; the training data's licence is the run's ``data_license``. ``--push_to_hub`` uploads the folder
with sentence-transformers' own ``push_to_hub``; the card's usage snippet then names that hub id (else the folder).

DESTINATION must be a new or empty folder, or an earlier export (replaced only with ``--overwrite``): a folder
holding anything else is refused untouched, before the model is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simcse_flat.cli import run_cli
from simcse_flat.export import (
    RunSummary,
    card_base_model,
    export_text_model,
    hub_id_of,
    load_trained_encoder,
    portable_config,
    push_to_hub,
)
from simcse_flat.losses import loss_class
from simcse_flat.run_folder import check_destination


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--sts_results", help="JSON from evaluate_sts.py --output, for the card's evaluation results")
    parser.add_argument("--data_license", help="licence of the training data, for the card (default: the run's)")
    parser.add_argument("--license", help="the model's licence, a hub id such as apache-2.0 (default: none stated)")
    parser.add_argument("--push_to_hub", metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at DESTINATION")
    args = parser.parse_args()

    check_destination(args.destination, args.overwrite)  # before minutes of loading
    encoder, config = load_trained_encoder(args.source)
    summary = None
    if config:
        # a checkpoint's config.yaml names the base model as trained from; a model folder's card names its hub id
        base_model = card_base_model(args.source) if (Path(args.source) / "modules.json").exists() else hub_id_of(
            config.get("model_name_or_path"))  # fmt: skip
        config = portable_config({**config, "data_license": args.data_license or config.get("data_license")})
        loss_name = config.get("loss", "infonce")
        loss = {"loss": loss_name, "temperature": config.get("temperature"),
                "hard_negative_weight": config.get("hard_negative_weight")}  # fmt: skip
        steps, results, split = RunSummary.measured(args.source)  # what the run measured, carried over
        if args.sts_results:
            sts = json.loads(Path(args.sts_results).read_text())
            results, split = sts.get("results"), sts.get("settings", {}).get("split")
        summary = RunSummary(config, loss, loss_class(loss_name).citation, steps=steps, results=results,
                             split=split or config.get("eval_split"), base_model=base_model,
                             license=args.license)  # fmt: skip
    path = export_text_model(encoder, args.destination, overwrite=args.overwrite, summary=summary,
                             model_id=args.push_to_hub)  # fmt: skip
    print(f"wrote {path}")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(encoder, path, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
