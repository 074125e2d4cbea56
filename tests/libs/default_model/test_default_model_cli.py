"""`tuneforge model`: subcommands, flags and one-line user errors."""

import pytest

from cli.main import main as tuneforge
from libs.common.errors import Problems
from libs.default_model.cli import main


def test_path_prints_the_cached_default(default_model, capsys):
    assert main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model)


def test_unknown_subcommand_suggests_the_closest():
    with pytest.raises(Problems, match="did you mean 'build-default'"):
        main(["build-defualt"])


def test_build_default_needs_an_output_dir():
    with pytest.raises(Problems, match="output_dir: required"):
        main(["build-default"])


def test_bad_flags_are_all_reported_at_once_by_the_console_script(capsys):
    assert tuneforge(["model", "build-default", "--output_dri", "x", "--max_steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("unknown flag --output_dri" in line and "did you mean 'output_dir'" in line for line in err), err
    assert all(line.startswith("tuneforge model: error: ") for line in err)
    assert "Traceback" not in "\n".join(err)


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "build-default --output_dir DIR" in out and "path" in out
