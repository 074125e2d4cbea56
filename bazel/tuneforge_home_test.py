"""The default model Bazel builds for the tests (//bazel:tuneforge_home) is the one they look for.

If this fails, every test using the `default_model` fixture would build its own
model inside its sandbox and time out instead.
"""

import os
import pathlib

from libs.default_model import resolve


def test_tuneforge_home_holds_the_default_model_of_these_sources():
    home = pathlib.Path(os.environ["TUNEFORGE_HOME"])
    wanted = home / "models" / f"default-{resolve.fingerprint()}"
    held = sorted(p.name for p in (home / "models").iterdir() if p.is_dir())
    assert (wanted / "config.json").is_file(), (
        f"{home} holds {held} but resolve_model(None) looks for {wanted.name}: "
        "the builder's runfiles and the tests' differ in libs/default_model's files")
    assert resolve.resolve_model(None) == wanted
