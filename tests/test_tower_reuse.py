"""export.tower_reuse: a tower is linked only when its source is byte-identical."""
import os

import pytest

from export.metadata import write_metadata
from export.tower_reuse import link_tower, reusable_version, source_digest

FEATURES = [{"name": "user_id", "dtype": "string", "type": "categorical"}]


def _tower(root, data=b"weights"):
    (root / "variables").mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"graph")
    (root / "variables" / "variables.index").write_bytes(b"index")
    (root / "variables" / "variables.data-00000-of-00001").write_bytes(data)
    return root


def test_digest_sees_one_changed_byte_a_renamed_file_and_the_features(tmp_path):
    a, b = _tower(tmp_path / "a"), _tower(tmp_path / "b")
    assert source_digest(a, FEATURES) == source_digest(b, FEATURES)
    c = _tower(tmp_path / "c", b"weighta")
    assert source_digest(c, FEATURES) != source_digest(a, FEATURES)
    assert source_digest(a, FEATURES + [{"name": "age", "dtype": "float32"}]) \
        != source_digest(a, FEATURES)
    (b / "variables" / "variables.index").rename(b / "variables" / "other.index")
    assert source_digest(b, FEATURES) != source_digest(a, FEATURES)


def test_link_shares_the_savedmodel_files_only_when_the_digest_matches(tmp_path):
    previous = _tower(tmp_path / "model" / "1")
    write_metadata(previous, {"source_digest": "abc"})
    assert reusable_version(previous, "abd") is None
    assert reusable_version(previous, "abc") == previous
    out = tmp_path / "model" / ".staging-2"
    out.mkdir()
    link_tower(previous, out)
    for rel in ("saved_model.pb", "variables/variables.index",
                "variables/variables.data-00000-of-00001"):
        assert os.path.samefile(previous / rel, out / rel)
    assert not (out / "assets.extra").exists()  # metadata and warmup are the new version's


def test_a_failed_link_leaves_the_staging_directory_empty(tmp_path, monkeypatch):
    previous = _tower(tmp_path / "1")
    out = tmp_path / "staging"
    out.mkdir()

    def no_links(src, dst):
        if str(src).endswith(".index"):
            raise OSError(18, "Invalid cross-device link")
        os.symlink(src, dst)

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(OSError):
        link_tower(previous, out)
    assert list(out.iterdir()) == []
