"""W&B without an API key: the run switches to offline logging by itself, and the offline run file holds the same
per-update metrics as metrics.jsonl and the recipe as its config.

wandb 0.31 ships no Python reader for its run files (the `.wandb` transaction log is written by wandb-core), so
`read_wandb_records` reads the format itself: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB
log records (32 KiB blocks; each record: CRC-32 of type byte + data, length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are `wandb_internal_pb2.Record` protobufs. Every record's checksum is verified.
"""

import json
import struct
import zlib
from pathlib import Path

import pytest
from conftest import read_metrics, tiny_recipe_flags
from wandb.proto import wandb_internal_pb2

from recipes import parse_recipe, run_ppo

BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, data length, record type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    records, pending, position = [], None, 7
    while position + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - position % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # the block's zero-filled trailer
            position += left_in_block
            continue
        checksum, length, kind = RECORD_HEADER.unpack_from(data, position)
        if kind == 0 and length == 0:  # zero padding after the last record
            break
        start = position + RECORD_HEADER.size
        payload = data[start : start + length]
        assert len(payload) == length, f"{path}: record at byte {position} is cut short"
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {position}"
        position = start + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = None
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {position}")
    parsed = []
    for payload in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        parsed.append(record)
    return parsed


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history_rows(records) -> list[dict]:
    return [
        {item_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def run_config(records, with_updates: bool) -> dict:
    """The config the run started with (the `run` record: the kit's resolved recipe), and with `with_updates` the
    later `config` updates (the trainer's W&B callback adds its arguments and the model config)."""
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            updates = record.run.config.update
        elif kind == "config" and with_updates:
            updates = record.config.update
        else:
            continue
        for item in updates:
            config[item_key(item)] = json.loads(item.value_json)
    return config


@pytest.mark.slow
def test_wandb_logs_offline_without_an_api_key(tiny_models, prompt_files, tmp_path, monkeypatch, capsys):
    # No key, no mode: the kit must choose offline itself. HOME points away from any `wandb login` netrc of the
    # machine; WANDB_MODE is set then removed so that monkeypatch also removes what the kit sets.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "placeholder")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    (tmp_path / "home").mkdir()

    output_dir = tmp_path / "run"
    recipe = parse_recipe(
        tiny_recipe_flags(
            tiny_models, prompt_files["jsonl"], output_dir,
            "--total_episodes", "8", "--report_to", "wandb", "--wandb_project", "ppo-recipes-tests",
            "--run_name", "offline-check",
        )
    )  # fmt: skip
    resolved = recipe.to_dict()
    run_ppo(recipe)

    assert "W&B: logging offline (no W&B API key" in capsys.readouterr().out
    metrics = read_metrics(output_dir / "metrics.jsonl")
    assert len(metrics) == 2

    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    records = read_wandb_records(run_files[0])

    # The trainer's W&B callback logs each update under `train/<TRL name>`.
    rows = [row for row in history_rows(records) if "train/objective/scores" in row]
    assert len(rows) == len(metrics)
    for row, line in zip(rows, metrics):
        for name in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "episode"):
            assert row[f"train/{name}"] == pytest.approx(line[name], rel=1e-9, abs=1e-12), name

    started_with = run_config(records, with_updates=False)
    assert started_with["model_name_or_path"] == str(tiny_models["policy"])
    assert started_with["reward_model_name_or_path"] == str(tiny_models["reward"])
    assert {key: started_with.get(key) for key in resolved} == resolved
    # The final config keeps every recipe key; transformers' callback re-logs its own arguments, with the values
    # of `*_token` fields masked (stop_token: "<STOP_TOKEN>"), and the rest unchanged.
    final = run_config(records, with_updates=True)
    assert {key: final[key] for key in resolved if not key.endswith("_token")} == {
        key: value for key, value in resolved.items() if not key.endswith("_token")
    }

    run = next(record.run for record in records if record.WhichOneof("record_type") == "run")
    assert run.project == "ppo-recipes-tests"
    assert run.display_name == "offline-check"
