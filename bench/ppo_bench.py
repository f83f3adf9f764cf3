"""Benchmark (not a test): the standard PPO workload, the kit's default recipe beside TRL 1.12's own PPOTrainer
configured as TRL's example script configures it with `--use_peft`, speed and quality in the same run.

    make bench        # = python bench/ppo_bench.py; writes bench/results.json and bench/RESULTS.md

The workload: SmolLM2-135M-Instruct (offline copy) as policy and reference, the default sentiment prompts and the
default proxy reward model (configs/smollm2-135m/reward.yaml; `make bench` trains it first if absent), 16 episodes
per update in 2 mini-batches, 48-token responses, 4 PPO epochs, seed 42, `--updates` updates (default 12).

The kit's configurations are runs of scripts/ppo.py (accelerate, configs/accelerate/cpu.yaml), each in its own
process. TRL's is bench/trl112/ppo_baseline.py in TRL 1.12's environment (`make trl112-env`: trl 1.13 removed the
trainer): LoRA policy whose adapter disabled is the reference, a full-size critic and the reward model both from the
reward model's folder, reading the policy's tokens, fp32. Every policy is then evaluated by the kit's
scripts/evaluate.py on the 100 held-out prompts (against its reference = before). Per update: seconds split into
generation, scoring and optimisation (min and median over updates), episodes/s and peak memory (the kit's per-phase
high-water marks; TRL's process peak RSS). FLOPs of each phase are counted from the models' shapes (`phase_flops`)
and divided by the phase's median time; this machine's matmul peak is measured in the same run.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

KIT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(KIT_ROOT))

from recipes.model_cache import resolve_model_path  # noqa: E402
from recipes.planner import Architecture, load_architecture  # noqa: E402

RECIPE = "configs/smollm2-135m/ppo.yaml"
EVAL_RECIPE = "configs/smollm2-135m/eval.yaml"
POLICY = "HuggingFaceTB/SmolLM2-135M-Instruct"
REWARD_MODEL = "outputs/smollm2-135m/reward_model"
EPISODES, MINI_BATCHES, RESPONSE, EPOCHS = 16, 2, 48, 4
WORKLOAD = [
    "--per_device_train_batch_size", str(EPISODES), "--local_rollout_forward_batch_size", str(EPISODES),
    "--num_mini_batches", str(MINI_BATCHES), "--response_length", str(RESPONSE), "--num_ppo_epochs", str(EPOCHS),
    "--seed", "42", "--save_strategy", "no", "--report_to", "none", "--eval_every_updates", "0", "--reward_model_name_or_path", REWARD_MODEL,
]  # fmt: skip


@dataclass
class Configuration:
    name: str
    label: str
    flags: list[str]
    dtype: str
    value_model: bool
    """A separate critic network (forwarded in scoring, trained in full) rather than a head on the policy."""
    trl112: bool = False
    """TRL 1.12's PPOTrainer (bench/trl112/ppo_baseline.py in its own environment) rather than the kit's engine."""


CONFIGURATIONS = [
    Configuration("kit", "kit default recipe (configs/smollm2-135m/ppo.yaml)", [], "bfloat16", False),
    # The same in fp32: whether bf16 changes the learning curve beyond noise.
    Configuration("kit_fp32", "kit default recipe in fp32", ["--dtype", "float32"], "float32", False),
    # TRL 1.12's own trainer, as TRL's example script sets it up with --use_peft (bench/trl112/ppo_baseline.py).
    Configuration("trl112_use_peft", "TRL 1.12 PPOTrainer, example `--use_peft` configuration", [], "float32", True,
                  trl112=True),  # fmt: skip
]
TRL112_PYTHON = KIT_ROOT / ".venv-trl112" / "bin" / "python"


# -- this machine's matmul peak ---------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of a square matmul over `repeats` runs (after a warm-up), on all of torch's threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


# -- FLOPs of one update, from the shapes ------------------------------------------------------------------------


def forward_flops(arch: Architecture, sequences: int, tokens: int, logit_positions: int) -> float:
    """One forward of `sequences` rows of `tokens` tokens: 2 FLOPs per weight per token in the linear layers, the
    attention scores and their weighted sum (2 × 2 × tokens² × q_dim per layer per row, the causal mask not
    discounted: the CPU kernels compute the full square), and the LM head at `logit_positions` per row."""
    linear = 2 * arch.linear_weights * tokens
    attention = 4 * arch.num_layers * tokens**2 * arch.q_dim
    head = 2 * arch.hidden_size * arch.vocab_size * logit_positions
    return sequences * (linear + attention + head)


def generation_flops(arch: Architecture, sequences: int, prompt: int, response: int) -> float:
    """Prefill of the prompt, then one token per step with the KV cache (attention over all earlier tokens)."""
    total = forward_flops(arch, sequences, prompt, 1)
    for step in range(1, response):
        context = prompt + step
        per_row = 2 * arch.linear_weights + 4 * arch.num_layers * context * arch.q_dim
        per_row += 2 * arch.hidden_size * arch.vocab_size
        total += sequences * per_row
    return total


def phase_flops(config: Configuration, policy: Architecture, critic: Architecture, prompt: int) -> dict[str, float]:
    """FLOPs per update. Scoring: the reference (policy with its adapter disabled) and the policy at the response
    positions, the reward model (score head only), and a separate critic when there is one. Optimisation, per
    epoch over all episodes: the policy forward plus a backward of the same cost (gradients of the activations
    through frozen weights; LoRA's own are negligible), and for a separate critic trained in full a forward and a
    backward of twice its cost (activations and weights)."""
    tokens = prompt + RESPONSE
    policy_forward = forward_flops(policy, EPISODES, tokens, RESPONSE + 1)
    critic_forward = forward_flops(critic, EPISODES, tokens, 0)
    scoring = 2 * policy_forward + critic_forward + (critic_forward if config.value_model else 0)
    optimisation = EPOCHS * (2 * policy_forward + (3 * critic_forward if config.value_model else 0))
    return {
        "generation": generation_flops(policy, EPISODES, prompt, RESPONSE),
        "scoring": scoring,
        "optimisation": optimisation,
    }


# -- running -----------------------------------------------------------------------------------------------------


def run(command: list[str], log: Path) -> float:
    """Runs `command` in the kit's folder with its output in `log`; stops the benchmark if it fails."""
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=KIT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")
    return time.monotonic() - started


def benchmark(config: Configuration, workdir: Path, updates: int) -> dict:
    python = str(KIT_ROOT / ".venv" / "bin" / "python")
    run_dir = workdir / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{config.name}: PPO, {updates} updates ...", flush=True)
    if config.trl112:
        ppo_seconds = run(
            [str(TRL112_PYTHON), "bench/trl112/ppo_baseline.py", "--updates", str(updates), "--reward_model_path",
             REWARD_MODEL, "--output", str(run_dir / "baseline.json"), "--output_dir", str(run_dir / "ppo"),
             "--overwrite_output_dir", "true"],
            run_dir / "ppo.log",
        )  # fmt: skip
        updates_run = trl112_updates(json.loads((run_dir / "baseline.json").read_text()))
    else:
        ppo_seconds = run(
            [python, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml",
             "scripts/ppo.py", "--config", RECIPE, *WORKLOAD, "--total_episodes", str(EPISODES * updates),
             "--output_dir", str(run_dir / "ppo"), "--overwrite_output_dir", "true", *config.flags],
            run_dir / "ppo.log",
        )  # fmt: skip
        metrics = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines() if line]
        updates_run = kit_updates(metrics)
    print(f"{config.name}: evaluation ...", flush=True)
    run(
        [python, "scripts/evaluate.py", "--config", EVAL_RECIPE, "--policy_name_or_path", str(run_dir / "ppo"),
         "--reward_models", REWARD_MODEL, "--response_length", str(RESPONSE), "--output_dir", str(run_dir / "eval"),
         "--overwrite_output_dir", "true", "--report_to", "none"],
        run_dir / "eval.log",
    )  # fmt: skip
    quality = json.loads((run_dir / "eval" / "eval_results.json").read_text())
    phases = {}
    for phase in ("generation", "scoring", "optimisation"):
        seconds = [u[phase] for u in updates_run]
        phases[phase] = {"min_s": min(seconds), "median_s": statistics.median(seconds)}
    per_update = [sum(u[p] for p in phases) for u in updates_run]
    sampled = statistics.median(u["sampled_positions"] for u in updates_run if u["sampled_positions"])
    prompt_width = round(sampled / EPISODES) - RESPONSE if sampled / EPISODES > RESPONSE else 0
    return {
        "label": config.label,
        "flags": config.flags,
        "dtype": config.dtype,
        "updates": len(updates_run),
        "wall_seconds_ppo": ppo_seconds,
        "seconds_per_update": {"min": min(per_update), "median": statistics.median(per_update)},
        "phases": phases,
        "episodes_per_second": EPISODES / statistics.median(per_update),
        "sampled_tokens_per_second": sampled / phases["generation"]["median_s"],
        "peak_memory_gib": max(u["peak_memory_gib"] for u in updates_run),
        "prompt_width_median": prompt_width,
        "curve": {key: [u["metrics"][key] for u in updates_run] for key in CURVE},
        "quality": {k: v for k, v in quality.items() if isinstance(v, (int, float))},
    }


