"""torch work inside a Dask worker gets a larger mmap threshold, and gives it back."""

from __future__ import annotations

import pytest

from slidecensus.engine import tasks


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_raised_inside_and_restored_after_in_a_worker_environment(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(tasks, "_libc", lambda: fake)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as Dask's nanny sets it
    with pytest.raises(RuntimeError), tasks.torch_malloc():
        assert fake.calls == [("mallopt", -3, 32 << 20)]
        raise RuntimeError("a failing task still restores the threshold")
    assert fake.calls[1:] == [("mallopt", -3, 128 << 10), ("malloc_trim", 0)]


def test_left_alone_outside_a_worker(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(tasks, "_libc", lambda: fake)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with tasks.torch_malloc():
        pass
    assert fake.calls == []

