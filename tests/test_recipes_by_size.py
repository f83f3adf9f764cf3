"""The recipes by model size and the launch configs, as a user meets them: every recipe file parses strictly, says its
command and batch arithmetic, names hub datasets by columns and splits they have, fits its declared hardware by the
planner; every command in a recipe README names files that exist and parses; every accelerate config loads with
accelerate's own loader; the SLURM launcher starts one correct `accelerate launch` per node; and the CPU launch config
really runs the tiny recipe on two processes."""

import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser

from recipes.config import parse_recipe
from recipes.evaluation import parse_eval_config
from recipes.ppo.checkpoint import complete_checkpoints, read_progress
from recipes.planner import GIB, PlanRequest, load_hardware, parallelism_from_accelerate, plan_recipe
from recipes.tiny_models import build_tiny_models
from tests.conftest import free_port
from reward_models.config import parse_reward_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
ACCELERATE_CONFIGS = sorted((CONFIGS / "accelerate").glob("*.yaml"))
RECIPE_FOLDERS = sorted({p.parent for p in CONFIGS.glob("*/ppo*.yaml")})
SIZE_FOLDERS = [folder for folder in RECIPE_FOLDERS if (folder / "README.md").is_file()]
PPO_RECIPES = sorted(CONFIGS.glob("*/ppo*.yaml"))
GPU_RECIPES = [p for p in PPO_RECIPES if (h := load_hardware(str(p))) is not None and h.device == "gpu"]
DECLARED_RECIPES = [p for p in PPO_RECIPES if load_hardware(str(p)) is not None]
SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "ppo_multinode.sbatch"

