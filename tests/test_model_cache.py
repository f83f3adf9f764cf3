"""Tests for recipes.model_cache. All fast (no download) except the last one, which runs
only when the real model has already been prepared in the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import model_cache
from recipes.model_cache import (
    CACHE_ENV_VAR,
    MARKER_FILE,
    MODEL_CACHE_DIR,
    offline_copy,
    prepare_offline_model,
    resolve_model_path,
)

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV_VAR, str(root))
    return root


def _fake_copy(root: Path, hub_id: str, complete: bool) -> Path:
    folder = root / hub_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if complete:
        (folder / MARKER_FILE).write_text(json.dumps({"hub_id": hub_id}))
    return folder


def test_cache_dir_follows_env_var(cache_root):
    assert MODEL_CACHE_DIR() == cache_root


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    assert MODEL_CACHE_DIR() == Path.home() / ".cache" / "ppo-recipes" / "models"


def test_local_folder_returned_unchanged(tmp_path, cache_root):
    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model_path(str(local)) == str(local)


def test_unknown_hub_id_returned_unchanged(cache_root):
    assert resolve_model_path("some-org/not-prepared") == "some-org/not-prepared"


def test_cached_hub_id_resolves_to_cache(cache_root):
    folder = _fake_copy(cache_root, SMOL, complete=True)
    assert resolve_model_path(SMOL) == str(folder)


def test_explicit_cache_root_argument(tmp_path, cache_root):
    other = tmp_path / "other"
    folder = _fake_copy(other, SMOL, complete=True)
    assert resolve_model_path(SMOL) == SMOL  # not in the env-var cache
    assert resolve_model_path(SMOL, cache_root=other) == str(folder)


def test_incomplete_copy_not_used(cache_root):
    _fake_copy(cache_root, SMOL, complete=False)
    assert resolve_model_path(SMOL) == SMOL


def test_offline_copy_only_when_complete(cache_root):
    assert offline_copy(SMOL) is None
    folder = _fake_copy(cache_root, SMOL, complete=False)
    assert offline_copy(SMOL) is None
    (folder / MARKER_FILE).write_text(json.dumps({"hub_id": SMOL}))
    assert offline_copy(SMOL) == folder
    assert offline_copy("../escape") is None


def test_prepare_is_idempotent_without_download(cache_root, monkeypatch):
    folder = _fake_copy(cache_root, SMOL, complete=True)

    def no_download(*args, **kwargs):
        raise AssertionError("a complete copy exists; nothing should be downloaded")

    monkeypatch.setattr(model_cache.subprocess, "run", no_download)
    assert prepare_offline_model(SMOL) == folder


def test_prepare_unknown_hub_id_fails_clearly(cache_root):
    with pytest.raises(model_cache.ModelPrepareError, match="no offline source"):
        prepare_offline_model("some-org/not-prepared")


_PREPARED = MODEL_CACHE_DIR() / SMOL


@pytest.mark.skipif(
    not (_PREPARED / MARKER_FILE).is_file(),
    reason=f"{SMOL} not prepared in {MODEL_CACHE_DIR()}; run scripts/prepare_model.py",
)
def test_prepared_model_reproduces_marker_continuation():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((_PREPARED / MARKER_FILE).read_text())
    check = marker["check"]
    tokenizer = AutoTokenizer.from_pretrained(_PREPARED)
    model = AutoModelForCausalLM.from_pretrained(_PREPARED, dtype=torch.float32).eval()
    encoded = tokenizer.apply_chat_template(
        check["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=check["max_new_tokens"], do_sample=False)
    new_ids = output[0, encoded["input_ids"].shape[1]:].tolist()
    assert new_ids == check["continuation_ids"]
    assert tokenizer.decode(new_ids) == check["continuation"]
