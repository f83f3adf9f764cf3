"""Where models and prompt datasets named by hub id come from (recipes/hub.py), under the settings clusters use:
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE with a filled HF cache, HF_ENDPOINT (a mirror), HTTPS_PROXY, and the kit's
offline copy of SmolLM2 (RECIPES_OFFLINE_COPY).

huggingface_hub and datasets read these variables when they are imported, as they do for users, so each case runs
in a fresh Python process. Nothing leaves 127.0.0.1: the hub is a FakeHub (tests/local_servers.py) or a closed
local port, and every process runs with HTTP(S)_PROXY set to a closed local port (NO_PROXY=127.0.0.1), so a request
to anywhere else fails at once instead of going out. The HF caches are built in temporary folders: by hand, in the
layout huggingface_hub writes, or by `datasets` itself.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import PROMPTS, free_port
from local_servers import FakeHub, RecordingProxy
from wandb_records import history_rows, read_wandb_records

from recipes import REPO_ROOT
from recipes.model_cache import MARKER_FILE

pytestmark = pytest.mark.slow  # every case starts Python processes (the location cases take about a second each)

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
ULTRAFEEDBACK = "HuggingFaceH4/ultrafeedback_binarized"
DOCS = REPO_ROOT / "docs" / "cluster.md"

# Prints where a model comes from (the kit's own line), then `path: <what from_pretrained gets>`; a RecipeError
# becomes the scripts' one `error:` line (run_cli).
LOCATE_MODEL = """
import sys
from recipes.errors import run_cli
from recipes.hub import locate_model
sys.exit(run_cli(lambda: print("path:", locate_model(sys.argv[1], "model_name_or_path"))))
"""

# Loads prompts as a PPO run does (recipes.data.load_raw_prompts) and prints each split's prompts, sorted. The
# arguments: the dataset id, then optionally the DataArguments fields as JSON.
LOAD_PROMPTS = """
import json, sys
from recipes.config import DataArguments
from recipes.data import load_raw_prompts
from recipes.errors import run_cli

def main():
    fields = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    splits = load_raw_prompts(DataArguments(dataset_name=sys.argv[1], **fields), seed=0)
    print(json.dumps({name: sorted(split["prompt"]) for name, split in splits.items()}))

sys.exit(run_cli(main))
"""


def hub_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a process under test: this one's without any HF_*, proxy, W&B or RECIPES_* setting, an
    empty HF_HOME, no offline copies (RECIPES_MODEL_CACHE empty), proxies at a closed local port; then `settings`."""
    dropped = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE", "RECIPES_", "WANDB_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and not k.lower().endswith("_proxy")}
    closed = f"http://127.0.0.1:{free_port()}"
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        RECIPES_MODEL_CACHE=str(tmp_path / "no_offline_copies"),
        HTTP_PROXY=closed,
        HTTPS_PROXY=closed,
        NO_PROXY="127.0.0.1,localhost",
        TRL_EXPERIMENTAL_SILENCE="1",
    )
    env.update(settings)
    return env


