"""The README's promises: its Quickstart commands exist as make targets, every recipe parses strictly, and every
file a README command names exists."""

import re
import subprocess
from pathlib import Path

import pytest

from recipes import REPO_ROOT, parse_recipe

README = (REPO_ROOT / "README.md").read_text()


def test_quickstart_commands_are_make_targets_and_ci_runs_make_test():
    assert "make demo" in README and "make test" in README
    for target in ("demo", "test"):
        dry_run = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True)
        assert dry_run.returncode == 0, dry_run.stderr
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob("configs/*/ppo.yaml")))
def test_every_ppo_recipe_parses_strictly(recipe):
    parsed = parse_recipe(["--config", str(REPO_ROOT / recipe)])
    assert parsed.model.model_name_or_path and parsed.training.output_dir


def test_files_named_in_readme_commands_exist():
    named = set(re.findall(r"\b((?:scripts|configs)/[\w./-]+\.(?:py|yaml))\b", README))
    assert named, "the README names no scripts or configs"
    missing = [path for path in named if "<" not in path and not (REPO_ROOT / path).is_file()]
    assert not missing, f"README names missing files: {missing}"
