"""Shard machinery: fixed partitions, atomic checksummed files, resume, corruption, the WORLD_SIZE guard."""

from types import SimpleNamespace

import pytest
import torch

from hf_influence._utils.errors import CorruptShardError, InvalidInputError
from hf_influence.jobs import (
    ShardPlan,
    check_world,
    compute_shards,
    load_shard,
    merge_shards,
    save_shard,
    shard_save_path,
)

REQUEST = {"method": "tracin", "train_data": "abc"}


def squares(rows: range) -> dict[str, torch.Tensor]:
    values = torch.arange(rows.start, rows.stop, dtype=torch.float64)
    return {"value": values**2, "pair": torch.stack([values, -values], dim=1)}  # [rows], [rows, 2]


def test_partitions_are_fixed_and_cover_every_row(tmp_path):
    plan = ShardPlan.create(tmp_path, "self_influence", REQUEST, num_rows=23, shard_size=5)
    assert plan.num_shards == 5 and [plan.rows(s) for s in (0, 4)] == [range(0, 5), range(20, 23)]
    assert [r for s in range(plan.num_shards) for r in plan.rows(s)] == list(range(23))
    other = ShardPlan.create(tmp_path, "self_influence", {**REQUEST, "method": "arnoldi"}, num_rows=23, shard_size=5)
    assert other.folder != plan.folder  # another configuration never shares shards
    with pytest.raises(InvalidInputError, match="shard_size must be >= 1"):
        ShardPlan.create(tmp_path, "self_influence", REQUEST, num_rows=23, shard_size=0)


def test_stopped_run_resumes_and_merges_exactly(tmp_path):
    plan = ShardPlan.create(tmp_path, "self_influence", REQUEST, num_rows=23, shard_size=5)
    calls = []

    def compute(rows):
        calls.append(rows.start)
        return squares(rows)

    first = compute_shards(plan, compute, max_shards=2, progress=False)
    assert (first.computed, first.skipped, first.remaining, first.complete) == ([0, 1], 0, 3, False)
    second = compute_shards(plan, compute, progress=False)
    assert (second.computed, second.skipped, second.complete) == ([2, 3, 4], 2, True)
    assert calls == [0, 5, 10, 15, 20]  # each partition computed once
    merged = merge_shards(plan)
    assert torch.equal(merged["value"], torch.arange(23, dtype=torch.float64) ** 2) and merged["pair"].shape == (23, 2)
    assert compute_shards(plan, compute, progress=False).computed == []
    assert (plan.folder / "request.json").is_file()


def test_corrupt_or_foreign_shards_are_recomputed_and_never_merged(tmp_path):
    plan = ShardPlan.create(tmp_path, "self_influence", REQUEST, num_rows=10, shard_size=5)
    compute_shards(plan, squares, progress=False)
    path = shard_save_path(plan, 1)
    shard_save_path(plan, 0).write_bytes(path.read_bytes())  # another partition's file
    with pytest.raises(CorruptShardError, match="differs in shard, rows"):
        merge_shards(plan)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        load_shard(plan, 1)
    save_shard(plan, 0, squares(range(0, 3)))  # metadata of partition 0, but 3 rows instead of 5
    with pytest.raises(CorruptShardError, match="its partition has 5"):
        load_shard(plan, 0)
    assert compute_shards(plan, squares, progress=False).computed == [0, 1]
    assert torch.equal(merge_shards(plan)["value"], torch.arange(10, dtype=torch.float64) ** 2)


def test_world_size_guard_names_the_launch_command():
    with pytest.raises(InvalidInputError, match="--multi_gpu --num_processes 2") as error:
        check_world(SimpleNamespace(num_processes=1), expected=2)
    assert "torchrun --nproc_per_node 2" in str(error.value)
