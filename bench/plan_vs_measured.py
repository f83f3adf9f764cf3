"""Benchmark (not a test): the planner's memory figure for the CPU recipe against the peak resident memory of a
real run of it.

    python bench/plan_vs_measured.py [--total_episodes 8] [--workdir /tmp/plan_vs_measured]

Runs configs/smollm2-135m/ppo.yaml as its README launches it (accelerate, configs/accelerate/cpu.yaml) with a tiny
budget, in a child process, and reads the peak RSS of the largest process waited for
(`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`): the training process. Without outputs/smollm2-135m/reward_model,
a stand-in takes its place: SmolLM2-135M-Instruct saved as a one-label sequence classifier (random score head) in the
work folder, the same architecture and size as the reward model the kit trains. A child that only imports what a run
imports reports its own peak RSS: the process baseline that the planner's CPU_RUNTIME_GIB stands for. Takes several
minutes (model loading and one update: 6 to 15 minutes on two shared cores).
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(KIT_ROOT))

from recipes.planner import GIB, CPU_RUNTIME_GIB, PlanRequest, load_hardware, plan_recipe  # noqa: E402

RECIPE = "configs/smollm2-135m/ppo.yaml"
KIT_REWARD_MODEL = KIT_ROOT / "outputs" / "smollm2-135m" / "reward_model"
# The child reports its own peak RSS (bytes): RUSAGE_CHILDREN would be the maximum over every child waited for so far.
IMPORTS_OF_A_RUN = (
    "import resource, recipes.run, recipes.rewards.sources, torch.distributed; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
)


def stand_in_reward_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as a one-label classifier with the kit's pad token, saved once."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForSequenceClassification

    from recipes.config import ModelArguments
    from recipes.model_cache import resolve_model_path
    from recipes.models import load_tokenizer

    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=base))
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(base), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_child(command: list[str]) -> tuple[str, float]:
    """Runs `command` to completion in the kit's folder; returns (its stdout, seconds)."""
    started = time.monotonic()
    result = subprocess.run(command, cwd=KIT_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return result.stdout, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total_episodes", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/plan_vs_measured")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    reward = KIT_REWARD_MODEL if (KIT_REWARD_MODEL / "config.json").is_file() else None
    reward = reward or stand_in_reward_model(workdir / "reward_model")
    run_dir = workdir / f"run-{int(time.time())}"
    flags = ["--total_episodes", str(args.total_episodes), "--reward_model_name_or_path", str(reward),
             "--output_dir", str(run_dir), "--report_to", "none"]  # fmt: skip

    request = PlanRequest(["--config", RECIPE, *flags], load_hardware(RECIPE), None)
    plan, _ = plan_recipe(request)
    planned = plan.peak_bytes

    output, _ = run_child([sys.executable, "-c", IMPORTS_OF_A_RUN])
    baseline = int(output.split()[-1])
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _, seconds = run_child([accelerate, "launch", "--config_file", "configs/accelerate/cpu.yaml", "scripts/ppo.py",
                            "--config", RECIPE, *flags])  # fmt: skip
    # The largest process this benchmark has waited for (directly or through the launcher): the training process.
    measured = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    print(f"recipe: {RECIPE} {' '.join(flags)}")
    print(f"reward model: {reward}")
    print(plan.table())
    print()
    print(f"process baseline (imports only), measured:  {baseline / GIB:.2f} GiB (planner: {CPU_RUNTIME_GIB} GiB)")
    print(f"planner, peak per process ({plan.peak_phase}): {planned / GIB:.2f} GiB")
    print(f"measured peak RSS of the run ({seconds:.0f} s):      {measured / GIB:.2f} GiB")
    print(f"planned / measured: {planned / measured:.2f}")


if __name__ == "__main__":
    main()
