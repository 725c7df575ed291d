"""benchmarks/peak_snapshot.py: the allocator-trace replay that finds what is alive at the peak."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "peak_snapshot.py")
spec = importlib.util.spec_from_file_location("peak_snapshot", _PATH)
ps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ps)

FR = [{"filename": "/x/torch/nn/modules/module.py", "line": 3, "name": "inner"},
      {"filename": "/work/model.py", "line": 7, "name": "forward"}]


def test_replay_counts_blocks_until_free_completed():
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": FR},
             {"action": "alloc", "addr": 2, "size": 50, "frames": FR},
             {"action": "free_requested", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 3, "size": 10, "frames": FR},
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 4, "size": 20, "frames": FR},
             {"action": "segment_alloc", "addr": 9, "size": 4096}]
    peak, live, at = ps.replay(trace, 1000)
    assert (peak, at, sorted(live)) == (1160, 3, [1, 2, 3])


def test_replay_ignores_frees_of_blocks_allocated_before_recording():
    trace = [{"action": "free_completed", "addr": 7, "size": 500},
             {"action": "alloc", "addr": 1, "size": 10, "frames": FR}]
    peak, live, _ = ps.replay(trace, 1000)
    assert peak == 1010 and list(live) == [1]


def test_sites_skip_torch_frames_and_group():
    live = {1: {"size": 100, "frames": FR}, 2: {"size": 30, "frames": FR},
            3: {"size": 5, "frames": [{"filename": "/a/b.py", "line": 1, "name": "g"}]}}
    rows = ps.summarize(live, 5)
    assert [(r["bytes"], r["blocks"], r["largest"]) for r in rows] == [(130, 2, 100), (5, 1, 5)]
    assert rows[0]["site"].startswith("model.py:7 forward")
