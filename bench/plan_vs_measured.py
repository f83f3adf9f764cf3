"""Benchmark (not a test): the planner's memory figures against what real CPU runs measure, per phase and per launch.

    python bench/plan_vs_measured.py [--workload smollm2|tiny] [--launches cpu,multi_cpu,fsdp,...] [--updates 3]
                                     [--any_recipe_field value ...]

For each launch config it plans the recipe (recipes/planner.py, on CPU processes) and runs it with
`accelerate launch --config_file configs/accelerate/<launch>.yaml` (two processes and `--mixed_precision no` for the
multi-process configs, as tests/test_launch_configs.py launches them), then compares:
- per phase: the planner's peak of each phase with the largest `memory/<phase>_peak_gib` the run logged over its
  updates (the main process's resident set, its high-water mark reset at each phase's start: recipes/tracking.py);
- per process: the planner's peak per device with the resident high-water mark of each training process, polled
  from /proc every 0.2 s over the whole run (loading and saving included).

Workloads: `smollm2` is configs/smollm2-135m/ppo.yaml (the CPU recipe); `tiny` is configs/tiny/ppo.yaml (the
recipe the launch tests use; its processes are mostly the Python runtime). Without outputs/smollm2-135m/reward_model
a stand-in takes its place: the reward recipe's architecture (SmolLM2's first 15 layers and a one-label score head,
random head, saved in float32 as the trained one is) in the work folder; memory does not depend on the weights.
Other flags go to the recipe, for the plan and the runs alike (e.g. `--num_ppo_epochs 1`: a phase's memory does not
depend on how many epochs run, its time does). A child that only imports what a run imports reports its peak RSS;
the tiny workload on one process shows what a run's process holds besides its models (CPU_RUNTIME_GIB). Rank-0
per-phase figures come from the run's metrics.jsonl; `--report_to none` is passed. A few minutes per launch for the
tiny workload, 10–30 for smollm2 on two shared cores (memory peaks do not depend on the machine's load).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

KIT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(KIT_ROOT))

from recipes.planner import CPU_RUNTIME_GIB, GIB, PlanRequest, plan_recipe

WORKLOADS = {"smollm2": "configs/smollm2-135m/ppo.yaml", "tiny": "configs/tiny/ppo.yaml"}
LAUNCHES = ["cpu", "multi_cpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
KIT_REWARD_MODEL = KIT_ROOT / "outputs" / "smollm2-135m" / "reward_model"
REWARD_RECIPE = KIT_ROOT / "configs" / "smollm2-135m" / "reward.yaml"
# The child reports its own peak RSS (bytes) from /proc: getrusage's ru_maxrss would carry this process's peak
# over (Linux keeps it across fork and exec).
IMPORTS_OF_A_RUN = (
    "import pathlib, recipes.run, recipes.rewards.sources, torch.distributed; "
    "print(next(int(line.split()[1]) * 1024 for line in pathlib.Path('/proc/self/status').read_text().splitlines() "
    "if line.startswith('VmHWM:')))"
)
POLL_SECONDS = 0.2


def stand_in_reward_model(folder: Path) -> Path:
    """The default reward model's architecture as configs/smollm2-135m/reward.yaml makes it (its base model's first
    `num_hidden_layers` layers, a one-label score head, its dtype, the kit's pad token), saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForSequenceClassification

    from recipes.config import ModelArguments
    from recipes.model_cache import resolve_model_path
    from recipes.models import load_tokenizer

    settings = yaml.safe_load(REWARD_RECIPE.read_text())
    base = settings["model_name_or_path"]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=base))
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(base), num_labels=1, num_hidden_layers=settings["num_hidden_layers"],
        dtype=getattr(torch, settings["dtype"]),
    )  # fmt: skip
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ProcessPeaks:
    """Polls the resident high-water mark (VmHWM) of every process below `root` running `script`: {pid: (rank,
    bytes)}. The runs reset it at each phase's start, so the largest value polled is the run's peak, short of a peak
    reached less than POLL_SECONDS before a reset."""

    def __init__(self, root: int, script: str):
        self.root, self.script = root, script
        self.peaks: dict[int, tuple[int, int]] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def stop(self) -> dict[int, int]:
        """{rank: peak bytes}."""
        self.done.set()
        self.thread.join()
        return {rank: peak for rank, peak in sorted(self.peaks.values())}

    def _poll(self) -> None:
        while not self.done.wait(POLL_SECONDS):
            for pid in descendants(self.root):
                try:
                    if self.script not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue  # the process ended between listing and reading
                hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
                rank = next((int(entry[5:]) for entry in environ if entry.startswith(b"RANK=")), 0)
                self.peaks[pid] = (rank, max(hwm, self.peaks.get(pid, (rank, 0))[1]))


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_baseline() -> int:
    result = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_RUN], cwd=KIT_ROOT, capture_output=True, text=True,
                            check=True)  # fmt: skip
    return int(result.stdout.split()[-1])


