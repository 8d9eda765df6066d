"""The global contrastive loss at batch 4, measured exactly (EMC²'s STL-10-subset experiment, on this machine).

    python scripts/bench_global_loss.py --quick                          # a minute: text, m = 32, one seed
    python scripts/bench_global_loss.py --problems text                  # 500 SNLI pairs, BERT-tiny from scratch
    python scripts/bench_global_loss.py --problems vision                # 500 Fashion-MNIST images, ResNet-18

A finite problem of ``m`` pairs is trained by the real trainer (:func:`simcse_flat.trainer.train`: the same loop,
losses, views and checkpoints as ``train.py``) with every loss at batch 4, and once with full-batch gradient
descent (``dcl`` at batch ``m``: its loss on a batch of the whole data set *is* the global loss, so its steps follow
the exact gradient) for as many steps as the batch-4 runs take. Every ``--every`` steps, before the optimizer
applies the step's gradient ``g``, the run is measured at that same θ (:mod:`simcse_flat.global_loss`):

* ``L(θ)``, the exact global loss over all ``m`` pairs (eval mode, chunked, no gradient);
* every ``--grad_every`` steps, ``‖g − ∇L(θ)‖ / ‖∇L(θ)‖`` with ``∇L`` computed exactly (chunked);
* SogCLR: ``mean |log u_i − log g_i|`` over the samples seen, ``g_i`` the exact per-sample partition function;
* EMC²: its acceptance rate and the fraction of anchors it encoded (from the run's ``log.jsonl``).

At the end: STS-B dev Spearman (text) or linear probe / kNN on Fashion-MNIST's test set (vision). The learning rate
is constant (no warm-up, no schedule, no clipping, no weight decay), so the first 10 epochs of a 50-epoch run are
the 10-epoch run: one run gives both figures (``--report_epochs``). Runs are resumable: a finished run keeps its row
(``bench_row.json``); rerunning the command trains only what is missing and appends each finished run to
``--results`` as it lands. The problems (the vision views drawn once from seed 0, the text pairs) are the same for
every loss and seed; the seed sets the initialisation and the batch order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from global_loss_report import write_report  # noqa: E402

from simcse_flat import run as run_module  # noqa: E402
from simcse_flat import trainer  # noqa: E402
from simcse_flat.cli import run_cli  # noqa: E402
from simcse_flat.config import ConfigError, parse_config  # noqa: E402
from simcse_flat.data.text import DataError  # noqa: E402
from simcse_flat.global_loss import exact_objective, relative_error, step_gradient  # noqa: E402
from simcse_flat.run_folder import read_log, write_text_atomically  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BATCH = 4
# method -> the trainer flags that make it (the full-batch run also sets the batch to m)
METHODS = {
    "infonce": ["--loss", "infonce"],
    "flatnce": ["--loss", "flatnce"],
    "dcl": ["--loss", "dcl"],
    "sogclr": ["--loss", "sogclr"],
    "emc2_scan": ["--loss", "emc2", "--emc2_kernel", "official_scan", "--emc2_estimator", "refresh"],
    "emc2_scan_stored": ["--loss", "emc2", "--emc2_kernel", "official_scan", "--emc2_estimator", "stored"],
    "emc2_paper": ["--loss", "emc2", "--emc2_kernel", "paper", "--emc2_estimator", "refresh"],
    "emc2_paper_stored": ["--loss", "emc2", "--emc2_kernel", "paper", "--emc2_estimator", "stored"],
    "full_batch": ["--loss", "dcl"],
}
TEXT_ARCH = ("num_hidden_layers=2,hidden_size=128,num_attention_heads=2,intermediate_size=512,"
             "hidden_dropout_prob=0,attention_probs_dropout_prob=0")  # scratch_study.yaml's shape, dropout off  # fmt: skip
COMMON = ["--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--warmup_steps", "0", "--weight_decay", "0",
          "--max_grad_norm", "0", "--eval_steps", "0", "--save_steps", "0", "--report_to", "none",
          "--overwrite_output_dir"]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["text", "vision"], help="text | vision")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=" | ".join(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--m", type=int, default=500, help="pairs in the finite problem")
    parser.add_argument("--epochs", type=float, default=50, help="epochs of the batch-4 runs")
    parser.add_argument("--full_batch_epochs", type=float,
                        help="unset: --epochs; the full-batch run's length in batch-4 epochs (its steps: m/4 each), "
                             "for a problem whose full-batch step is too slow to take them all")
    parser.add_argument("--report_epochs", nargs="+", type=float, default=[10, 50], help="epochs the table reports")
    parser.add_argument("--every", type=int, default=125, help="steps between exact L measurements")
    parser.add_argument("--grad_every", type=int, default=625, help="steps between exact gradient errors")
    parser.add_argument("--learning_rate", type=float, help="unset: the problem's (SGD 1e-3, EMC²'s command)")
    parser.add_argument("--chunk_size", type=int, default=200, help="rows a chunk of the exact L and ∇L")
    parser.add_argument("--probe_train", type=int, default=5000, help="vision: labelled training images of the probe")
    parser.add_argument("--probe_test", type=int, default=2000, help="vision: test images of the probe")
    parser.add_argument("--data_dir", type=Path, default=SHARED)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "runs" / "global_loss")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "global_loss_results.csv")
    parser.add_argument("--plot_dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--quick", action="store_true", help="a minute-long check: text, m 32, 2 epochs, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.problems, args.seeds, args.m, args.epochs, args.report_epochs = ["text"], [1], 32, 2, [1, 2]
        args.every, args.grad_every = 4, 8
        args.output_dir, args.results = args.output_dir.with_name("global_loss_quick"), args.output_dir.with_name(
            "global_loss_quick") / "results.csv"
        args.plot_dir = args.results.parent
    check_settings(args)
    return args


def check_settings(args: argparse.Namespace) -> None:
    """Bad settings fail here, before anything trains, with one line each."""
    for problem in args.problems:
        if problem not in PROBLEMS:
            raise ConfigError(f"unknown problem {problem!r}; choose from {sorted(PROBLEMS)}")
    for method in args.methods:
        if method not in METHODS:
            raise ConfigError(f"unknown loss {method!r}; choose from {', '.join(METHODS)}")
    if args.m < BATCH or args.m % BATCH:
        raise ConfigError(f"--m {args.m}: the problem needs a whole number of batches of {BATCH} (m >= {BATCH})")
    if args.every < 1 or args.grad_every % args.every:
        raise ConfigError("--grad_every must be a multiple of --every (>= 1): a gradient is measured with an L")
    for path in data_files(args):
        if not path.exists():
            raise DataError(f"{path}: missing (the benchmark's data; see ../shared/data/README.md)")


def data_files(args: argparse.Namespace) -> list[Path]:
    return [path for problem in args.problems for path in PROBLEMS[problem].files(args.data_dir)]


def text_pairs(source: Path, m: int, target: Path) -> Path:
    """The first ``m`` (premise, entailment) pairs of the triples, each premise and entailment once (SNLI repeats
    premises; a repeated one would be masked as a duplicate, and the finite problem would not be the one stated)."""
    pairs, seen = [], set()
    with open(source, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["sent0"] in seen or row["sent1"] in seen:
                continue
            seen.update((row["sent0"], row["sent1"]))
            pairs.append((row["sent0"], row["sent1"]))
            if len(pairs) == m:
                break
    if len(pairs) < m:
        raise DataError(f"{source}: only {len(pairs)} distinct pairs, fewer than --m {m}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as handle:
        csv.writer(handle).writerows([("sent0", "sent1"), *pairs])
    return target


class FixedViews(torch.utils.data.Dataset):
    """The first ``m`` images, two augmentations each drawn once (seed 0) and stored: EMC²'s ``preaugmentation.py``."""

    def __init__(self, views_dataset, m: int) -> None:
        from simcse_flat.data.vision import image_key

        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.items = []
            for index in range(m):
                image, _ = views_dataset.images[index]
                views = torch.stack([views_dataset.transform(image) for _ in range(2)])
                self.items.append({"pixel_values": views, "idx": index, "key": image_key(image)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class Probe:
    """Measures one trainer run from inside: it keeps the parts, loss and optimizer the loop builds, and before each
    optimizer step it may measure L, ∇L and the step's gradient at the θ the step starts from."""

    def __init__(self, problem: str, m: int, every: int, grad_every: int, chunk_size: int) -> None:
        self.problem, self.m, self.every, self.grad_every, self.chunk_size = problem, m, every, grad_every, chunk_size
        self.steps, self.trace = 0, []

    def patches(self, config) -> ExitStack:
        """The builders the run calls (:func:`simcse_flat.run.build_run`), each wrapped to keep what it built: the
        modality's ``build`` (on its class, so the call still passes the modality), the loss's and the optimizer's."""
        stack = ExitStack()
        for owner, name, wrap in ((type(config.modality), "build", self._parts),
                                  (run_module, "build_loss_from_settings", self._loss),
                                  (run_module, "build_optimizer", self._optimizer)):  # fmt: skip
            real = getattr(owner, name)
            stack.enter_context(mock.patch.object(owner, name, lambda *a, _r=real, _w=wrap, **k: _w(_r(*a, **k))))
        return stack

    def _parts(self, parts):
        if PROBLEMS[self.problem].random_views:  # augmented views: drawn once, so the problem is finite
            parts.dataset = FixedViews(parts.dataset, self.m)
            parts.description = f"the first {self.m} of {parts.description}, drawn once"
        self.parts = parts
        self.table = parts.collate_fn([parts.dataset[i] for i in range(len(parts.dataset))])
        return parts

    def _loss(self, loss_fn):
        self.loss_fn = loss_fn
        return loss_fn

    def _optimizer(self, optimizer):
        real_step = optimizer.step

        def step(*args, **kwargs):
            if self.steps % self.every == 0:
                self.measure(with_gradient=self.steps % self.grad_every == 0)
            self.steps += 1
            return real_step(*args, **kwargs)

        optimizer.step = step
        return optimizer

    def measure(self, with_gradient: bool) -> dict:
        model = self.parts.model
        g = step_gradient(model) if with_gradient else None
        training = model.training
        model.eval()
        objective = exact_objective(model, self.table, self.loss_fn.temperature, self.parts.symmetric,
                                    self.parts.negatives, self.chunk_size, gradient=with_gradient)  # fmt: skip
        model.train(training)
        row = {"step": self.steps, "epoch": self.steps * BATCH / self.m, "L": objective.value}
        if with_gradient:
            row["grad_error"] = relative_error(g, objective.gradient)
        log_u = getattr(self.loss_fn, "log_u", None)
        if log_u is not None:  # SogCLR: its u against the exact partition function, on the samples it has seen
            seen = torch.isfinite(log_u.cpu())
            row["u_error"] = float((log_u.cpu()[seen] - objective.log_partition[seen]).abs().mean()) if seen.any() else None
        self.trace.append(row)
        return row


def run_one(args: argparse.Namespace, problem: str, method: str, seed: int) -> dict:
    name = f"{problem}_m{args.m}_{method}_seed{seed}"
    folder = args.output_dir / name
    if (folder / "bench_row.json").exists():
        return json.loads((folder / "bench_row.json").read_text())
    batch = args.m if method == "full_batch" else BATCH
    epochs = args.full_batch_epochs if method == "full_batch" and args.full_batch_epochs else args.epochs
    steps = round(epochs * args.m / BATCH)  # the full-batch run takes as many steps as the batch-4 runs
    argv = [*PROBLEMS[problem].flags, *COMMON, *METHODS[method], "--per_device_train_batch_size", str(batch),
            "--max_steps", str(steps), "--logging_steps", str(max(1, args.every // 25)), "--seed", str(seed),
            "--output_dir", str(folder)]  # fmt: skip
    if args.learning_rate is not None:
        argv += ["--learning_rate", repr(args.learning_rate)]
    config = parse_config(argv + PROBLEMS[problem].data_flags(args, method))
    probe = Probe(problem, args.m, args.every, args.grad_every, args.chunk_size)
    start = time.perf_counter()
    with probe.patches(config):
        result = trainer.train(config)
    probe.measure(with_gradient=False)  # θ after the last step
    seconds = time.perf_counter() - start
    row = {"problem": problem, "method": method, "seed": seed, "m": args.m, "steps": result.state.step,
           "seconds": round(seconds, 1), "estimator": result_estimator(config), "L_floor": floor_of(args.m, probe),
           **PROBLEMS[problem].final_scores(args, config, probe)}  # fmt: skip
    logged, previous = [r for r in read_log(folder) if "loss" in r], -1
    for point in probe.trace:  # EMC²'s acceptance and encoded fraction: the mean over the steps since the last point
        window = [r for r in logged if previous < r["step"] <= point["step"]]
        for key in ("emc2_acceptance", "emc2_encoded"):
            if any(key in r for r in window):
                point[key] = statistics.fmean(r[key] for r in window if key in r)
        previous = point["step"]
    row["trace"] = probe.trace
    write_text_atomically(folder / "bench_row.json", json.dumps(row))
    return row


def floor_of(m: int, probe: Probe) -> float:
    """A lower bound of L: every positive at cos 1, every one of the n negatives at cos -1 (log n - 2/τ); the
    plots draw L above it on a log axis (L itself goes below 0 at τ = 0.05)."""
    negatives = m - 1 if probe.parts.negatives == "cross_view" else 2 * m - 2
    return math.log(negatives) - 2 / probe.loss_fn.temperature


def result_estimator(config) -> str:
    loss = config.loss
    return f"{loss.emc2_kernel}/{loss.emc2_estimator}" if loss.loss == "emc2" else ""


def text_data_flags(args: argparse.Namespace, method: str) -> list[str]:
    """The text problem's data: the first ``m`` SNLI pairs, STS-B dev for the final score."""
    target = args.output_dir / f"snli_pairs_m{args.m}.csv"
    pairs = text_pairs(args.data_dir / "nli" / "snli_triples.csv", args.m, target)
    return ["--train_file", str(pairs), "--eval_data_dir", str(args.data_dir / "senteval")]


def vision_data_flags(args: argparse.Namespace, method: str) -> list[str]:
    """The vision problem's data: Fashion-MNIST; the full-batch run gets the exact gradient in a chunk's memory."""
    flags = ["--data_root", str(args.data_dir / "vision" / "fashion-mnist")]
    return flags + (["--grad_cache_chunk_size", str(args.chunk_size)] if method == "full_batch" else [])


def text_final_scores(args: argparse.Namespace, config, probe: Probe) -> dict:
    """STS-B dev Spearman x 100 of the final model."""
    from simcse_flat.evaluation.sts import evaluate_sts, load_sts_tasks

    tasks = load_sts_tasks(["stsb"], args.data_dir / "senteval", "dev")
    return {"stsb_dev": evaluate_sts(probe.parts.model.eval().encode, tasks=tasks)["stsb_spearman"]}


def vision_final_scores(args: argparse.Namespace, config, probe: Probe) -> dict:
    """Linear probe and kNN accuracy on the test set of the final model."""
    from simcse_flat.vision import evaluate_encoder

    scores = evaluate_encoder(probe.parts.model.eval(), config.settings.vision_dataset, config.settings.data_root,
                              max_train=args.probe_train, max_test=args.probe_test)  # fmt: skip
    return {"linear": scores["linear_accuracy"], "knn": scores["knn_accuracy"]}


@dataclass(frozen=True)
class Problem:
    """One finite problem: its trainer flags, its data (flags, and the files ``--data_dir`` must hold), the final
    model's scores, and whether its views are random augmentations (then drawn once, so the problem is finite)."""

    flags: list[str]
    data_flags: Callable[[argparse.Namespace, str], list[str]]
    files: Callable[[Path], list[Path]]
    final_scores: Callable[[argparse.Namespace, object, Probe], dict]
    random_views: bool = False


PROBLEMS = {
    "text": Problem(
        ["--config", str(ROOT / "configs/scratch_study.yaml"), "--config_overrides", TEXT_ARCH,
         "--temperature", "0.05", "--optim", "sgd", "--learning_rate", "1e-3"],
        text_data_flags,
        lambda data: [data / "nli" / "snli_triples.csv", data / "senteval" / "STS" / "STSBenchmark"],
        text_final_scores,
    ),
    "vision": Problem(
        ["--config", str(ROOT / "configs/vision_fmnist_emc2.yaml"), "--cifar_stem", "true",
         "--norm_layer", "group", "--temperature", "0.2", "--optim", "sgd", "--learning_rate", "1e-3"],
        vision_data_flags,
        lambda data: [data / "vision" / "fashion-mnist" / "train-images-idx3-ubyte.gz"],
        vision_final_scores,
        random_views=True,
    ),
}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for problem in args.problems:
        for seed in args.seeds:
            for method in args.methods:
                print(f"== {problem} {method} seed {seed}", flush=True)
                rows.append(run_one(args, problem, method, seed))
                table = write_report(args.output_dir, args.results, args.plot_dir, args.report_epochs)
    print(table)
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
