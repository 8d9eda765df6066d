"""Run mutmut's mutants against tests whose reach mutmut cannot see: code that runs in spawned or launched processes.

mutmut learns which tests reach a function by recording calls in the test process only. A function called only in
gloo workers or ``accelerate launch`` children gets no tests ("no tests"), and a multi-process test is never run
against the functions its children call. This runs each chosen mutant against the tests given, the way mutmut runs
one (from ``mutants/``, the mutant named in ``MUTANT_UNDER_TEST``), with the mutated package first on ``PYTHONPATH``
so that every child process runs the mutant too. The project's current tests are copied into ``mutants/tests`` first,
so tests written after ``mutmut run`` count.

    mutmut run --max-children 1 "simcse_flat.distributed*"      # makes mutants/ (and mutmut's own verdicts)
    python scripts/run_mutants.py "simcse_flat.distributed.*" -- tests/test_distributed.py -k gloo

Prints one line a mutant (killed, survived, timed out) and a count; ``mutmut show NAME`` shows a mutant's edit.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANT_DEF = re.compile(r"^\s*def (x\S*?__mutmut_\d+)\(", re.MULTILINE)


def mutant_names(mutants: Path, patterns: list[str]) -> list[str]:
    """Every mutant in ``mutants/`` whose ``module.function__mutmut_N`` name matches one of ``patterns``."""
    names = []
    for file in sorted((mutants / "simcse_flat").rglob("*.py")):
        module = ".".join(file.relative_to(mutants).with_suffix("").parts).removesuffix(".__init__")
        names += [f"{module}.{name}" for name in MUTANT_DEF.findall(file.read_text())]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def run_tests(mutants: Path, mutant: str, pytest_args: list[str], timeout: float) -> str:
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(mutants)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args]
    try:
        done = subprocess.run(command, check=False, cwd=mutants, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    return "survived" if done.returncode == 0 else "killed"


def main(argv: list[str] | None = None) -> int:
    usage = "%(prog)s PATTERN [PATTERN ...] [--timeout S] -- PYTEST_ARGS"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=usage)
    parser.add_argument("patterns", nargs="+", help='mutant names or globs, e.g. "simcse_flat.distributed.*"')
    parser.add_argument("--timeout", type=float, default=300, help="seconds a mutant's test run may take")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, pytest_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not pytest_args:
        parser.error("name the tests after --, e.g. -- tests/test_distributed.py -k gloo")
    mutants = ROOT / "mutants"
    if not (mutants / "simcse_flat").is_dir():
        parser.error(f"{mutants}: no mutants; run `mutmut run` first")
    shutil.copytree(ROOT / "tests", mutants / "tests", dirs_exist_ok=True)
    names = mutant_names(mutants, args.patterns)
    if not names:
        parser.error(f"no mutant in {mutants} matches {args.patterns}")
    if run_tests(mutants, "", pytest_args, args.timeout) != "survived":
        parser.error(f"the tests fail without a mutant: pytest {' '.join(pytest_args)}")
    verdicts = {}
    for name in names:
        verdicts[name] = run_tests(mutants, name, pytest_args, args.timeout)
        print(f"{verdicts[name]:9}  {name}", flush=True)
    counts = {v: list(verdicts.values()).count(v) for v in ("killed", "survived", "timed out")}
    print(f"{len(names)} mutants: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