def launch_command(launch: str, processes: int) -> list[str]:
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               f"configs/accelerate/{launch}.yaml"]  # fmt: skip
    if processes > 1:
        port = str(free_port())
        command += ["--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", port]
    return command


def measure(launch: str, processes: int, recipe_flags: list[str], log: Path) -> tuple[dict[int, int], list[dict]]:
    """Runs the recipe under `launch`; returns ({rank: peak RSS}, the metrics.jsonl rows)."""
    output_dir = Path(recipe_flags[recipe_flags.index("--output_dir") + 1])
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # as the launch tests run: one thread per process on a shared machine
    command = [*launch_command(launch, processes), "scripts/ppo.py", *recipe_flags]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=KIT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        peaks = ProcessPeaks(process.pid, "scripts/ppo.py")
        code = process.wait()
        by_rank = peaks.stop()
    if code != 0:
        sys.exit(f"{launch}: exit {code}; see {log}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return by_rank, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="smollm2")
    parser.add_argument("--launches", default=",".join(LAUNCHES), help=f"comma-separated, of {', '.join(LAUNCHES)}")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run")
    parser.add_argument("--workdir", default="/tmp/plan_vs_measured")
    args, extra_flags = parser.parse_known_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = WORKLOADS[args.workload]
    settings = yaml.safe_load((KIT_ROOT / recipe).read_text())
    per_process = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)

    flags = ["--config", recipe, "--eval_every_updates", "0", "--report_to", "none", "--save_strategy", "no",
             *extra_flags]  # fmt: skip
    if args.workload == "smollm2":
        reward = KIT_REWARD_MODEL if (KIT_REWARD_MODEL / "config.json").is_file() else None
        flags += ["--reward_model_name_or_path", str(reward or stand_in_reward_model(workdir / "reward_model"))]
    baseline = import_baseline()
    print(f"workload: {recipe} {' '.join(flags[2:])}, {args.updates} updates")
    print(f"process after imports (import-only child): {baseline / GIB:.2f} GiB; planner's CPU_RUNTIME_GIB: "
          f"{CPU_RUNTIME_GIB:.2f}\n")  # fmt: skip

    rows = []
    for launch in args.launches.split(","):
        processes = 1 if launch == "cpu" else 2
        run_flags = [*flags, "--total_episodes", str(args.updates * per_process * processes),
                     "--output_dir", str(workdir / f"{args.workload}-{launch}-{int(time.time())}")]  # fmt: skip
        request = PlanRequest(run_flags, None, f"configs/accelerate/{launch}.yaml", processes, device="cpu")
        plan, _ = plan_recipe(request)
        started = time.monotonic()
        by_rank, metrics = measure(launch, processes, run_flags, workdir / f"{args.workload}-{launch}.log")
        minutes = (time.monotonic() - started) / 60
        print(f"== {launch}.yaml: {plan.parallel.describe()} ({minutes:.0f} min)")
        header = f"  {'phase':<14} {'planned':>9} {'measured':>9} {'planned/measured':>17}"
        print(f"{header}   (rank 0, largest over the updates)")
        for phase in plan.phases:
            logged = [row[f"memory/{phase}_peak_gib"] for row in metrics if f"memory/{phase}_peak_gib" in row]
            if not logged:
                continue
            planned, measured = plan.phase_bytes(phase) / GIB, max(logged)
            print(f"  {phase:<14} {planned:>9.2f} {measured:>9.2f} {planned / measured:>17.2f}")
            rows.append((launch, phase, planned, measured))
        planned = plan.peak_bytes / GIB
        if args.workload == "tiny" and launch == "cpu":
            runtime = by_rank[0] / GIB - (planned - CPU_RUNTIME_GIB)
            print(f"  what the process holds besides the planner's model terms: {runtime:.2f} GiB (CPU_RUNTIME_GIB)")
        for rank, peak in by_rank.items():
            print(f"  {f'process {rank}':<14} {planned:>9.2f} {peak / GIB:>9.2f} {planned * GIB / peak:>17.2f}"
                  "   (whole run, loading included)")  # fmt: skip
            rows.append((launch, f"process {rank}", planned, peak / GIB))
        print()
    worst = max(rows, key=lambda row: abs(row[2] / row[3] - 1))
    print(f"largest gap: {worst[0]} {worst[1]}: planned {worst[2]:.2f} GiB, measured {worst[3]:.2f} GiB "
          f"({worst[2] / worst[3] - 1:+.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