# The hub datasets the recipes name, as their dataset cards describe them (checked here without the hub): splits,
# plain-text columns and chat-message columns.
HUB_DATASETS = {
    "HuggingFaceH4/ultrafeedback_binarized": {
        "splits": {"train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen"},
        "text": {"prompt", "prompt_id"},
        "chat": {"chosen", "rejected", "messages"},
    },
    "trl-lib/ultrafeedback_binarized": {"splits": {"train", "test"}, "text": set(), "chat": {"chosen", "rejected"}},
}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def recipe_id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def plan_script():
    spec = importlib.util.spec_from_file_location("plan_script", REPO_ROOT / "scripts" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def header(path: Path) -> str:
    """The comment lines a file starts with, '#' removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Launch configs


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads_and_says_how_to_launch(config):
    loaded = load_config_from_file(str(config))
    assert isinstance(loaded, ClusterConfig)
    text = header(config)
    assert f"accelerate launch --config_file {rel(config)}" in text, "the header must give the launch command"
    # Every DeepSpeed/FSDP key must be one `accelerate launch` reads (it silently ignores others).
    options = {option for action in launch_command_parser()._actions for option in action.option_strings}
    for key in {**(loaded.deepspeed_config or {}), **(loaded.fsdp_config or {})}:
        assert f"--{key}" in options, f"{config.name}: {key} is not an accelerate launch option"
    if loaded.num_machines > 1:
        for placeholder in ("machine_rank", "main_process_ip", "main_process_port", "num_machines"):
            assert placeholder in text, f"{config.name}: document the placeholder {placeholder}"


def test_multi_cpu_config_starts_two_cpu_processes():
    parallel = parallelism_from_accelerate("configs/accelerate/multi_cpu.yaml")
    assert (parallel.processes, parallel.device) == (2, "cpu")


# ------------------------------------------------------------------------------------------------------------------
# Recipe files


@pytest.mark.parametrize("recipe", PPO_RECIPES, ids=recipe_id)
def test_ppo_recipe_parses_and_states_its_command_and_batches(recipe):
    parsed = parse_recipe(["--config", str(recipe)])
    text = header(recipe)
    assert f"scripts/ppo.py --config {rel(recipe)}" in text
    batches = re.search(r"Batches: (\d+) per device × (\d+) accumulation × (\d+) (?:GPUs?|process(?:es)?) = "
                        r"([\d,]+) episodes per update", text)  # fmt: skip
    assert batches, "the header must show the batch arithmetic"
    per_device, accumulation, processes, episodes = (int(g.replace(",", "")) for g in batches.groups())
    training = parsed.training
    assert (per_device, accumulation) == (training.per_device_train_batch_size, training.gradient_accumulation_steps)
    assert episodes == per_device * accumulation * processes
    hardware = load_hardware(str(recipe))
    if hardware is not None:
        assert processes == parallelism_from_accelerate(hardware.accelerate_config).processes
    updates = re.search(r"([\d,]+) episodes → ([\d,]+) updates", text)
    if updates and training.total_episodes:
        total, count = (int(g.replace(",", "")) for g in updates.groups())
        assert total == training.total_episodes and count == math.ceil(total / episodes)


@pytest.mark.parametrize("folder", RECIPE_FOLDERS, ids=lambda p: p.name)
def test_reward_and_eval_recipes_parse(folder):
    if (folder / "reward.yaml").is_file():
        parse_reward_recipe(["--config", str(folder / "reward.yaml")])
        assert f"scripts/train_reward.py --config {rel(folder / 'reward.yaml')}" in header(folder / "reward.yaml")
    if (folder / "eval.yaml").is_file():
        parse_eval_config(["--config", str(folder / "eval.yaml")])
        assert f"scripts/evaluate.py --config {rel(folder / 'eval.yaml')}" in header(folder / "eval.yaml")


@pytest.mark.parametrize("folder", SIZE_FOLDERS, ids=lambda p: p.name)
def test_size_folder_is_complete_and_consistent(folder):
    for name in ("reward.yaml", "eval.yaml", "hardware.yaml", "README.md"):
        assert (folder / name).is_file(), f"{folder.name} has no {name}"
    ppo_files = {p.name for p in folder.glob("ppo*.yaml")}
    assert set(yaml.safe_load((folder / "hardware.yaml").read_text())) == ppo_files
    reward = parse_reward_recipe(["--config", str(folder / "reward.yaml")])
    evaluation_data, evaluation, _ = parse_eval_config(["--config", str(folder / "eval.yaml")])
    for name in sorted(ppo_files):
        recipe = parse_recipe(["--config", str(folder / name)])
        # PPO trains against the reward model this folder's reward.yaml makes, and eval.yaml judges with it.
        assert recipe.model.reward_model_name_or_path == reward.training.output_dir
        assert evaluation.reward_models == [reward.training.output_dir]
        assert recipe.data.dataset_name == evaluation_data.dataset_name
        assert recipe.data.dataset_test_split == evaluation_data.dataset_test_split


@pytest.mark.parametrize("folder", RECIPE_FOLDERS, ids=lambda p: p.name)
def test_hub_datasets_are_named_by_columns_and_splits_they_have(folder):
    for path in folder.glob("*.yaml"):
        settings = yaml.safe_load(path.read_text())
        name = settings.get("dataset_name") if isinstance(settings, dict) else None
        if name is None or Path(name).exists() or name.startswith(("data/", "outputs/")):
            continue
        assert name in HUB_DATASETS, f"{path.name}: add {name}'s splits and columns to HUB_DATASETS"
        card = HUB_DATASETS[name]
        for key in ("dataset_train_split", "dataset_test_split"):
            assert settings.get(key, key.split("_")[1]) in card["splits"], f"{path.name}: {key}"
        if path.name == "reward.yaml":
            # The reward trainer reads `chosen`/`rejected` conversations, and a `prompt` column only as chat turns.
            assert {"chosen", "rejected"} <= card["chat"] and "prompt" not in card["text"]
        else:
            assert settings.get("prompt_column", "prompt") in card["text"] | card["chat"], f"{path.name}: prompt_column"


# ------------------------------------------------------------------------------------------------------------------
# The planner on every recipe


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=recipe_id)
def test_gpu_recipe_fits_its_declared_hardware(recipe):
    plan, fit = plan_recipe(PlanRequest(["--config", str(recipe)], load_hardware(str(recipe)), None))
    assert fit.fits, fit.describe()
    assert not [note for note in plan.notes if "processes" in note], plan.notes
    # The recipe folder's README quotes the planner's figure.
    readme = (recipe.parent / "README.md").read_text()
    assert f"**{plan.peak_bytes / GIB:.1f} GiB**" in readme, f"README.md should quote {plan.peak_bytes / GIB:.1f} GiB"


@pytest.mark.parametrize("recipe", [p for p in DECLARED_RECIPES if p not in GPU_RECIPES], ids=recipe_id)
def test_cpu_recipe_fits_its_declared_hardware(recipe):
    _, fit = plan_recipe(PlanRequest(["--config", str(recipe)], load_hardware(str(recipe)), None))
    assert fit.fits, fit.describe()


# ------------------------------------------------------------------------------------------------------------------
# README commands


def readme_commands(readme: Path) -> list[str]:
    """Every command in the README's fenced code blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", readme.read_text(), flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def check_script_arguments(script: str, args: list[str]) -> None:
    """The script exists and its own parser accepts the arguments (a --config must name an existing file)."""
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    if "--config" in args:
        assert (REPO_ROOT / args[args.index("--config") + 1]).is_file(), f"{script}: --config file missing"
    if script == "scripts/ppo.py":
        parse_recipe(args)
    elif script in ("scripts/train_reward.py", "scripts/build_preferences.py"):
        parse_reward_recipe(args)
    elif script == "scripts/evaluate.py":
        parse_eval_config(args)
    elif script == "scripts/plan.py":
        assert plan_script().main(args) == 0, f"scripts/plan.py {' '.join(args)}: the recipe does not fit"
    else:
        pytest.fail(f"no parser known for {script}: teach check_script_arguments about it")


def check_sbatch_options(options: list[str]) -> None:
    """sbatch options before the script: a changed preemption lead (`--signal=B:TERM@N`) comes with torchrun's
    shutdown timeout of N seconds; a launch config passed through --export exists."""
    values = dict(option.removeprefix("--").split("=", 1) for option in options if "=" in option)
    exported = dict(item.split("=", 1) for item in values.get("export", "").split(",") if "=" in item)
    if "signal" in values:
        lead = re.fullmatch(r"B:TERM@(\d+)", values["signal"])
        assert lead, f"--signal={values['signal']}: the script traps SIGTERM in the batch shell (B:TERM@seconds)"
        assert exported.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") == lead.group(1), "torchrun must wait the whole lead"
    if "ACCELERATE_CONFIG" in exported:
        assert (REPO_ROOT / exported["ACCELERATE_CONFIG"]).is_file(), f"{exported['ACCELERATE_CONFIG']} does not exist"


def check_command(command: str) -> None:
    words = shlex.split(command)
    if words[:1] == ["python"]:
        check_script_arguments(words[1], words[2:])
    elif words[:2] == ["accelerate", "launch"]:
        launch = launch_command_parser().parse_args(words[2:])
        assert launch.config_file, "name the launch config (--config_file)"
        assert (REPO_ROOT / launch.config_file).is_file(), f"{launch.config_file} does not exist"
        load_config_from_file(str(REPO_ROOT / launch.config_file))
        check_script_arguments(launch.training_script, launch.training_script_args)
    elif words[:1] == ["sbatch"]:
        script_index = next(i for i, word in enumerate(words) if word.endswith(".sbatch"))
        assert (REPO_ROOT / words[script_index]).is_file(), f"{words[script_index]} does not exist"
        check_sbatch_options(words[1:script_index])
        recipe, *flags = words[script_index + 1 :]
        check_script_arguments("scripts/ppo.py", ["--config", recipe, *flags])
    else:
        pytest.fail(f"unknown kind of command: {command}")


@pytest.mark.parametrize("folder", SIZE_FOLDERS, ids=lambda p: p.name)
def test_readme_commands_name_existing_files_and_parse(folder):
    commands = readme_commands(folder / "README.md")
    assert commands, "the README must give its commands in fenced code blocks"
    for command in commands:
        check_command(command)
    # In order: the reward model is trained before PPO uses it.
    joined = "\n".join(commands)
    assert joined.index("scripts/train_reward.py") < joined.index("scripts/ppo.py")


# ------------------------------------------------------------------------------------------------------------------
# SLURM


def write_stand_ins(bin_dir: Path, bodies: dict[str, str]) -> None:
    """Executable bash scripts named after the SLURM commands they stand in for."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def sbatch_directives(script: Path) -> dict[str, str]:
    """The script's `#SBATCH --key=value` lines (value '' for a bare flag)."""
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script.read_text(), flags=re.M)
    return {key: value for key, value in found}


