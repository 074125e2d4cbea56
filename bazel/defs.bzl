"""TuneForge's Bazel macros: Python packages by glob, proto codegen, entry binaries, pytest files as py_tests."""

# Data files shipped with a package: mirrors [tool.setuptools.package-data] in pyproject.toml.
PACKAGE_DATA = ["**/*.proto", "**/*.txt", "**/*.jsonl", "**/*.jinja", "**/*.json"]

# Written in place by `make install` (protos/codegen.py); Bazel generates its own.
_GENERATED = ["**/*_pb2.py", "**/*_pb2_grpc.py", "**/*_pb2.pyi"]

def py_package(name, deps, srcs = None, visibility = ["//visibility:public"]):
    """The Python package in this folder and below: every .py file and its data files.

    Globbed, so modules added later are built without touching BUILD files.
    `deps` names first-party packages and `@pypi//:<import or distribution name>`.
    """
    native.py_library(
        name = name,
        srcs = srcs if srcs != None else native.glob(["**/*.py"], exclude = _GENERATED),
        data = native.glob(PACKAGE_DATA, exclude = _GENERATED),
        deps = deps,
        visibility = visibility,
    )

def py_proto_codegen(name, srcs, tool):
    """Generates `<x>_pb2.py`, `<x>_pb2_grpc.py` and `<x>_pb2.pyi` beside each proto in `srcs`.

    `tool` is the py_binary around protos/codegen.py, the same codegen step the
    pip install runs in place. Protos compile with the workspace root as include
    path, so the generated modules import as `protos.tuneforge.<service>.v1.<name>_pb2`
    under Bazel exactly as in the venv. One action compiles them all, so a proto
    may import another. Returns the generated .py files (the .pyi are in `name`
    too, for editors reading bazel-bin).
    """
    stems = [src[:-len(".proto")] for src in srcs]
    py = [s + "_pb2.py" for s in stems] + [s + "_pb2_grpc.py" for s in stems]
    native.genrule(
        name = name,
        srcs = srcs,
        outs = py + [s + "_pb2.pyi" for s in stems],
        tools = [tool],
        cmd = "$(execpath %s) --out_dir $(GENDIR) --root . $(SRCS)" % tool,
        message = "Generating Python for %d protos" % len(srcs),
    )
    return py

def _entry_file(module):
    return module.replace(".", "_") + ".py"

def py_entry_files(modules):
    """Generates the entry file of each `py_main_binary` module (bazel/entries/BUILD.bazel).

    The entries live in bazel/entries/, not beside the module they run, so no
    Bazel-made file ever appears inside a source package (the default model's
    cache fingerprint hashes every .py file of its package, for one).
    """
    for module in modules:
        native.genrule(
            name = _entry_file(module)[:-len(".py")],
            outs = [_entry_file(module)],
            cmd = "\n".join([
                "cat > $@ <<'EOF'",
                '"""Bazel entry point of %s: runs its main(argv)."""' % module,
                "",
                "import os",
                "import sys",
                "",
                "if __name__ == \"__main__\":  # guarded: vLLM's engine re-imports the main module in its workers",
                "    os.chdir(os.environ.get(\"BUILD_WORKING_DIRECTORY\", os.getcwd()))",
                "    from %s import main" % module,
                "",
                "    sys.exit(main(sys.argv[1:]))",
                "EOF",
            ]),
            visibility = ["//visibility:public"],
        )

def py_main_binary(name, module, deps):
    """A py_binary that runs `<module>.main(sys.argv[1:])` and exits with its code, and `<name>_help_test`.

    Its entry file comes from bazel/entries/ (list the module there). Under
    `bazel run` it first changes to the directory the command was started in, so
    relative paths in flags mean what the user meant.
    """
    entry = "//bazel/entries:" + _entry_file(module)
    native.py_binary(
        name = name,
        srcs = [entry],
        main = entry,
        deps = deps,
        python_version = "PY3",
        visibility = ["//visibility:public"],
    )

    # The binary as a user starts it: every import resolves from declared deps.
    native.sh_test(
        name = name + "_help_test",
        size = "small",
        srcs = ["//bazel:help_test.sh"],
        args = ["$(rootpath :%s)" % name],
        data = [":" + name],
    )

# Markers whose tests never run under Bazel: they need minutes or a device (see docs/bazel.md).
_DESELECT = "not slow and not gpu"

def pytest_files(srcs, deps, home, data = [], size = "small", timeout = "moderate", tags = []):
    """One py_test per pytest file in `srcs`, named for the file without `.py`.

    `tests/libs/common/test_config.py` becomes `//tests:libs/common/test_config`.
    Each runs its file's tests with pytest (bazel/pytest_main.py) minus those
    marked slow or gpu; results land where Bazel reads JUnit XML. `home` (a
    tuneforge_home target) becomes TUNEFORGE_HOME, so the default model is
    read from the build, never built inside a test.
    """
    for src in srcs:
        native.py_test(
            name = src[:-len(".py")],
            srcs = [src, "//bazel:pytest_main.py"],
            main = "//bazel:pytest_main.py",
            args = ["-m", "'%s'" % _DESELECT, "$(rootpath %s)" % src],
            env = {"TUNEFORGE_HOME": "$(rootpath %s)" % home},
            deps = deps,
            data = data + [home],
            size = size,
            timeout = timeout,
            tags = tags,
            python_version = "PY3",
        )

def pytest_group(name, srcs, deps, home, data = [], shard_count = 1, tags = []):
    """One py_test running the pytest files in `srcs` in one process (per shard).

    Each test process pays for Python, pytest, the conftest and torch imports,
    and the session fixtures (the dataprep server, the prepared dataset, the
    trainer server) before its first test: 3.5 s of CPU a file more than in
    one process (measured on tests/cli and tests/libs), so a folder's files run
    together. With `shard_count` N, shard i runs every N-th file from the i-th
    (bazel/pytest_main.py), so Bazel spreads a large folder over the machine's
    cores. Tests marked slow or gpu are deselected, as in `pytest_files`.
    """
    native.py_test(
        name = name,
        srcs = srcs + ["//bazel:pytest_main.py"],
        main = "//bazel:pytest_main.py",
        args = ["-m", "'%s'" % _DESELECT] + ["$(rootpath %s)" % src for src in srcs],
        env = {"TUNEFORGE_HOME": "$(rootpath %s)" % home},
        deps = deps,
        data = data + [home],
        size = "medium",
        timeout = "long",
        shard_count = shard_count,
        tags = tags,
        python_version = "PY3",
    )

def _tuneforge_home_impl(ctx):
    home = ctx.actions.declare_directory(ctx.attr.name)
    ctx.actions.run(
        executable = ctx.executable.tool,
        arguments = ["path"],
        outputs = [home],
        env = {"TUNEFORGE_HOME": home.path},
        mnemonic = "DefaultModel",
        progress_message = "Building the default model into %s (about a minute)" % home.short_path,
    )
    return [DefaultInfo(files = depset([home]), runfiles = ctx.runfiles(files = [home]))]

tuneforge_home = rule(
    implementation = _tuneforge_home_impl,
    doc = """A TUNEFORGE_HOME directory holding the default model, built by `tool path`.

    The model is then a cached build output like any other: built once, and
    again only when its inputs change (the builder's sources and corpus, and the
    RECORDs of torch, transformers, ...), where the default cache under
    ~/.cache would be rebuilt by every test in its own sandbox. Tests get it
    through the TUNEFORGE_HOME environment variable (see pytest_files).""",
    attrs = {
        "tool": attr.label(executable = True, cfg = "exec", mandatory = True),
    },
)
