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