def test_slurm_script_starts_one_launcher_per_node(tmp_path):
    """With stand-ins for srun (runs the command once per node with SLURM_NODEID set), scontrol and accelerate (records
    its arguments): each node gets its rank, the first node's address, the node count and the total process count;
    torchrun may wait the whole lead time for a checkpoint; a run that ends by itself is not requeued."""
    bin_dir = tmp_path / "bin"
    write_stand_ins(bin_dir, {
        "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "gpu-07\\ngpu-08\\ngpu-09\\n" '
                    '|| echo "$*" >> "$SCONTROL_LOG"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@"; done',
        "accelerate": 'printf "%s\\n" "$*" >> "$LAUNCH_LOG"; echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >> "$TIMEOUT_LOG"',
    })  # fmt: skip
    log, timeouts, scontrol = tmp_path / "launches.log", tmp_path / "timeouts.log", tmp_path / "scontrol.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LAUNCH_LOG": str(log), "SLURM_NNODES": "3",
           "SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "TIMEOUT_LOG": str(timeouts),
           "SCONTROL_LOG": str(scontrol), "SLURM_JOB_ID": "4242"}  # fmt: skip
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    recipe = "configs/qwen2.5-72b/ppo_multinode.yaml"
    result = subprocess.run(["bash", str(SLURM_SCRIPT), recipe, "--learning_rate", "2e-5"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    launches = log.read_text().splitlines()
    assert len(launches) == 3
    for node, line in enumerate(launches):
        words = shlex.split(line)
        assert words[0] == "launch"
        launch = launch_command_parser().parse_args(words[1:])
        assert (launch.machine_rank, launch.num_machines, launch.num_processes) == (node, 3, 24)
        assert (launch.main_process_ip, launch.main_process_port) == ("gpu-07", 29500)
        assert launch.config_file == "configs/accelerate/multi_node_zero3.yaml"
        assert launch.training_script == "scripts/ppo.py"
        assert launch.training_script_args == ["--config", recipe, "--learning_rate", "2e-5"]
        parse_recipe(launch.training_script_args)

    directives = sbatch_directives(SLURM_SCRIPT)
    # SIGTERM to the batch shell alone (B:), which passes it on; the lead time in seconds before the time limit.
    signal_spec = re.fullmatch(r"B:TERM@(\d+)", directives["signal"])
    assert signal_spec, directives["signal"]
    lead = int(signal_spec.group(1))
    assert "requeue" in directives and directives["open-mode"] == "append"
    # torchrun waits for its workers as long as the lead time before it kills them (its default is 30 s).
    assert timeouts.read_text().split() == [str(lead)] * 3
    assert not scontrol.exists(), "a run that ended by itself was requeued"


# A stand-in sbatch: runs the script at once, as SLURM would on the allocation (--nodes, --export), and records the
# --signal it was asked for.
SBATCH_STAND_IN = r"""
export PATH="$(dirname "$0"):$PATH"
nodes=1; signal=""; exports=()
while [[ "$1" == --* ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2;;
    --nodes=*) nodes=${1#--nodes=}; shift;;
    --signal=*) signal=${1#--signal=}; shift;;
    --export=*) IFS=, read -ra exports <<< "${1#--export=}"; shift;;
    *) echo "stand-in sbatch: unknown option $1" >&2; exit 2;;
  esac
done
echo "$signal" >> "$SIGNAL_LOG"
for item in "${exports[@]}"; do [[ "$item" == *=* ]] && export "$item"; done
SLURM_NNODES=$nodes SLURM_JOB_NODELIST="gpu-[01-0$nodes]" SLURM_JOB_ID=4242 exec bash "$@"
"""


def test_docs_slurm_preemption_commands(tmp_path):
    """docs/cluster.md, "SLURM preemption": each documented sbatch command, run through the stand-in sbatch with the
    stand-ins of srun, scontrol and accelerate: one launch per node, and each launcher's torchrun waits as long as the
    lead time SLURM is asked for (the script's own, or the one given on the command line)."""
    from test_hub import documented_commands, run_documented

    commands = documented_commands("SLURM preemption")
    assert len(commands) == 2 and all(command.startswith("sbatch ") for command in commands)
    bin_dir = tmp_path / "bin"
    write_stand_ins(bin_dir, {
        "sbatch": SBATCH_STAND_IN,
        "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "gpu-01\\ngpu-02\\n" || echo "$*" >> "$SCONTROL_LOG"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@"; done',
        "accelerate": 'printf "%s\\n" "$*" >> "$LAUNCH_LOG"; echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >> "$TIMEOUT_LOG"',
    })  # fmt: skip
    logs = {name: tmp_path / f"{name}.log" for name in ("launch", "timeout", "signal", "scontrol")}
    env = {key: value for key, value in os.environ.items() if key != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO_ROOT),
                "LAUNCH_LOG": str(logs["launch"]), "TIMEOUT_LOG": str(logs["timeout"]),
                "SIGNAL_LOG": str(logs["signal"]), "SCONTROL_LOG": str(logs["scontrol"])})  # fmt: skip
    run_documented("SLURM preemption", env, stand_ins={}, ppo_flags=[])
    default_lead = sbatch_directives(SLURM_SCRIPT)["signal"].removeprefix("B:TERM@")
    leads = [signal.removeprefix("B:TERM@") or default_lead for signal in logs["signal"].read_text().splitlines()]
    assert leads == [default_lead, "900"]
    lines = logs["launch"].read_text().splitlines()
    launches = [launch_command_parser().parse_args(shlex.split(line)[1:]) for line in lines]
    assert [(launch.machine_rank, launch.num_machines) for launch in launches] == [(0, 2), (1, 2)] * 2
    for launch in launches:
        parse_recipe(launch.training_script_args)
    assert logs["timeout"].read_text().split() == [leads[0]] * 2 + [leads[1]] * 2
    assert not logs["scontrol"].exists()


