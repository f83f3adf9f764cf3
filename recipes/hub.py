"""Where a model or prompt dataset named in a recipe comes from: a local folder, the Hugging Face cache, the hub (or
the mirror HF_ENDPOINT names), or the kit's offline copy of SmolLM2 — following huggingface_hub's own settings.

A name is a local path when it exists, starts with `.`, `/` or `~`, or has more than one `/`; otherwise it is a hub
id (`org/name`) and is looked for, in order:

1. the kit's offline copy (recipes/model_cache.py), when RECIPES_OFFLINE_COPY=1 and the kit has one for that id;
2. the hub, unless huggingface_hub is offline (HF_HUB_OFFLINE; HF_DATASETS_OFFLINE for datasets) or its endpoint
   does not answer: the id itself goes to transformers/datasets, which download into (or reuse) the HF cache. The
   endpoint (huggingface_hub's, so HF_ENDPOINT) is asked once per process through huggingface_hub's HTTP session
   (so HTTPS_PROXY/NO_PROXY apply), with a short timeout, because the hub clients would otherwise retry for
   minutes on a machine without network;
3. the HF cache (HF_HOME / HF_HUB_CACHE), through `snapshot_download(local_files_only=True)`: the snapshot folder,
   loaded with no network request. Datasets also come from `datasets`' own prepared cache (HF_DATASETS_CACHE);
4. the offline copy, when it is prepared and RECIPES_OFFLINE_COPY is not 0 (how this kit's own tests and demo
   run on machines without the hub);
5. nowhere: one error naming the recipe key and what to do.

Each run prints, once per name, which of these it used.
"""

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import get_session

from recipes.errors import RecipeError
from recipes.model_cache import OFFLINE_MODELS, offline_copy

OFFLINE_COPY_ENV_VAR = "RECIPES_OFFLINE_COPY"
# Long enough for a mirror across a continent, short enough that a machine without network starts at once.
HUB_PROBE_TIMEOUT_S = 3.0

# Models the kit itself makes, by path prefix, and the command that makes them.
KIT_MADE_MODELS = {
    "outputs/smollm2-135m/reward_model": "make reward-model",
    "outputs/tiny/models": "python scripts/make_tiny_models.py",
}


@dataclass(frozen=True)
class Location:
    """What to hand to `from_pretrained` / `load_dataset`, and, in words for the run's log, where it comes from and
    why that source."""

    path: str
    source: str
    why: str = ""


def locate_model(name_or_path: str, key: str, revision: str | None = None) -> str:
    """What to pass to `from_pretrained` for the recipe field `key` (see the module docstring for the order); prints
    which source it used. `revision` is the branch, tag or commit looked up in the HF cache (default `main`)."""
    location = _locate_model(name_or_path, key, revision or "main")
    _announce(key, name_or_path, location)
    return location.path


def load_hub_dataset(name: str, config_name: str | None):
    """The DatasetDict of the recipe's `dataset_name` when it names a hub dataset (config `config_name`): from the
    hub, from the HF cache's snapshot of the dataset repository (as `hf download --repo-type dataset` leaves it), or
    from `datasets`' own cache of a dataset it loaded before."""
    from datasets import config as datasets_config
    from datasets import load_dataset

    if _looks_like_path(name):
        raise RecipeError(f"dataset_name: data file or folder not found: {name}")
    offline = datasets_config.HF_HUB_OFFLINE  # HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE
    if not offline and hub_reachable():
        location = Location(name, f"the hub at {constants.ENDPOINT}")
        loaded = load_dataset(name, name=config_name)
    else:
        why = _hub_unusable("HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set" if offline else None)
        snapshot = _cached_snapshot(name, "dataset", "main")
        if snapshot is not None:
            location = Location(snapshot, "the HF cache", why)
            loaded = load_dataset(snapshot, name=config_name)
        else:
            # `datasets` falls back to the copy it prepared when it last loaded this dataset (HF_DATASETS_CACHE).
            location = Location(name, f"datasets' cache in {datasets_config.HF_DATASETS_CACHE}", why)
            try:
                loaded = load_dataset(name, name=config_name)
            except ConnectionError:  # what `datasets` raises when the hub is unusable and nothing is cached
                raise RecipeError(
                    f"dataset_name: '{name}' is neither a local file or folder, nor in the HF cache ({constants.HF_HUB_CACHE} "
                    f"or {datasets_config.HF_DATASETS_CACHE}), and {why}; fill the cache where the hub is reachable "
                    f"with `hf download --repo-type dataset {name}` (same HF_HOME), or name a local file"
                ) from None
    _announce("dataset_name", name, location)
    return loaded


