"""Benchmark (not a test): PPO beside its rivals (RLOO, GRPO, DPO, RAFT) on the default task, with the same prompts,
the same proxy reward model, the same budget and the same evaluation, for several seeds.

    make compare        # = python bench/compare.py; writes bench/compare.json, bench/COMPARE.md, bench/compare.png

Each method runs its SmolLM2 recipe (configs/smollm2-135m/<method>.yaml) against the default reward model
(outputs/smollm2-135m/reward_model and the preference pairs it learnt from; `make compare` trains them first if
absent). The online methods sample the same number of completions (the recipes' 128, PPO's `total_episodes`); DPO
samples none while training but learns from the ~1,800 completions sampled once for the reward model's pairs. Each
run's wall seconds and CPU seconds (its processes' user + system time) are measured. Every policy is then evaluated by
scripts/evaluate.py against the same reference on the 100 held-out prompts (configs/smollm2-135m/eval.yaml): gold
(VADER) and proxy reward, KL, perplexity, gold win-rate, EOS rate, distinct-n. For the first seed the checkpoints
along each run are evaluated too: each method's gold-vs-KL curve, and its proxy-vs-KL curve beside it (where they
part, the proxy is over-optimised). The runs log to W&B (offline without a key) in one group, side by side.

A run whose output folder is complete is not run again (`--workdir`; the runs are deterministic for a seed).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KIT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(KIT_ROOT))

from bench.ppo_bench import EVAL_RECIPE, REWARD_MODEL, run  # noqa: E402
from recipes.evaluation import RESULTS_FILE, SWEEP_FILE  # noqa: E402

PREFERENCES = "outputs/smollm2-135m/preferences"
PROXY = Path(REWARD_MODEL).name
LAUNCH = ["-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml"]


@dataclass
class Method:
    name: str
    script: str
    flags: list[str]
    """Beyond the recipe: what makes the run comparable (checkpoints along the way, no in-run evaluation)."""
    completions_sampled: str
    """The budget, in completions sampled, as the recipe's header states it."""

    @property
    def recipe(self) -> str:
        return f"configs/smollm2-135m/{self.name}.yaml"

    def checkpoints(self, run_dir: Path) -> list[Path]:
        """The policies saved along the run, oldest first (the final one is the run folder itself)."""
        patterns = {"ppo": "checkpoints/update-*", "raft": "rounds/round-*"}
        folders = [path for path in run_dir.glob(patterns.get(self.name, "checkpoint-*")) if path.is_dir()]
        return sorted(folders, key=lambda path: int(path.name.rsplit("-", 1)[1]))  # checkpoint-32 before -128


METHODS = [
    # Checkpoints every 4 of the 16 updates; the held-out evaluation inside the run is left to this benchmark.
    Method("ppo", "scripts/ppo.py", ["--save_steps", "4", "--save_total_limit", "4", "--eval_every_updates", "0"],
           "128 (16 updates × 8 episodes)"),
    Method("rloo", "scripts/rloo.py", [], "128 (16 generations × 8)"),
    Method("grpo", "scripts/grpo.py", [], "128 (16 generations × 8)"),
    Method("dpo", "scripts/dpo.py", [], "0 while training (learns from ~905 pairs of the ~2,000 sampled once)"),
    Method("raft", "scripts/raft.py", [], "128 (4 rounds × 8 prompts × 4)"),
]


def finished(run_dir: Path) -> bool:
    """A run that saved its policy and then its timing (written last)."""
    return (run_dir / "timing.json").is_file() and (run_dir / "adapter_config.json").is_file()


