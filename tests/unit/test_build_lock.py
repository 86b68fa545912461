"""A JIT build lock left by a killed compile is cleared; a live build's lock is left alone."""
import os
import time

import pytest

from pipeline.engine.distributed import STALE_BUILD_LOCK_S, clear_stale_build_lock

pytestmark = pytest.mark.unit


def _lock(tmp_path, monkeypatch, age_s: float):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("deepspeed_shm_comm", verbose=False), "lock")
    open(lock, "w").close()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_lock_older_than_any_build_is_removed_with_a_warning(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, age_s=STALE_BUILD_LOCK_S + 60)
    with pytest.warns(UserWarning, match="was killed 11 min ago"):
        assert clear_stale_build_lock() == lock
    assert not os.path.exists(lock)


def test_a_fresh_lock_belongs_to_a_running_build_and_stays(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, age_s=30)
    assert clear_stale_build_lock() is None
    assert os.path.exists(lock)


def test_no_lock_is_nothing_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert clear_stale_build_lock() is None