CURVE = ("objective/scores", "objective/kl", "objective/rlhf_reward")


def kit_updates(metrics: list[dict]) -> list[dict]:
    """Per update of a kit run: phase seconds, peak memory (the highest of its phases), positions sampled, metrics."""
    return [
        {
            "generation": m["time/generation_s"], "scoring": m["time/scoring_s"], "optimisation": m["time/optimisation_s"],
            "peak_memory_gib": m["memory/peak_gib"], "sampled_positions": m["rollout/sampled_positions"], "metrics": m,
        }  # fmt: skip
        for m in metrics
    ]


def trl112_updates(baseline: dict) -> list[dict]:
    """The same figures from bench/trl112/ppo_baseline.py's JSON. TRL's sample table (a debug print of greedy
    completions, which the kit's recipes turn off) is left out of the seconds, so that both sides do the same work;
    its seconds are kept in the JSON. Sampled positions: TRL does not report them; one generate call over all the
    update's episodes runs every row until the last one ends or the length is reached, counted here as the full
    length (an upper bound: rows seldom end within 48 tokens on this task)."""
    return [
        {
            "generation": u["generation_s"], "scoring": u["scoring_s"], "optimisation": u["optimisation_s"],
            "peak_memory_gib": u["peak_rss_gib"], "sampled_positions": EPISODES * RESPONSE,
            "metrics": u["trl_metrics"],
        }  # fmt: skip
        for u in baseline["updates"]
    ]


