"""The package layout's promises: dependencies point one way (scripts → reward_models → recipes; recipes never
imports reward_models), nothing imports `trl.experimental` (removed APIs are not the kit's foundation), and parsing a
recipe loads no engine, no model code and no data library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
KIT_CODE = [REPO_ROOT / "recipes", REPO_ROOT / "reward_models", REPO_ROOT / "scripts", REPO_ROOT / "bench"]
# TRL 1.12's environment (bench/trl112) runs TRL's removed PPOTrainer on purpose: it records the reference figures.
REFERENCE_HARNESS = REPO_ROOT / "bench" / "trl112"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(*roots: Path) -> list[Path]:
    return sorted(path for root in roots for path in root.rglob("*.py") if REFERENCE_HARNESS not in path.parents)


def test_recipes_never_imports_reward_models():
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "reward_models")
        for path in python_files(REPO_ROOT / "recipes")
    }
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_nothing_imports_trl_experimental():
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in python_files(*KIT_CODE)
        if any(m == "trl.experimental" or m.startswith("trl.experimental.") for m in imported_modules(path))
    ]
    # (TRL's own trl.models.utils imports trl.experimental.utils for a deprecation shim: the kit uses only the
    # maintained names there, unwrap_model_for_generation and prepare_deepspeed.)
    assert not offenders


@pytest.mark.slow
def test_parsing_a_recipe_loads_no_engine_models_or_data():
    code = (
        "import sys\n"
        "from recipes.config import parse_recipe\n"
        "parse_recipe(['--config', 'configs/smollm2-135m/ppo.yaml'])\n"
        "loaded = [m for m in ('recipes.ppo.trainer', 'recipes.ppo.distributed', 'recipes.models', 'recipes.data', "
        "'recipes.rewards', 'recipes.generation', 'reward_models', 'datasets', 'deepspeed', 'wandb') if m in sys.modules]\n"
        "print(loaded)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
