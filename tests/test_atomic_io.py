import json
import os

import pytest

from instalign_d2.utils.atomic_io import atomic_write, atomic_write_json, atomic_write_path


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(str(target), {"gIoU": 1.0})

    def crash(f):
        f.write(b'{"gIoU": 2')  # half a file, then the writer dies
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(str(target), crash)
    assert json.loads(target.read_text()) == {"gIoU": 1.0}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_path_writer_sees_the_target_extension_and_result_lands(tmp_path):
    seen = []

    def write_to(temporary):
        seen.append(temporary)
        with open(temporary, "w") as f:
            f.write("picture")

    target = tmp_path / "sub" / "answer.png"  # missing folders are created
    atomic_write_path(str(target), write_to)
    assert target.read_text() == "picture"
    assert seen[0].endswith(".png") and os.path.basename(seen[0]).startswith(".")
    assert not os.path.exists(seen[0])
    assert os.listdir(tmp_path / "sub") == ["answer.png"]