@functools.cache
def hub_reachable() -> bool:
    """Whether huggingface_hub may and can reach its endpoint: not offline (HF_HUB_OFFLINE), and the endpoint
    (HF_ENDPOINT) answers within HUB_PROBE_TIMEOUT_S through huggingface_hub's session (which honours proxy
    variables). Asked once per process. A server error (5xx, e.g. a proxy that cannot reach the hub) counts as
    no answer."""
    if constants.is_offline_mode():
        return False
    try:
        response = get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, proxy) means "no"
        return False
    return response.status_code < 500


def _offline_copy_setting() -> str:
    """'always', 'never' or 'fallback' (unset): RECIPES_OFFLINE_COPY=1, =0, or absent."""
    value = os.environ.get(OFFLINE_COPY_ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return "fallback"
    if value in ("1", "true", "yes"):
        return "always"
    if value in ("0", "false", "no"):
        return "never"
    raise RecipeError(f"{OFFLINE_COPY_ENV_VAR}={value!r}: use 1 (always the offline copy), 0 (never) or leave it unset")


def _locate_model(name: str, key: str, revision: str) -> Location:
    if Path(name).expanduser().is_dir():
        return Location(str(Path(name).expanduser()), "a local folder")
    if _looks_like_path(name):
        maker = next((cmd for prefix, cmd in KIT_MADE_MODELS.items() if name.startswith(prefix)), None)
        hint = f"; make it with `{maker}`" if maker else ""
        raise RecipeError(f"{key}: model folder not found: {name}{hint}")

    setting = _offline_copy_setting()
    copy = offline_copy(name)
    if setting == "always" and name in OFFLINE_MODELS:
        if copy is None:
            raise RecipeError(
                f"{key}: {OFFLINE_COPY_ENV_VAR}=1 but the offline copy of '{name}' is not prepared; "
                f"run `python scripts/prepare_model.py`"
            )
        why = f"{OFFLINE_COPY_ENV_VAR}=1; GGUF Q4_1 weights, dequantized"
        return Location(str(copy), "the kit's offline copy", why)
    if hub_reachable():
        return Location(name, f"the hub at {constants.ENDPOINT}")

    why = _hub_unusable("HF_HUB_OFFLINE is set" if constants.is_offline_mode() else None)
    snapshot = _cached_snapshot(name, "model", revision)
    if snapshot is not None:
        return Location(snapshot, "the HF cache", why)
    if copy is not None and setting != "never":
        why = f"{why} and the HF cache {constants.HF_HUB_CACHE} lacks it; GGUF Q4_1 weights, dequantized"
        return Location(str(copy), "the kit's offline copy", why)
    if name in OFFLINE_MODELS and setting != "never":
        hint = "prepare the kit's offline copy with `python scripts/prepare_model.py`, or fill the cache"
    else:
        hint = "fill the cache"
    raise RecipeError(
        f"{key}: '{name}' is not in the HF cache ({constants.HF_HUB_CACHE}) and {why}; {hint} with "
        f"`hf download {name}` where the hub is reachable (same HF_HOME), or name a local folder"
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name.split("/")[0]).is_dir()


def _hub_unusable(offline_reason: str | None) -> str:
    return offline_reason or f"the hub at {constants.ENDPOINT} does not answer"


def _cached_snapshot(repo_id: str, repo_type: str, revision: str) -> str | None:
    """The HF cache's snapshot folder of `repo_id` at `revision`, or None if the cache has none (or only part of
    one, which huggingface_hub can tell when `hf download` was interrupted)."""
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:  # IncompleteSnapshotError included
        return None


_announced: set[tuple[str, str]] = set()


def _announce(key: str, name: str, location: Location) -> None:
    """Prints where `name` comes from, once per process and only on the main one (RANK is set by launchers)."""
    if (name, location.source) in _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced.add((name, location.source))
    where = "" if location.path == name else f" at {location.path}"
    why = f" ({location.why})" if location.why else ""
    print(f"{key}: {name} from {location.source}{where}{why}", flush=True)
