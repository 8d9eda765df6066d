"""scripts/compare_losses.py's tables (the runs themselves are tested in test_vision.py)."""

from __future__ import annotations

from conftest import load_script


def test_seed_summary_gives_mean_and_sample_deviation_per_loss():
    script = load_script("compare_losses")
    rows = [
        {"run": "infonce_b4_seed1", "best": 80.0, "linear": None},
        {"run": "infonce_b4_seed2", "best": 83.0, "linear": None},
        {"run": "infonce_b4_seed3", "best": 83.0, "linear": None},
        {"run": "flatnce_b4_seed1", "best": 81.5, "linear": None},
    ]
    table = script.format_seed_summary(rows).splitlines()
    assert table[0] == "| run | seeds | best |"  # no probe column: no row has one
    # mean 82, sample deviation sqrt((4 + 1 + 1) / 2) = sqrt(3)
    assert table[2] == "| infonce_b4 | 3 | 82.00 ± 1.73 |"
    assert table[3] == "| flatnce_b4 | 1 | 81.50 |"
