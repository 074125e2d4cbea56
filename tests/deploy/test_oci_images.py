"""The image writer behind `bazel build //services/<service>:image`: reproducible layers and valid oci-archives."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

from deploy.images import oci


def _tree(root: pathlib.Path, order: list[str], mtime: int) -> dict[str, pathlib.Path]:
    """The same three files, created in `order` and dated `mtime`: what a rebuild elsewhere sees."""
    content = {"app/b.py": b"print('b')\n", "app/pkg/a.py": b"A = 1\n", "bin/run": b"#!/bin/sh\necho run\n"}
    files = {}
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content[name])
        if name.startswith("bin/"):
            path.chmod(0o775)
        os.utime(path, (mtime, mtime))
        files["opt/" + name] = path
    return files


def _digest(path: pathlib.Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_layer_is_the_same_bytes_whatever_the_order_mtimes_and_place_of_its_files(tmp_path):
    first = oci.write_layer(_tree(tmp_path / "one", ["app/b.py", "app/pkg/a.py", "bin/run"], 1_000),
                            tmp_path / "one.tar.gz")
    second = oci.write_layer(_tree(tmp_path / "two", ["bin/run", "app/pkg/a.py", "app/b.py"], 2_000_000),
                             tmp_path / "two.tar.gz")
    assert first == second
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    assert first["digest"] == _digest(tmp_path / "one.tar.gz")
    assert oci.layer_meta(tmp_path / "one.tar.gz") == first
    with tarfile.open(tmp_path / "one.tar.gz") as tar:
        members = [(m.name, m.type, m.mode, m.mtime, m.uid) for m in tar.getmembers()]
    assert members == [
        ("opt", tarfile.DIRTYPE, 0o755, 0, 0),
        ("opt/app", tarfile.DIRTYPE, 0o755, 0, 0),
        ("opt/app/b.py", tarfile.REGTYPE, 0o644, 0, 0),
        ("opt/app/pkg", tarfile.DIRTYPE, 0o755, 0, 0),
        ("opt/app/pkg/a.py", tarfile.REGTYPE, 0o644, 0, 0),
        ("opt/bin", tarfile.DIRTYPE, 0o755, 0, 0),
        ("opt/bin/run", tarfile.REGTYPE, 0o755, 0, 0),
    ]


def test_a_changed_file_changes_the_layer_digest(tmp_path):
    files = _tree(tmp_path / "src", ["app/b.py", "app/pkg/a.py", "bin/run"], 0)
    before = oci.write_layer(files, tmp_path / "before.tar.gz")
    files["opt/app/pkg/a.py"].write_bytes(b"A = 2\n")
    after = oci.write_layer(files, tmp_path / "after.tar.gz")
    assert before["digest"] != after["digest"] and before["diff_id"] != after["diff_id"]


def test_record_files_take_the_installed_files_and_leave_bytecode_and_scripts_out(tmp_path):
    site = tmp_path / "site-packages"
    (site / "pkg" / "__pycache__").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("X = 1\n")
    (site / "pkg" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    record = site / "pkg-1.0.dist-info" / "RECORD"
    record.parent.mkdir()
    record.write_text("pkg/__init__.py,sha256=x,6\npkg/__pycache__/__init__.cpython-311.pyc,,\n"
                      "../../../bin/pkg,sha256=y,10\npkg-1.0.dist-info/RECORD,,\n")
    assert oci.record_files(record, "/usr/lib/site/") == {
        "usr/lib/site/pkg/__init__.py": site / "pkg" / "__init__.py",
        "usr/lib/site/pkg-1.0.dist-info/RECORD": record,
    }


def test_a_record_naming_a_missing_file_is_an_error_naming_the_record_line(tmp_path):
    record = tmp_path / "site-packages" / "pkg-1.0.dist-info" / "RECORD"
    record.parent.mkdir(parents=True)
    record.write_text("pkg-1.0.dist-info/RECORD,,\npkg/gone.py,sha256=x,3\n")
    with pytest.raises(oci.LayerError, match=r"RECORD:2: pkg/gone.py is listed but not installed"):
        oci.record_files(record, "site")


def _image(tmp_path: pathlib.Path, name: str) -> tuple[pathlib.Path, dict]:
    layer = tmp_path / f"{name}.tar.gz"
    meta = {"name": "code", **oci.write_layer(_tree(tmp_path / name, ["app/b.py", "app/pkg/a.py", "bin/run"], 0),
                                               layer)}
    out = tmp_path / f"{name}.tar"
    config = {"User": "10001:10001", "Entrypoint": ["/opt/bin/run"],
              "Labels": {"org.opencontainers.image.version": "1"}}
    return out, oci.write_image(out, config, [(layer, meta), (layer, meta)], "localhost/t:1")


def test_an_image_archive_is_the_same_bytes_when_rebuilt_and_holds_a_shared_blob_once(tmp_path):
    first, summary = _image(tmp_path, "one")
    second, again = _image(tmp_path, "two")
    assert first.read_bytes() == second.read_bytes()
    assert summary == again
    with tarfile.open(first) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))
        manifest = json.load(tar.extractfile("blobs/sha256/" + summary["manifest"].split(":")[1]))
        config = json.load(tar.extractfile("blobs/sha256/" + summary["config"].split(":")[1]))
    assert index["manifests"][0]["digest"] == summary["manifest"]
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "localhost/t:1"}
    # Two layer entries, one blob: the same file is stored once.
    assert len(manifest["layers"]) == 2 and len(names) == 5
    assert config["config"]["User"] == "10001:10001"
    assert config["rootfs"]["diff_ids"] == [oci.layer_meta(tmp_path / "one.tar.gz")["diff_id"]] * 2


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install skopeo)")
def test_skopeo_reads_the_archive(tmp_path):
    out, summary = _image(tmp_path, "one")
    # skopeo unpacks the archive into a temporary folder (default /var/tmp, read-only in Bazel's sandbox).
    found = subprocess.run(["skopeo", "--tmpdir", str(tmp_path), "inspect", f"oci-archive:{out}"],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    inspected = json.loads(found.stdout)
    assert inspected["Digest"] == summary["manifest"]
    assert inspected["Labels"] == {"org.opencontainers.image.version": "1"}
    assert inspected["Layers"] == [summary["layers"][0]["digest"]] * 2
