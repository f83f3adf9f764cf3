"""Reading W&B offline run files in tests.

wandb 0.31 ships no Python reader for its run files (the `.wandb` transaction log is written by wandb-core), so
`read_wandb_records` reads the format itself: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB
log records (32 KiB blocks; each record: CRC-32 of type byte + data, length, type FULL/FIRST/MIDDLE/LAST) whose
payloads are `wandb_internal_pb2.Record` protobufs. Every record's checksum is verified.
"""

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

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


def summary(records) -> dict:
    """The run's final summary (the last `summary` record's values by key)."""
    values = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                values[item_key(item)] = json.loads(item.value_json)
    return values