# The stand-ins of the preemption test. srun starts each node's task in a process group of its own and, once the tasks
# have exited, kills what is left of the step (as slurmstepd does); scancel --signal signals every process of the step.
PREEMPTION_STAND_INS = {
    "scontrol": '[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1 || echo "$*" >> "$SCONTROL_LOG"',
    "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
            'for ((node = 0; node < SLURM_NNODES; node++)); do\n'
            '  SLURM_NODEID=$node setsid "$@" & echo $! >> "$STEP_PIDS"\n'
            'done\n'
            'wait; status=$?\n'
            'for pid in $(cat "$STEP_PIDS"); do kill -KILL -- -$pid 2>/dev/null; done; exit $status',
    "scancel": 'echo "$*" >> "$SCANCEL_LOG"; for pid in $(cat "$STEP_PIDS"); do kill -TERM -- -$pid; done',
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch_config, processes",
    [("configs/accelerate/multi_cpu.yaml", 2), ("configs/accelerate/cpu.yaml", 1)],
    ids=["torchrun-2-processes", "one-process"],
)
def test_slurm_preemption_checkpoints_requeues_and_the_rerun_resumes(launch_config, processes, tmp_path):
    """The sbatch script on this machine, around a real `accelerate launch` of the tiny recipe (no periodic
    checkpoints): SIGTERM to the batch shell, as `--signal=B:TERM@...` sends it, reaches the kit's handler in every
    process (through scancel, and torchrun when there are two); the run checkpoints, the script requeues the job and
    exits 0; the requeued job (the same script again) resumes from that checkpoint and finishes."""
    models = build_tiny_models(tmp_path / "models")
    prompts = tmp_path / "prompts.jsonl"
    subjects = ["movie", "book", "concert", "train ride", "dinner", "museum", "hike", "game", "album", "play"]
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the {s}."}) + "\n" for s in subjects * 2))
    output_dir = tmp_path / "run"
    updates = 8
    bin_dir = tmp_path / "bin"
    write_stand_ins(bin_dir, PREEMPTION_STAND_INS)
    logs = {name: tmp_path / f"{name}.log" for name in ("scontrol", "scancel", "step_pids")}
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO_ROOT), "GPUS_PER_NODE": str(processes), "ACCELERATE_CONFIG": launch_config,
           "MAIN_PORT": str(free_port()), "SCONTROL_LOG": str(logs["scontrol"]),
           "SCANCEL_LOG": str(logs["scancel"]), "STEP_PIDS": str(logs["step_pids"]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", None)
    command = [
        "bash", str(SLURM_SCRIPT), "configs/tiny/ppo.yaml",
        "--model_name_or_path", str(models["policy"]), "--reward_model_name_or_path", str(models["reward"]),
        "--dataset_name", str(prompts), "--output_dir", str(output_dir),
        "--total_episodes", str(4 * processes * updates), "--save_strategy", "no",
    ]  # fmt: skip
    job = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert job.poll() is None, job.stdout.read()[-5000:]
        assert time.time() < deadline, "no update logged in time"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-5000:]
    assert "preempted: checkpoint written" in output
    assert logs["scancel"].read_text().split() == ["--signal=TERM", "4242"]
    assert logs["scontrol"].read_text().split() == ["requeue", "4242"]
    checkpoints = complete_checkpoints(output_dir)
    assert len(checkpoints) == 1
    stopped_at = read_progress(checkpoints[0])["update"]
    assert 1 <= stopped_at < updates
    assert not (output_dir / "adapter_config.json").exists()

    logs["step_pids"].unlink()
    requeued = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert requeued.returncode == 0, requeued.stderr[-5000:]
    assert f"resuming after update {stopped_at}" in requeued.stdout + requeued.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert steps == list(range(1, updates + 1))
    assert (output_dir / "adapter_config.json").is_file()
    assert logs["scontrol"].read_text().split() == ["requeue", "4242"], "the finished run was requeued again"