def train(method: Method, seed: int, run_dir: Path, group: str) -> dict:
    """Runs the method's recipe with `seed` into `run_dir` unless a finished run is there; returns its wall and CPU
    seconds (those of the first run, kept beside it in timing.json)."""
    timing_file = run_dir / "timing.json"
    if finished(run_dir):
        print(f"{method.name}, seed {seed}: reusing {run_dir.relative_to(KIT_ROOT)}", flush=True)
        return json.loads(timing_file.read_text())
    print(f"{method.name}, seed {seed}: training ...", flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # the run's log goes beside its folder
    python = str(KIT_ROOT / ".venv" / "bin" / "python")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.environ["WANDB_RUN_GROUP"] = group  # W&B shows the group's runs side by side
    wall = run(
        [python, *LAUNCH, method.script, "--config", method.recipe, "--seed", str(seed), "--output_dir", str(run_dir),
         "--overwrite_output_dir", "true", "--run_name", f"{group}-{method.name}-{seed}", *method.flags],
        run_dir.parent / f"{run_dir.name}.log",
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {"wall_seconds": wall, "cpu_seconds": cpu, "completions_sampled": method.completions_sampled}
    timing_file.write_text(json.dumps(timing, indent=2) + "\n")
    return timing


def evaluate(policies: list[Path], eval_dir: Path) -> dict[str, dict]:
    """Evaluates `policies` against the same reference (its side computed once per evaluation): {policy path: row}.
    Policies an earlier `make compare` evaluated (same reference, prompts and seed: the same reference figures) are
    read back; the others (e.g. the seeds added since) are evaluated together in a new part-<n> folder."""
    rows = evaluated_rows(eval_dir)
    missing = [path for path in policies if str(path) not in rows]
    if missing:
        parts = [path for path in eval_dir.glob("part-*") if path.is_dir()]  # not their part-<n>.log beside them
        part = eval_dir / f"part-{len(parts) + 1}" if rows else eval_dir
        print(f"evaluating {len(missing)} policies ...", flush=True)
        python = str(KIT_ROOT / ".venv" / "bin" / "python")
        run([python, "scripts/evaluate.py", "--config", EVAL_RECIPE, "--checkpoints", *map(str, missing),
             "--reward_models", REWARD_MODEL, "--output_dir", str(part), "--overwrite_output_dir", "true",
             "--report_to", "none"], part.parent / f"{part.name}.log")  # fmt: skip
        rows.update(evaluated_rows(part))
    return rows


def evaluated_rows(eval_dir: Path) -> dict[str, dict]:
    """The rows of every finished evaluation under `eval_dir` (a folder with its eval_results.json: the rows of its
    sweep.jsonl when it evaluated several policies, else that one row), by policy path."""
    rows = {}
    for results in sorted(eval_dir.rglob(RESULTS_FILE)):
        sweep = results.parent / SWEEP_FILE
        lines = sweep.read_text().splitlines() if sweep.is_file() else [results.read_text()]
        rows.update((row["policy"], row) for row in map(json.loads, filter(None, lines)))
    return rows


# -- the report --------------------------------------------------------------------------------------------------

COLUMNS = [
    ("gold", "reward/sentiment/mean", "{:.3f}"),
    ("proxy", f"reward/{PROXY}/mean", "{:.3f}"),
    ("KL k1 (nats)", "kl/k1/mean", "{:.2f}"),
    ("gold win-rate", "win_rate/sentiment", "{:.2f}"),
    ("EOS rate", "eos_rate", "{:.2f}"),
    ("distinct-1", "distinct_1", "{:.2f}"),
    ("perplexity of the reference's replies", "perplexity/policy", "{:.2f}"),
]


def reference_row(row: dict) -> dict:
    """The reference's own figures, under the policy's keys, from any evaluation row (every row has the same
    reference, sampled with the same seed)."""
    reference = {key.removeprefix("reference/"): value for key, value in row.items() if key.startswith("reference/")}
    reference.update({"kl/k1/mean": 0.0, "win_rate/sentiment": 0.5, "perplexity/policy": row["perplexity/reference"]})
    return reference


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def markdown(results: dict) -> str:
    reference = results["reference"]
    seeds = results["seeds"]
    header = ["method", "seeds", *(name for name, _, _ in COLUMNS), "completions sampled", "wall min", "CPU min"]
    lines = [
        "# PPO beside its rivals on the default task",
        "",
        f"Measured by `make compare` on {results['machine']} ({results['date']}): each method's SmolLM2-135M-Instruct "
        f"recipe (configs/smollm2-135m/<method>.yaml, LoRA) against the same proxy reward model, on the same prompts, "
        f"seeds {', '.join(map(str, seeds))}; evaluated on the 100 held-out prompts against the same reference "
        f"(mean ± std over seeds of each seed's figure). Gold: VADER compound score; proxy: the reward model the "
        f"methods optimise (std 1 over its training completions); KL per reply of ≤ 32 tokens.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| reference (SmolLM2-135M-Instruct) | | " + " | ".join(
            fmt.format(reference[key]) if key in reference else "" for _, key, fmt in COLUMNS
        ) + " | | | |",
    ]  # fmt: skip
    for name, method in results["methods"].items():
        finals = method["finals"]
        cells = [mean_std([row[key] for row in finals], fmt) for _, key, fmt in COLUMNS]
        walls = [t["wall_seconds"] / 60 for t in method["timing"]]
        cpus = [t["cpu_seconds"] / 60 for t in method["timing"]]
        cells += [method["timing"][0]["completions_sampled"], mean_std(walls, "{:.1f}"), mean_std(cpus, "{:.1f}")]
        lines.append(f"| {name} | {', '.join(map(str, method.get('seeds', seeds)))} | " + " | ".join(cells) + " |")
    left_out = []
    for name in (m.name for m in METHODS):
        done = results["methods"][name].get("seeds", seeds) if name in results["methods"] else []
        if missing := [seed for seed in seeds if seed not in done]:
            left_out.append(f"{name} (seed{'s' * (len(missing) > 1)} {', '.join(map(str, missing))})")
    if left_out:
        lines += ["", f"Not run in this measurement: {'; '.join(left_out)} (`make compare` runs them and reuses the "
                  "finished runs)."]
    lines += [
        "",
        "Curves along each run (first seed; its checkpoints, then the final policy): `bench/compare.png`, gold and "
        "proxy against KL. Per-policy figures: `bench/compare.json`.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gold_axes, proxy_axes) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    reference = results["reference"]
    for axes, key, title in ((gold_axes, "reward/sentiment/mean", "gold (VADER)"),
                             (proxy_axes, f"reward/{PROXY}/mean", "proxy (the reward model)")):  # fmt: skip
        for name, method in results["methods"].items():
            curve = method["curve"]
            line = axes.plot([0] + [row["kl/k1/mean"] for row in curve], [reference[key]] + [row[key] for row in curve],
                             marker="o", label=name)[0]  # fmt: skip
            axes.scatter([row["kl/k1/mean"] for row in method["finals"]], [row[key] for row in method["finals"]],
                         marker="x", color=line.get_color())  # fmt: skip
        axes.set_title(title)
        axes.set_xlabel("KL(policy ‖ reference), k1, nats per reply")
        axes.set_ylabel("mean reward, held-out prompts")
        axes.grid(alpha=0.3)
    gold_axes.legend()
    figure.suptitle("Along each run (first seed, o) and every seed's final policy (x)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], default=[m.name for m in METHODS])
    parser.add_argument("--workdir", default="outputs/compare")
    parser.add_argument("--finished_only", action="store_true",
                        help="train nothing: evaluate and report the runs already finished, naming those missing")
    args = parser.parse_args()
    for needed in (REWARD_MODEL + "/config.json", PREFERENCES + "/train.jsonl"):
        if not (KIT_ROOT / needed).is_file():
            sys.exit(f"{needed} is missing: run `make reward-model` (make compare does)")
    workdir = KIT_ROOT / args.workdir
    group = f"compare-{time.strftime('%Y%m%d')}"
    methods = [m for m in METHODS if m.name in args.methods]
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "seeds": args.seeds,
               "methods": {}}  # fmt: skip
    for method in methods:
        run_dir_of = {seed: workdir / method.name / f"seed-{seed}" for seed in args.seeds}
        seeds = [seed for seed, run_dir in run_dir_of.items() if not args.finished_only or finished(run_dir)]
        if not seeds:
            continue
        run_dirs = [run_dir_of[seed] for seed in seeds]
        timing = [train(method, seed, run_dir, group) for seed, run_dir in zip(seeds, run_dirs)]
        along = method.checkpoints(run_dirs[0])  # the curve: the first seed's checkpoints, then its final policy
        rows = evaluate([*along, *run_dirs], workdir / method.name / "eval")
        results["methods"][method.name] = {
            "seeds": seeds,
            "timing": timing,
            "finals": [rows[str(path)] for path in run_dirs],
            "curve": [rows[str(path)] for path in [*along, run_dirs[0]]],
        }
        results["reference"] = reference_row(results["methods"][method.name]["finals"][0])
    out = KIT_ROOT / "bench"
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "COMPARE.md").write_text(markdown(results))
    plot(results, out / "compare.png")
    print((out / "COMPARE.md").read_text())


if __name__ == "__main__":
    main()
