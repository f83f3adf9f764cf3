"""Benchmark (not a test): how far PPO in the default pipeline moves the gold reward, and how much that varies from
seed to seed.

    make seeds        # = python bench/seed_spread.py; writes bench/seeds.json and bench/SEEDS.md

For each seed, scripts/ppo.py runs the default recipe (configs/smollm2-135m/ppo.yaml, `--seed` changed) against the
default reward model (outputs/smollm2-135m/reward_model; `make seeds` trains it first if absent), then
scripts/evaluate.py compares the policy with its reference on the 100 held-out prompts (configs/smollm2-135m/eval.yaml).
The evaluation's sampling seed stays that of eval.yaml, so the reference's completions are the same for every seed
and the spread is PPO's alone. A seed whose evaluation is already in `--workdir` is not run again (the runs are
deterministic for a seed on one machine).
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(KIT_ROOT))

from bench.ppo_bench import EVAL_RECIPE, RECIPE, REWARD_MODEL, run  # noqa: E402

PROXY = Path(REWARD_MODEL).name
# (column, eval_results.json key, format)
COLUMNS = [
    ("gold, policy", "reward/sentiment/mean", "{:.3f}"),
    ("gold, reference", "reference/reward/sentiment/mean", "{:.3f}"),
    ("gold gain", "gold_gain", "{:+.3f}"),
    ("its standard error over prompts", "gold_gain_se", "{:.3f}"),
    ("gold win-rate", "win_rate/sentiment", "{:.2f}"),
    ("proxy, policy", f"reward/{PROXY}/mean", "{:.3f}"),
    ("proxy, reference", f"reference/reward/{PROXY}/mean", "{:.3f}"),
    ("KL k1 (nats)", "kl/k1/mean", "{:.2f}"),
]


def with_gold_gain(eval_dir: Path) -> dict:
    """eval_results.json plus the gold gain (policy − reference mean) and its standard error over the prompts, from
    the per-prompt scores in samples.jsonl (both models answer the same prompts: the difference is paired)."""
    results = json.loads((eval_dir / "eval_results.json").read_text())
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line]
    gains = [row["policy_sentiment"] - row["reference_sentiment"] for row in samples]
    standard_error = statistics.stdev(gains) / math.sqrt(len(gains))
    return {**results, "gold_gain": statistics.mean(gains), "gold_gain_se": standard_error}


def evaluate_seed(seed: int, workdir: Path) -> dict:
    """PPO with `seed`, then the held-out evaluation; returns eval_results.json with the gold gain."""
    seed_dir = workdir / str(seed)
    results_file = seed_dir / "eval" / "eval_results.json"
    if results_file.is_file():
        print(f"seed {seed}: reusing {results_file.relative_to(KIT_ROOT)}", flush=True)
        return with_gold_gain(seed_dir / "eval")
    seed_dir.mkdir(parents=True, exist_ok=True)
    python = str(KIT_ROOT / ".venv" / "bin" / "python")
    print(f"seed {seed}: PPO ...", flush=True)
    run(
        [python, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml", "scripts/ppo.py",
         "--config", RECIPE, "--seed", str(seed), "--reward_model_name_or_path", REWARD_MODEL,
         "--output_dir", str(seed_dir / "ppo"), "--overwrite_output_dir", "true", "--report_to", "none"],
        seed_dir / "ppo.log",
    )  # fmt: skip
    print(f"seed {seed}: evaluation ...", flush=True)
    run(
        [python, "scripts/evaluate.py", "--config", EVAL_RECIPE, "--policy_name_or_path", str(seed_dir / "ppo"),
         "--reward_models", REWARD_MODEL, "--output_dir", str(seed_dir / "eval"), "--overwrite_output_dir", "true",
         "--report_to", "none"],
        seed_dir / "eval.log",
    )  # fmt: skip
    return with_gold_gain(seed_dir / "eval")


def row_values(results: dict) -> list[float]:
    return [results[key] for _, key, _ in COLUMNS]


def markdown(by_seed: dict[int, dict]) -> str:
    rows = {seed: row_values(results) for seed, results in by_seed.items()}
    lines = [
        f"# Gold reward after PPO, by seed ({time.strftime('%Y-%m-%d')}, `make seeds`)",
        "",
        f"Default recipe ({RECIPE}) against {REWARD_MODEL}; held-out evaluation by {EVAL_RECIPE} (100 prompts). "
        "Gold: VADER compound score in [-1, 1]; proxy: the reward model PPO optimised (std 1 over its training "
        "completions).",
        "",
        "| seed | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for seed, values in rows.items():
        lines.append(f"| {seed} | " + " | ".join(fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values)) + " |")
    if len(rows) > 1:
        # Across seeds: the mean ± the standard deviation (for the standard error column, its mean alone).
        cells = []
        for (_, key, fmt), column in zip(COLUMNS, zip(*rows.values())):
            spread = "" if key == "gold_gain_se" else f" ± {statistics.stdev(column):.3f}"
            cells.append(fmt.format(statistics.mean(column)) + spread)
        lines.append("| mean ± std over seeds | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--workdir", default="outputs/seeds")
    args = parser.parse_args()
    if not (KIT_ROOT / REWARD_MODEL / "config.json").is_file():
        sys.exit(f"{REWARD_MODEL} is missing: run `make reward-model` (make seeds does)")
    by_seed = {seed: evaluate_seed(seed, KIT_ROOT / args.workdir) for seed in args.seeds}
    out = KIT_ROOT / "bench"
    (out / "seeds.json").write_text(json.dumps({str(s): r for s, r in by_seed.items()}, indent=2) + "\n")
    (out / "SEEDS.md").write_text(markdown(by_seed))
    print((out / "SEEDS.md").read_text())


if __name__ == "__main__":
    main()
