"""Checkpoints appear whole or not at all, and a changed file is caught."""
import pytest

from schemas.checkpoint import BadCheckpoint, publish, read_manifest, staging


def test_publish_and_verify(tmp_path):
    final = tmp_path / "ckpt"
    with staging(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"abc")
        manifest = publish(tmp, final, kind="policy", config={"lr": 1})
    assert read_manifest(final) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left
    (final / "weights.bin").write_bytes(b"abd")
    with pytest.raises(BadCheckpoint):
        read_manifest(final)


def test_crash_before_publish_leaves_nothing(tmp_path):
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with staging(final) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BadCheckpoint):
        read_manifest(final)


def test_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadCheckpoint):
        read_manifest(tmp_path)
