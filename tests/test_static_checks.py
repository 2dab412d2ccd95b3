"""The static checks CI holds the code to, run as part of the suite so the one test command covers them:
ruff (lint and format) and mypy --strict. mypy is what makes event handling exhaustive: a new
ChoiceEvent or GenerationEvent type that some ``match`` does not handle fails ``assert_never`` here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_ruff_lint_and_format() -> None:
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
