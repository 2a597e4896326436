"""Atomic writes: temporary name, then rename; ordinary permissions; nothing left behind."""


def test_atomic_writes_leave_ordinary_permissions_and_no_temporaries(tmp_path):
    import os
    import stat

    from nnunet_rndpo.atomic import save_json

    save_json({"a": 1}, tmp_path / "x.json")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    import pytest

    from nnunet_rndpo.atomic import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "half.npz") as temporary:
            temporary.write_bytes(b"half of it")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_items_another_process_holds_come_last_and_a_dead_holders_are_taken_over(tmp_path, monkeypatch):
    import subprocess
    import sys

    from nnunet_rndpo import atomic

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "b.claim").write_text(str(holder.pid))
        waits = []

        def the_holder_dies():
            waits.append(1)
            holder.kill()
            holder.wait()

        monkeypatch.setattr(atomic, "wait_for_claims", the_holder_dies)
        visited = []
        for item in atomic.each_claimed("abc", lambda name: tmp_path / f"{name}.claim"):
            assert (tmp_path / f"{item}.claim").read_text() == str(__import__("os").getpid())  # held while yielded
            visited.append(item)
    finally:
        holder.kill()
        holder.wait()
    assert visited == ["a", "c", "b"] and waits == [1]
    assert list(tmp_path.iterdir()) == []  # every claim released
