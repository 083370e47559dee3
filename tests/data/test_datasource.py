"""The shard reader turns every kind of damage into a counted error row, never an exception."""

import io
import json

from dinor1.data.datasource import iter_shard_rows
from tests.helpers import write_image, write_tar


def _sample(key, image_id, img):
    meta = {"image_id": image_id, "width": 32, "height": 24,
            "annotations": [{"id": 1, "bbox": [1, 1, 8, 8], "category_id": 1}]}
    return [(f"{key}.jpg", img), (f"{key}.json", json.dumps(meta).encode())]


def test_damaged_members_become_error_rows(tmp_path):
    img = write_image(tmp_path / "x.jpg", 32, 24, seed=0)
    members = (
        _sample("a", 1, img)
        + [("b.json", b"{}")]  # missing image member
        + [("c.jpg", img), ("c.pkl", b"\x80\x04payload"), ("c.json", b"{}")]  # pickle refused
        + _sample("d", 4, img)
        + [("e.jpg", img)]  # missing json member
    )
    write_tar(tmp_path / "s.tar", members)
    with open(tmp_path / "s.tar", "rb") as f:
        rows = list(iter_shard_rows(f, "s.tar"))
    assert [r["__key__"] for r in rows] == ["a", "b", "c", "d", "e"]
    errors = {r["__key__"]: r["error"] for r in rows}
    assert errors["a"] == errors["d"] == ""
    assert "no image member" in errors["b"] and "'b'" in errors["b"]
    assert "refusing .pkl" in errors["c"]
    assert "no .json member" in errors["e"]


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    img = write_image(tmp_path / "x.jpg", 32, 24, seed=0)
    write_tar(tmp_path / "s.tar", _sample("a", 1, img) + _sample("b", 2, img)
              + _sample("c", 3, img))
    data = (tmp_path / "s.tar").read_bytes()
    rows = list(iter_shard_rows(io.BytesIO(data[: len(data) * 2 // 3]), "s.tar"))
    good = [r["__key__"] for r in rows if not r["error"]]
    assert good[:1] == ["a"] and len(good) < 3
    assert any("truncated or corrupt" in r["error"] for r in rows)


def test_garbage_file_is_one_error_row():
    rows = list(iter_shard_rows(io.BytesIO(b"not a tar at all" * 100), "junk.tar"))
    assert len(rows) == 1 and "junk.tar" in rows[0]["error"]
