"""Resident memory of long passes stays flat in the number of rows (issue 23).

Each measurement runs in a fresh Python process so that the peak resident set (``ru_maxrss``) and
the allocator's state belong to that measurement alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hf_influence._utils import memory

needs_glibc = pytest.mark.skipif(
    memory._malloc_trim() is None or memory.resident_bytes() is None, reason="needs glibc's malloc_trim and /proc"
)
# Peak resident memory may rise by at most this much more over 4x the rows (the target).
MAX_EXTRA_RISE_MIB = 300


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_release_memory_returns_freed_heap_pages():
    """192 MiB of 64 KiB blocks freed below a pinned one stay resident until release_memory() gives them back.

    The child process loads only ``_utils/memory.py`` (no torch) and allocates through libc itself, so the
    numbers are the allocator's alone."""
    result = _run(f"""
        import ctypes, importlib.util, json
        spec = importlib.util.spec_from_file_location("memory", {memory.__file__!r})
        memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(memory)
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        blocks = [libc.malloc(65536) for _ in range(3072)]  # below the mmap threshold: served from the heap
        for block in blocks:
            ctypes.memset(block, 1, 65536)  # touched, so resident
        pin = libc.malloc(65536)  # above the others: the heap cannot shrink from its top
        for block in blocks:
            libc.free(block)
        freed = memory.resident_bytes()
        released = memory.release_memory()
        print(json.dumps({{"freed": freed, "after": memory.resident_bytes(), "released": released}}))
    """)
    assert result["released"]
    assert result["freed"] - result["after"] > 128 * 2**20


def test_resident_guard_releases_only_past_its_headroom(monkeypatch):
    readings = iter([1000, 1050, 1101, 1040, 1100, 1141, 1060])  # start, then one reading per check / after a release
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: (lambda pad: 1))
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(readings))
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append("release") or True)
    guard = memory.ResidentGuard(headroom=100)  # reads 1000 (enabled check) then 1050 for its limit: 1150
    guard.check()  # 1101 <= 1150: nothing
    assert calls == [] and guard.limit == 1150
    guard.check()  # 1040: nothing
    guard.check()  # 1100: nothing
    guard.check()  # 1141: nothing
    guard.check()  # 1060: nothing
    assert calls == []
    readings_past = iter([1200, 1080])  # over the limit, then the level after the release
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(readings_past))
    guard.check()
    assert calls == ["release"] and guard.releases == 1 and guard.limit == 1180


def test_resident_guard_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    monkeypatch.setattr(memory, "release_memory", lambda: pytest.fail("released without glibc"))
    guard = memory.ResidentGuard(headroom=0)
    assert not guard.enabled
    guard.check()


_SCORE = """
    import json, resource, torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification
    import hf_influence as hfi
    torch.manual_seed(0)
    config = BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 65, ({rows},), generator=g).tolist()
    ids = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in lengths]
    data = Dataset.from_dict({{"input_ids": ids, "attention_mask": [[1] * n for n in lengths], "labels": [r[0] % 3 for r in ids]}})
    inf = hfi.Influence(model, batch_size=32, progress=False)
    inf.self_influence(data.select(range(64)), method="tracin")
    inf.check_data(**{{"training data": data}})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inf.self_influence(data, method="tracin")
    print(json.dumps({{"rise_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}}))
"""


@needs_glibc
@pytest.mark.slow
def test_scoring_4x_the_rows_keeps_peak_memory_flat():
    """TracIn self-influence of a tiny BERT over 512 and 2,048 padded rows: the older code's peak RSS rose with
    the rows (glibc kept the freed per-batch buffers); now the rise over 4x the rows stays within the bound."""
    small, large = (_run(_SCORE.format(rows=rows))["rise_mib"] for rows in (512, 2048))
    assert large - small <= MAX_EXTRA_RISE_MIB, f"peak RSS rose {small:.0f} MiB over 512 rows, {large:.0f} MiB over 2,048"