def run(program: str, args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def located(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()[-1].removeprefix("path: ")


def add_to_hf_cache(hf_home: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Puts `folder`'s files in the HF cache as huggingface_hub lays out a download: blobs named by their hash, one
    snapshot of links to them for the commit that `refs/main` names. Returns the snapshot folder."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = FakeHub.commit(repo_id)
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        content = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def fake_offline_copy(root: Path) -> Path:
    """A prepared offline copy of SmolLM2 as recipes/model_cache.py leaves one (a folder with its marker file); only
    its path is compared, it is never loaded."""
    folder = root / SMOL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER_FILE).write_text(json.dumps({"hub_id": SMOL}))
    return folder


def prompt_folder(folder: Path) -> Path:
    """A small prompt dataset as a hub repository holds one: train.jsonl and test.jsonl."""
    folder.mkdir(parents=True)
    for split, prompts in (("train", PROMPTS[:9]), ("test", PROMPTS[9:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return folder


# --- Models -------------------------------------------------------------------------------------------------------


def test_hub_model_comes_from_a_filled_hf_cache_under_hf_hub_offline(tiny_models, tmp_path):
    snapshot = add_to_hf_cache(tmp_path / "hf_home", "kit-tests/tiny-policy", tiny_models["policy"])
    result = run(LOCATE_MODEL, ["kit-tests/tiny-policy"], hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert located(result) == str(snapshot)
    assert f"model_name_or_path: kit-tests/tiny-policy from the HF cache at {snapshot} (HF_HUB_OFFLINE is set)" in (
        result.stdout
    )


def test_the_hf_cache_comes_before_the_offline_copy(tiny_models, tmp_path):
    snapshot = add_to_hf_cache(tmp_path / "hf_home", SMOL, tiny_models["policy"])
    fake_offline_copy(tmp_path / "copies")
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", RECIPES_MODEL_CACHE=str(tmp_path / "copies"))
    assert located(run(LOCATE_MODEL, [SMOL], env)) == str(snapshot)


def test_hub_model_is_not_replaced_by_the_offline_copy_when_the_hub_answers(tiny_models, tmp_path):
    """HF_ENDPOINT names the hub the kit asks (here a FakeHub): it answers, so the recipe's hub id goes to
    transformers unchanged, although an offline copy is prepared; RECIPES_OFFLINE_COPY=1 chooses the copy."""
    copy = fake_offline_copy(tmp_path / "copies")
    with FakeHub(models={SMOL: tiny_models["policy"]}) as hub:
        env = hub_env(tmp_path, HF_ENDPOINT=hub.url, RECIPES_MODEL_CACHE=str(tmp_path / "copies"))
        result = run(LOCATE_MODEL, [SMOL], env)
        assert located(result) == SMOL
        assert f"model_name_or_path: {SMOL} from the hub at {hub.url}\n" in result.stdout
        assert hub.requests == [("HEAD", "/")]  # asked once, and this endpoint, not huggingface.co

        hub.requests.clear()
        result = run(LOCATE_MODEL, [SMOL], {**env, "RECIPES_OFFLINE_COPY": "1"})
        assert located(result) == str(copy)
        assert f"from the kit's offline copy at {copy} (RECIPES_OFFLINE_COPY=1;" in result.stdout
        assert hub.requests == []


def test_offline_copy_when_the_hub_does_not_answer_and_the_cache_lacks_the_model(tmp_path):
    copy = fake_offline_copy(tmp_path / "copies")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = hub_env(tmp_path, HF_ENDPOINT=endpoint, RECIPES_MODEL_CACHE=str(tmp_path / "copies"))
    started = time.monotonic()
    result = run(LOCATE_MODEL, [SMOL], env)
    assert located(result) == str(copy)
    assert f"from the kit's offline copy at {copy} (the hub at {endpoint} does not answer and the HF cache " in (
        result.stdout
    )
    assert time.monotonic() - started < 60  # one short probe, no retries (the process itself takes a few seconds)

    # RECIPES_OFFLINE_COPY=0: the copy is never used, and the run stops with one line saying what to do.
    result = run(LOCATE_MODEL, [SMOL], {**env, "RECIPES_OFFLINE_COPY": "0"})
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: model_name_or_path: '{SMOL}' is not in the HF cache (")
    assert f"the hub at {endpoint} does not answer; fill the cache with `hf download {SMOL}`" in line
    assert "Traceback" not in result.stderr


def test_unknown_hub_model_under_hf_hub_offline_fails_with_one_line(tmp_path):
    result = run(LOCATE_MODEL, ["kit-tests/not-cached"], hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model_name_or_path: 'kit-tests/not-cached' is not in the HF cache ({tmp_path / 'hf_home' / 'hub'}) "
        "and HF_HUB_OFFLINE is set; fill the cache with `hf download kit-tests/not-cached` where the hub is "
        "reachable (same HF_HOME), or name a local folder"
    )


def test_hub_probe_goes_through_the_proxy(tmp_path):
    """With HTTPS_PROXY set, the kit asks the hub through that proxy (huggingface_hub's session), as the hub clients
    then download through it. This proxy cannot reach the hub (502), so the offline copy is used."""
    copy = fake_offline_copy(tmp_path / "copies")
    with RecordingProxy() as proxy:
        env = hub_env(tmp_path, HTTPS_PROXY=proxy.url, NO_PROXY="", RECIPES_MODEL_CACHE=str(tmp_path / "copies"))
        result = run(LOCATE_MODEL, [SMOL], env)
    assert located(result) == str(copy)
    assert proxy.request_lines == ["CONNECT huggingface.co:443 HTTP/1.1"]


# --- Datasets -----------------------------------------------------------------------------------------------------


def test_hub_dataset_comes_from_the_hf_cache_under_hf_hub_offline(tmp_path):
    """The dataset repository's files in the HF cache, as `hf download --repo-type dataset` leaves them."""
    source = prompt_folder(tmp_path / "source")
    snapshot = add_to_hf_cache(tmp_path / "hf_home", "kit-tests/prompts", source, repo_type="dataset")
    result = run(LOAD_PROMPTS, ["kit-tests/prompts"], hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    splits = json.loads(result.stdout.splitlines()[-1])
    assert splits == {"train": sorted(PROMPTS[:9]), "eval": sorted(PROMPTS[9:])}
    assert f"dataset_name: kit-tests/prompts from the HF cache at {snapshot} (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE " \
           "is set)" in result.stdout  # fmt: skip


def test_hub_dataset_comes_from_datasets_own_cache_under_hf_datasets_offline(tmp_path):
    """`datasets`' prepared copy of a dataset it loaded before (HF_DATASETS_CACHE/<org>___<name>/...), written here by
    `datasets` itself from a local folder and named as a hub dataset's would be."""
    import datasets

    cache = tmp_path / "hf_home" / "datasets"
    datasets.load_dataset(str(prompt_folder(tmp_path / "prompts")), cache_dir=str(cache))
    (cache / "prompts").rename(cache / "kit-tests___prompts")
    result = run(LOAD_PROMPTS, ["kit-tests/prompts"], hub_env(tmp_path, HF_DATASETS_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"train": sorted(PROMPTS[:9]), "eval": sorted(PROMPTS[9:])}
    assert "dataset_name: kit-tests/prompts from datasets' cache" in result.stdout


def test_unknown_hub_dataset_under_hf_hub_offline_fails_with_one_line(tmp_path):
    result = run(LOAD_PROMPTS, ["kit-tests/not-cached"], hub_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: dataset_name: 'kit-tests/not-cached' is neither a local file or folder, nor in the "
                           "HF cache (")  # fmt: skip
    assert line.endswith("`hf download --repo-type dataset kit-tests/not-cached` (same HF_HOME), or name a local file")
    assert "Traceback" not in result.stderr


# --- docs/cluster.md: each section's commands, run as written ------------------------------------------------------
# The hub is a FakeHub serving the tiny policy under the recipes' model ids and a small dataset shaped as UltraFeedback
# is published; placeholders (the mirror's and the proxy's addresses) become the stand-ins' addresses; PPO commands get
# a budget of 2 updates, the tiny reward model and a temporary output folder appended.


def documented_commands(section: str) -> list[str]:
    """The command lines of the ```bash blocks in one section of docs/cluster.md (comments dropped)."""
    body = DOCS.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run_documented(section: str, env: dict[str, str], stand_ins: dict[str, str], ppo_flags: list[str], before_ppo=None):
    """Runs the section's commands in order from the repository root, the venv's bin first on PATH: `export` lines set
    the environment of the lines after them; `before_ppo()` is called before the PPO command. Returns the outputs."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    outputs = []
    for line in documented_commands(section):
        for placeholder, value in stand_ins.items():
            line = line.replace(placeholder, value)
        if line.startswith("export "):
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
            continue
        if "scripts/ppo.py" in line:
            line = " ".join([line, *ppo_flags])
            if before_ppo:
                before_ppo()
        result = subprocess.run(["bash", "-c", line], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=900)  # fmt: skip
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs.append(result)
    return outputs


def ppo_budget(tiny_models, output_dir: Path, *more: str) -> list[str]:
    return [
        "--reward_model_name_or_path", str(tiny_models["reward"]), "--output_dir", str(output_dir),
        "--total_episodes", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--num_mini_batches", "2", "--num_ppo_epochs", "1", "--response_length", "8",
        "--local_rollout_forward_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_eval_prompts", "4",
        "--num_sample_generations", "0", "--bf16", "false", "--dtype", "float32", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ultrafeedback_like(tmp_path_factory) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized as published, in small: a README whose `configs` map the splits
    train_prefs/test_prefs to parquet files under data/, with the published columns."""
    folder = tmp_path_factory.mktemp("ultrafeedback_binarized")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n---\n"
    )
    (folder / "data").mkdir()
    for split, prompts in (("train_prefs", PROMPTS[:9]), ("test_prefs", PROMPTS[9:])):
        rows = [
            {"prompt": p, "prompt_id": hashlib.sha256(p.encode()).hexdigest(),
             "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": "Gladly."}],
             "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "No."}],
             "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Gladly."}],
             "score_chosen": 8.0, "score_rejected": 2.0}
            for p in prompts
        ]  # fmt: skip
        pd.DataFrame(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", index=False)
    return folder


def test_docs_offline_nodes_with_a_filled_hf_cache(tiny_models, ultrafeedback_like, tmp_path):
    assert documented_commands("Offline nodes with a filled HF cache") == [
        f"hf download {QWEN}",
        f"hf download --repo-type dataset {ULTRAFEEDBACK}",
        "export HF_HUB_OFFLINE=1",
        "python scripts/ppo.py --config configs/qwen2.5-0.5b/ppo.yaml",
    ]
    hub = FakeHub(models={QWEN: tiny_models["policy"]}, datasets={ULTRAFEEDBACK: ultrafeedback_like})
    with hub:
        # The stand-in hub answers the `hf download` commands, then goes away before the run on the "compute node".
        env = hub_env(tmp_path, HF_ENDPOINT=hub.url)
        *_, ppo = run_documented("Offline nodes with a filled HF cache", env, {},
                                 ppo_budget(tiny_models, tmp_path / "run", "--report_to", "none"),
                                 before_ppo=hub.stop)  # fmt: skip
    assert hub.repos_asked() == {QWEN, ULTRAFEEDBACK}
    cache = tmp_path / "hf_home" / "hub"
    model = cache / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / hub.commit(QWEN)
    dataset = cache / "datasets--HuggingFaceH4--ultrafeedback_binarized" / "snapshots" / hub.commit(ULTRAFEEDBACK)
    assert f"model_name_or_path: {QWEN} from the HF cache at {model} (HF_HUB_OFFLINE is set)" in ppo.stdout
    why = "HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set"
    assert f"dataset_name: {ULTRAFEEDBACK} from the HF cache at {dataset} ({why})" in ppo.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_docs_hub_mirrors(tiny_models, ultrafeedback_like, tmp_path):
    mirror = "https://hf-mirror.example.org"
    assert documented_commands("Hub mirrors (HF_ENDPOINT)") == [
        f"export HF_ENDPOINT={mirror}",
        "python scripts/ppo.py --config configs/qwen2.5-0.5b/ppo.yaml",
    ]
    with FakeHub(models={QWEN: tiny_models["policy"]}, datasets={ULTRAFEEDBACK: ultrafeedback_like}) as hub:
        (ppo,) = run_documented("Hub mirrors (HF_ENDPOINT)", hub_env(tmp_path), {mirror: hub.url},
                                ppo_budget(tiny_models, tmp_path / "run", "--report_to", "none"))  # fmt: skip
    downloaded = {(path.split("/resolve/")[0], path.rsplit("/", 1)[1]) for method, path in hub.requests
                  if method == "GET" and "/resolve/" in path}  # fmt: skip
    assert (f"/{QWEN}", "model.safetensors") in downloaded
    assert (f"/datasets/{ULTRAFEEDBACK}", "train_prefs-00000-of-00001.parquet") in downloaded
    assert f"model_name_or_path: {QWEN} from the hub at {hub.url}\n" in ppo.stdout
    assert f"dataset_name: {ULTRAFEEDBACK} from the hub at {hub.url}\n" in ppo.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2

    # What the run downloaded is in the HF cache: with the mirror gone, an offline run finds both.
    offline = hub_env(tmp_path, HF_HUB_OFFLINE="1")
    assert "/snapshots/" in located(run(LOCATE_MODEL, [QWEN], offline))
    splits = {"dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs"}
    result = run(LOAD_PROMPTS, [ULTRAFEEDBACK, json.dumps(splits)], offline)
    assert json.loads(result.stdout.splitlines()[-1]) == {"train": sorted(PROMPTS[:9]), "eval": sorted(PROMPTS[9:])}


def test_docs_proxies(tiny_models, ultrafeedback_like, tmp_path):
    """The hub check and W&B both go through HTTPS_PROXY. This proxy reaches nothing (502): the models and data come
    from the HF cache, and the wandb client, holding an API key, gives up after its init timeout (5 s here) and the
    run logs offline."""
    placeholder = "http://proxy.example.org:3128"
    assert documented_commands("Proxies") == [
        f"export HTTPS_PROXY={placeholder}",
        "python scripts/ppo.py --config configs/qwen2.5-0.5b/ppo.yaml",
    ]
    add_to_hf_cache(tmp_path / "hf_home", QWEN, tiny_models["policy"])
    add_to_hf_cache(tmp_path / "hf_home", ULTRAFEEDBACK, ultrafeedback_like, repo_type="dataset")
    (tmp_path / "home").mkdir()
    wandb_env = {
        "HOME": str(tmp_path / "home"), "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": "k" * 40,
        # A W&B server name that exists nowhere: nothing could answer even if the proxy were bypassed.
        "WANDB_BASE_URL": "https://api.wandb.invalid", "WANDB_INIT_TIMEOUT": "5", "WANDB_ERROR_REPORTING": "false",
    }  # fmt: skip
    with RecordingProxy() as proxy:
        env = hub_env(tmp_path, NO_PROXY="", **wandb_env)
        started = time.monotonic()
        (ppo,) = run_documented("Proxies", env, {placeholder: proxy.url}, ppo_budget(tiny_models, tmp_path / "run"))
        seconds = time.monotonic() - started
    assert {"huggingface.co:443", "api.wandb.invalid:443"} <= proxy.hosts()
    assert f"model_name_or_path: {QWEN} from the HF cache at " in ppo.stdout
    assert "(the hub at https://huggingface.co does not answer)" in ppo.stdout
    assert "W&B: logging offline (the wandb client could not start an online run: " in ppo.stdout
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [row for row in history_rows(read_wandb_records(run_file)) if "train/objective/scores" in row]
    assert len(rows) == 2
    assert seconds < 600


def test_docs_the_offline_copy_of_smollm2(tiny_models, tmp_path):
    """RECIPES_OFFLINE_COPY=1 takes the prepared copy although the hub (a FakeHub serving SmolLM2's id) answers. The
    copy here is a stand-in prepared by hand (the tiny policy with the marker file), so nothing is downloaded."""
    assert documented_commands("The offline copy of SmolLM2") == [
        "python scripts/prepare_model.py",
        "RECIPES_OFFLINE_COPY=1 python scripts/ppo.py --config configs/smollm2-135m/ppo.yaml",
    ]
    copy = tmp_path / "copies" / SMOL
    copy.mkdir(parents=True)
    for file in tiny_models["policy"].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / MARKER_FILE).write_text(json.dumps({"hub_id": SMOL}))
    with FakeHub(models={SMOL: tiny_models["policy"]}) as hub:
        env = hub_env(tmp_path, HF_ENDPOINT=hub.url, RECIPES_MODEL_CACHE=str(tmp_path / "copies"))
        prepare, ppo = run_documented("The offline copy of SmolLM2", env, {},
                                      ppo_budget(tiny_models, tmp_path / "run", "--report_to", "none"))  # fmt: skip
    assert prepare.stdout.strip() == str(copy)
    assert f"model_name_or_path: {SMOL} from the kit's offline copy at {copy} (RECIPES_OFFLINE_COPY=1;" in ppo.stdout
    assert not [path for _, path in hub.requests if "SmolLM2" in path]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