def add_flops(result: dict, config: Configuration, policy: Architecture, critic: Architecture, peaks: dict) -> None:
    flops = phase_flops(config, policy, critic, result["prompt_width_median"])
    peak = peaks[config.dtype]
    for phase, count in flops.items():
        achieved = count / result["phases"][phase]["median_s"]
        result["phases"][phase].update({"tflop": count / 1e12, "gflop_per_s": achieved / 1e9, "of_peak": achieved / peak})


# -- the report --------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    kit, trl = results["configurations"]["kit"], results["configurations"]["trl112_use_peft"]
    peaks = results["matmul_peak_gflop_per_s"]

    def row(name, get, fmt="{:.2f}", ratio=True):
        a, b = get(kit), get(trl)
        cells = [fmt.format(a), fmt.format(b)]
        cells.append(f"{a / b:.2f}×" if ratio and b else "")
        return f"| {name} | " + " | ".join(cells) + " |"

    q = lambda key: lambda r: r["quality"][key]  # noqa: E731
    lines = [
        "# Benchmark: the kit's default recipe against TRL 1.12's PPOTrainer in its `--use_peft` example configuration",
        "",
        f"Measured by `make bench` on {results['machine']} ({results['date']}). Workload: SmolLM2-135M-Instruct, "
        f"the default sentiment task and proxy reward model, {EPISODES} episodes per update in {MINI_BATCHES} "
        f"mini-batches, {RESPONSE}-token responses, {EPOCHS} PPO epochs, seed 42, {results['updates']} updates "
        f"({results['updates'] * EPISODES} episodes). Timings: min / median over the updates of one run.",
        f"Matmul peak of this machine, measured in the same run: fp32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.0f} GFLOP/s.",
        "",
        f"| | kit ({kit['dtype']}) | TRL 1.12 `--use_peft` ({trl['dtype']}) | kit / TRL |",
        "|---|---|---|---|",
        row("episodes/s", lambda r: r["episodes_per_second"], "{:.3f}"),
        row("seconds per update, min", lambda r: r["seconds_per_update"]["min"], "{:.1f}"),
        row("seconds per update, median", lambda r: r["seconds_per_update"]["median"], "{:.1f}"),
    ]
    for phase in ("generation", "scoring", "optimisation"):
        a, b = kit["phases"][phase], trl["phases"][phase]
        lines.append(f"| – {phase}: s, min / median | {a['min_s']:.1f} / {a['median_s']:.1f} | "
                     f"{b['min_s']:.1f} / {b['median_s']:.1f} | {a['median_s'] / b['median_s']:.2f}× |")
        lines.append(f"| – {phase}: TFLOP; GFLOP/s (share of the dtype's peak) | {a['tflop']:.2f}; "
                     f"{a['gflop_per_s']:.0f} ({a['of_peak']:.0%}) | {b['tflop']:.2f}; {b['gflop_per_s']:.0f} "
                     f"({b['of_peak']:.0%}) | |")
    lines += [
        row("sampled tokens/s", lambda r: r["sampled_tokens_per_second"], "{:.0f}"),
        row("peak memory (resident), GiB", lambda r: r["peak_memory_gib"], "{:.2f}"),
    ]
    for key, name in [
        ("reward/sentiment/mean", "gold reward (VADER) after"),
        ("reference/reward/sentiment/mean", "gold reward (VADER) before (the reference)"),
        ("reward/reward_model/mean", "proxy reward after"),
        ("reference/reward/reward_model/mean", "proxy reward before"),
        ("kl/k1/mean", "KL(policy ‖ reference), nats per sequence"),
        ("perplexity/policy", "perplexity, policy (held-out text)"),
        ("perplexity/reference", "perplexity, reference"),
        ("win_rate/sentiment", "win-rate against the reference, gold"),
    ]:
        if key in kit["quality"] and key in trl["quality"]:
            lines.append(row(name, q(key), "{:.3f}", ratio=False))
    fp32 = results["configurations"].get("kit_fp32")
    if fp32:
        lines += [
            "",
            "## bf16 against fp32, the kit's recipe otherwise unchanged",
            "",
            "| | kit, bf16 | kit, fp32 |",
            "|---|---|---|",
            f"| seconds per update, median | {kit['seconds_per_update']['median']:.1f} | "
            f"{fp32['seconds_per_update']['median']:.1f} |",
            f"| peak memory (resident), GiB | {kit['peak_memory_gib']:.2f} | {fp32['peak_memory_gib']:.2f} |",
        ]
        for key, name in [("objective/scores", "proxy score of the rollouts"), ("objective/kl", "KL of the rollouts")]:
            for label, part in (("first 4 updates", slice(0, 4)), ("last 4 updates", slice(-4, None))):
                a, b = (statistics.mean(r["curve"][key][part]) for r in (kit, fp32))
                lines.append(f"| {name}, mean over the {label} | {a:.3f} | {b:.3f} |")
        for key, name in [("reward/sentiment/mean", "gold reward after (held-out)"), ("kl/k1/mean", "KL after (held-out)")]:
            lines.append(f"| {name} | {kit['quality'][key]:.3f} | {fp32['quality'][key]:.3f} |")
    lines += ["", "How the FLOPs are counted: `bench/ppo_bench.py`, `phase_flops`. Raw figures: `bench/results.json`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--workdir", default="outputs/bench")
    parser.add_argument("--only", choices=[c.name for c in CONFIGURATIONS], nargs="*",
                        help="rerun these configurations; the others' figures are kept from bench/results.json "
                        "when it holds them for the same number of updates")
    args = parser.parse_args()
    if not (KIT_ROOT / REWARD_MODEL / "config.json").is_file():
        sys.exit(f"{REWARD_MODEL} is missing: run `make reward-model` (make bench does)")
    if not TRL112_PYTHON.is_file() and (not args.only or "trl112_use_peft" in args.only):
        sys.exit(f"{TRL112_PYTHON} is missing: run `make trl112-env` (make bench does)")
    workdir = KIT_ROOT / args.workdir
    peaks = {name: matmul_peak(getattr(torch, name)) for name in ("float32", "bfloat16")}
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()), flush=True)
    policy = load_architecture(str(resolve_model_path(POLICY)), "model_name_or_path")[0]
    critic = load_architecture(str(KIT_ROOT / REWARD_MODEL), "reward_model_name_or_path")[0]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        "updates": args.updates,
        "matmul_peak_gflop_per_s": {k: v / 1e9 for k, v in peaks.items()},
        "configurations": {},
    }
    previous = KIT_ROOT / "bench" / "results.json"
    if args.only and previous.is_file():
        kept = json.loads(previous.read_text())
        if kept.get("updates") == args.updates:
            results["configurations"] = {k: v for k, v in kept["configurations"].items() if k not in args.only}
    for config in CONFIGURATIONS:
        if args.only and config.name not in args.only:
            continue
        result = benchmark(config, workdir, args.updates)
        add_flops(result, config, policy, critic, peaks)
        results["configurations"][config.name] = result
        print(json.dumps(result, indent=1), flush=True)
    results["configurations"] = {c.name: results["configurations"][c.name] for c in CONFIGURATIONS
                                 if c.name in results["configurations"]}  # fmt: skip
    out = KIT_ROOT / "bench"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if len(results["configurations"]) == len(CONFIGURATIONS):
        (out / "RESULTS.md").write_text(markdown(results))
        print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
