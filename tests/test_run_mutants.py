"""``scripts/run_mutants.py`` finds mutmut's mutants by the names mutmut gives them and refuses a call without tests."""

from __future__ import annotations

import pytest

from conftest import load_script


def test_mutant_names_are_mutmuts_and_filtered_by_glob(tmp_path):
    package = tmp_path / "simcse_flat" / "losses"
    package.mkdir(parents=True)
    (tmp_path / "simcse_flat" / "distributed.py").write_text(
        "def x_rank__mutmut_1() -> int:\n    return 1\n"
        "class _AllGather:\n    def xǁ_AllGatherǁforward__mutmut_12(ctx, tensor):\n        pass\n"
        "def rank() -> int:  # the trampoline, not a mutant\n    pass\n"
    )  # fmt: skip
    (package / "__init__.py").write_text("def x_build_loss__mutmut_3(name):\n    pass\n")
    names = load_script("run_mutants").mutant_names
    assert names(tmp_path, ["*"]) == [
        "simcse_flat.distributed.x_rank__mutmut_1",
        "simcse_flat.distributed.xǁ_AllGatherǁforward__mutmut_12",
        "simcse_flat.losses.x_build_loss__mutmut_3",
    ]
    assert names(tmp_path, ["simcse_flat.distributed.xǁ_AllGather*"]) == [
        "simcse_flat.distributed.xǁ_AllGatherǁforward__mutmut_12"
    ]


def test_tests_must_be_named_after_a_double_dash(capsys):
    with pytest.raises(SystemExit):
        load_script("run_mutants").main(["simcse_flat.distributed.*"])
    assert "name the tests after --" in capsys.readouterr().err
