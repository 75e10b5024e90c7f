"""atomic.py: files and folders replaced whole, never left half-written."""

import pytest

from sdar_cli.atomic import staged_dir, staged_file, write_text


def test_a_file_is_replaced_only_when_its_block_succeeds(tmp_path):
    path = tmp_path / "results.json"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        with staged_file(path) as staging:
            staging.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the staging file is gone
    with staged_file(path, ".png") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".results.json.") and staging.suffix == ".png"
        staging.write_text("new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_folder_appears_whole_and_a_lost_race_keeps_the_winner(tmp_path):
    target = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError):
        with staged_dir(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed mid-write")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the target nor the staging folder
    with staged_dir(target) as staging:
        (staging / "config.json").write_text("mine")
    assert (target / "config.json").read_text() == "mine"
    # another process finished first: with `done` theirs is kept, without it the failed rename is an error
    with staged_dir(target, done=lambda folder: (folder / "config.json").is_file()) as staging:
        (staging / "config.json").write_text("late")
        (staging / "weights").write_text("late")
    assert (target / "config.json").read_text() == "mine"
    with pytest.raises(OSError):
        with staged_dir(target) as staging:
            (staging / "weights").write_text("late")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["model"]
