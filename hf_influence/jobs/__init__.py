"""Accelerate-launched, resumable jobs: process start-up, fixed shards on disk, scoring and s_test jobs."""

from .processes import CPU_LAUNCH, StopRequests, broadcast_from_main, check_world, is_main_process, start_processes, wait_for_everyone
from .scoring import ShardedScores, check_sharded_method, scoring_request, sharded_scores, sharded_self_influence
from .shards import REQUEST_FILE, ShardPlan, ShardReport, compute_shards, load_shard, merge_shards, save_shard, shard_save_path
from .stest import StestRun, load_stest, sharded_s_test, stest_save_path

__all__ = [
    "CPU_LAUNCH", "REQUEST_FILE", "ShardPlan", "ShardReport", "ShardedScores", "StestRun", "StopRequests", "broadcast_from_main",
    "check_sharded_method", "check_world", "compute_shards", "is_main_process", "load_shard", "load_stest", "merge_shards",
    "save_shard", "scoring_request", "shard_save_path", "sharded_s_test", "sharded_scores", "sharded_self_influence",
    "start_processes", "stest_save_path", "wait_for_everyone",
]
