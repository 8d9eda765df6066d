"""The exact global loss and its full gradient (simcse_flat.global_loss), and scripts/bench_global_loss.py's checks."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import load_script
from torch import nn

from simcse_flat.global_loss import exact_objective, relative_error, step_gradient
from simcse_flat.losses import DCLLoss, EMC2Loss
from simcse_flat.views import contrastive_loss_on_views

TAU = 0.5


class Linear(nn.Module):
    """An encoder whose rows do not mix: ``forward(x=...)`` maps each row on its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.map = nn.Linear(3, 2)

    def forward(self, x):
        return self.map(x)


def _table(m: int = 3) -> dict:
    torch.manual_seed(1)
    return {"x": torch.randn(2 * m, 3), "sample_ids": torch.arange(m)}  # view-major: m anchors, then m positives


def _cos(u, v):
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def _hand_loss(model: Linear, table: dict, all_views: bool) -> torch.Tensor:
    """L written out term by term: for each anchor, log of the sum of e^{cos/τ} over its negatives, minus its
    positive's cos/τ; all_views: both views of every sample are anchors, negatives every view of the others."""
    e = model(table["x"])
    m = e.size(0) // 2
    terms = []
    for i in range(m if not all_views else 2 * m):
        anchor, positive = e[i], e[(i + m) % (2 * m)]
        if all_views:
            negatives = [e[j] for j in range(2 * m) if j % m != i % m]
        else:
            negatives = [e[m + j] for j in range(m) if j != i]
        cos = lambda u, v: (u @ v) / (u.norm() * v.norm())  # noqa: E731
        terms.append(torch.log(sum(torch.exp(cos(anchor, z) / TAU) for z in negatives)) - cos(anchor, positive) / TAU)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("negatives", ["cross_view", "all_views"])
def test_exact_loss_and_gradient_match_a_hand_computation_in_chunks(negatives):
    model, table = Linear(), _table()
    hand = _hand_loss(model, table, negatives == "all_views")
    hand_grad = torch.autograd.grad(hand, list(model.parameters()))
    symmetric = negatives == "all_views"
    exact = exact_objective(model, table, TAU, symmetric, negatives, chunk_size=4)  # 6 rows: chunks of 4 and 2
    assert exact.value == pytest.approx(float(hand), rel=1e-5)
    assert relative_error(exact.gradient, list(hand_grad)) < 1e-5
    assert exact_objective(model, table, TAU, symmetric, negatives, gradient=False).gradient is None


def test_log_partition_is_each_anchor_mean_over_its_negatives():
    model, table = Linear(), _table()
    e = model(table["x"]).detach()
    hand = [math.log(sum(math.exp(_cos(e[i], e[3 + j]) / TAU) for j in range(3) if j != i) / 2) for i in range(3)]
    exact = exact_objective(model, table, TAU, gradient=False)
    assert exact.log_partition.tolist() == pytest.approx(hand, rel=1e-5)


def test_the_full_batch_loss_is_emc2s_global_loss():
    """The full-batch run (DCL at batch m, through the loop's views) trains on exactly EMC2Loss.global_loss."""
    torch.manual_seed(2)
    anchors, positives = torch.randn(6, 4), torch.randn(6, 4)
    expected = EMC2Loss(dataset_size=6, temperature=TAU).global_loss(anchors, positives)
    full_batch, _ = contrastive_loss_on_views(DCLLoss(TAU), torch.cat([anchors, positives]), torch.arange(6))
    assert float(full_batch) == pytest.approx(float(expected), rel=1e-6)

    class Table(nn.Module):  # the embeddings themselves, as an "encoder" of row indices
        def __init__(self):
            super().__init__()
            self.rows = nn.Parameter(torch.cat([anchors, positives]))

        def forward(self, index):
            return self.rows[index]

    exact = exact_objective(Table(), {"index": torch.arange(12), "sample_ids": torch.arange(6)}, TAU, chunk_size=5)
    assert exact.value == pytest.approx(float(expected), rel=1e-6)


def test_relative_error_and_the_step_gradient():
    model = Linear()
    assert [float(g.abs().sum()) for g in step_gradient(model)] == [0.0, 0.0]  # no .grad yet: zeros
    model(torch.ones(1, 3)).sum().backward()
    grads = step_gradient(model)
    assert relative_error(grads, grads) == 0.0
    assert relative_error([2 * g for g in grads], grads) == pytest.approx(1.0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--m", "2"], "error: --m 2: the problem needs a whole number of batches of 4 (m >= 4)"),
    (["--methods", "simclr"], "error: unknown loss 'simclr'; choose from infonce, flatnce, dcl, sogclr"),
    (["--problems", "audio"], "error: unknown problem 'audio'; choose from ['text', 'vision']"),
    (["--data_dir", "/nonexistent"], "error: /nonexistent/nli/snli_triples.csv: missing"),
])  # fmt: skip
def test_bad_settings_fail_before_training_with_one_line(argv, message, capsys, tmp_path):
    from simcse_flat.cli import run_cli

    script = load_script("bench_global_loss")
    assert run_cli(lambda: script.main([*argv, "--output_dir", str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_the_table_of_a_committed_csv_is_the_mean_and_sd_over_seeds(tmp_path):
    """``global_loss_report.py --table``: the docs' table is rebuilt from the CSV alone (the runs are not kept)."""
    report = load_script("global_loss_report")
    rows = [{"problem": "text", "m": 500, "method": "infonce", "estimator": "", "seed": seed, "epochs": 10,
             "L_report": value, "L_above_full": value + 9.5} for seed, value in ((1, 0.5), (2, 1.5))]  # fmt: skip
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=report.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    line = report.markdown_table(report.read_results(path)).splitlines()[-1]
    assert line.startswith("| text (m 500) | 10 | infonce | 2 | 1 ± 0.71 | 10.5 ± 0.71 | - |")
