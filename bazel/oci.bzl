"""OCI images of the services, built offline: the debootstrap base, Python layers shared between images, code.

- `debian_base_repository`: the base layer made by deploy/images/base.sh (it needs a
  Debian mirror, so it runs once outside Bazel) read from its cache as `@debian_base`.
  Without it, building an image fails with the command to run; nothing else needs it.
- `python_layer`: the files of installed distributions (from the venv, through the
  `@pypi` RECORD files) as one layer. Layers are cut by dependency closure so they
  coincide between images: the same inputs give the same bytes and so the same digest,
  and an image store keeps one copy of torch for all three images.
- `code_layer`: first-party sources (generated protos included) and the `tuneforge` launcher.
- `oci_image`: an oci-archive of base + layers with the entrypoint, user, labels and
  health check. The layer and image bytes come from deploy/images/oci.py.
"""

OciLayerInfo = provider(fields = {"layer": "the gzipped tar", "meta": "JSON: digest, diff_id, size"})

# Debian 12's interpreter reads this site directory (and its .pth files) with no venv.
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
APP = "opt/tuneforge/app"

_TOOL = Label("//deploy/images:oci")

def _base_repository_impl(ctx):
    cache = ctx.os.environ.get("TUNEFORGE_IMAGE_CACHE", "") or ctx.os.environ.get("HOME", "/root") + "/.cache/tuneforge/images"
    base = ctx.path(cache + "/debian-12-python.tar.gz")
    if base.exists:
        ctx.symlink(base, "debian-12-python.tar.gz")
        build = 'exports_files(["debian-12-python.tar.gz"])\n'
    else:
        build = "\n".join([
            "genrule(",
            '    name = "missing",',
            '    outs = ["debian-12-python.tar.gz"],',
            '    cmd = "echo \'@debian_base: %s is missing: run `make base-image` (debootstrap, needs a Debian mirror once), then `bazel sync --configure`\' >&2; exit 1",' % base,
            ")",
            "",
        ])
    ctx.file("BUILD.bazel", 'package(default_visibility = ["//visibility:public"])\n' + build)
    ctx.file("WORKSPACE", 'workspace(name = "debian_base")\n')

debian_base_repository = repository_rule(
    implementation = _base_repository_impl,
    environ = ["TUNEFORGE_IMAGE_CACHE", "HOME"],
    configure = True,
    local = True,
    doc = "The cached debootstrap base layer (deploy/images/base.sh) as @debian_base//:debian-12-python.tar.gz.",
)

def _host_files_impl(ctx):
    exports, missing = [], []
    for name, path in sorted(ctx.attr.files.items()):
        if ctx.path(path).exists:
            ctx.symlink(path, name)
            exports.append(name)
        else:
            missing.append("%s (%s)" % (path, name))
    build = ['package(default_visibility = ["//visibility:public"])', "exports_files(%r)" % exports]
    for name in missing:
        target = name.split(" (")[1][:-1]
        build.append('genrule(name = "missing_%s", outs = ["%s"], cmd = "echo \'@%s: %s is missing: %s\' >&2; exit 1")' % (
            target, target, ctx.name, name.split(" ")[0], ctx.attr.hint))
    ctx.file("BUILD.bazel", "\n".join(build) + "\n")
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)

host_files_repository = repository_rule(
    implementation = _host_files_impl,
    attrs = {"files": attr.string_dict(doc = "name in the repository -> absolute path on the host"), "hint": attr.string()},
    configure = True,
    local = True,
    doc = "Host files (Debian's Prometheus and Alertmanager binaries) as a repository, for the ops images.",
)

def _file_layer_impl(ctx):
    pairs = ["%s=%s" % (dest.strip("/"), target.files.to_list()[0].path) for target, dest in ctx.attr.files.items()]
    inputs = [target.files.to_list()[0] for target in ctx.attr.files]
    layer = ctx.actions.declare_file(ctx.label.name + ".tar.gz")
    meta = ctx.actions.declare_file(ctx.label.name + ".json")
    args = ctx.actions.args()
    args.add_all(["layer", "--out", layer, "--meta", meta, "--name", ctx.attr.description or ctx.label.name])
    args.add_all("--files", sorted(pairs))
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [layer, meta],
        mnemonic = "OciFileLayer",
        progress_message = "Writing the layer %s" % ctx.label.name,
    )
    return [DefaultInfo(files = depset([layer, meta])), OciLayerInfo(layer = layer, meta = meta)]

file_layer = rule(
    implementation = _file_layer_impl,
    attrs = {
        "files": attr.label_keyed_string_dict(allow_files = True, doc = "file -> its path in the image"),
        "description": attr.string(),
        "_tool": attr.label(default = _TOOL, executable = True, cfg = "exec"),
    },
)

def _base_layer_impl(ctx):
    meta = ctx.actions.declare_file(ctx.label.name + ".json")
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = ["meta", "--layer", ctx.file.src.path, "--meta", meta.path, "--name", ctx.attr.description],
        inputs = [ctx.file.src],
        outputs = [meta],
        mnemonic = "OciLayerMeta",
        progress_message = "Hashing the base layer",
    )
    return [DefaultInfo(files = depset([ctx.file.src, meta])), OciLayerInfo(layer = ctx.file.src, meta = meta)]

base_layer = rule(
    implementation = _base_layer_impl,
    attrs = {
        "src": attr.label(allow_single_file = [".tar.gz"]),
        "description": attr.string(default = "debian 12 minbase + python3 (deploy/images/base.sh)"),
        "_tool": attr.label(default = _TOOL, executable = True, cfg = "exec"),
    },
)

def _records(targets):
    """The @pypi dist-info RECORD files in the transitive runfiles of `targets`."""
    found = {}
    for target in targets:
        for f in target[DefaultInfo].default_runfiles.files.to_list():
            if f.owner.workspace_name == "pypi" and f.basename == "RECORD":
                found[f.path] = f
    return found

def _python_layer_impl(ctx):
    records = _records(ctx.attr.include)
    for target in ctx.attr.also_in:
        keep = _records([target])
        records = {path: f for path, f in records.items() if path in keep}
    for path in _records(ctx.attr.exclude):
        records.pop(path, None)
    files = [records[path] for path in sorted(records)]
    layer = ctx.actions.declare_file(ctx.label.name + ".tar.gz")
    meta = ctx.actions.declare_file(ctx.label.name + ".json")
    args = ctx.actions.args()
    args.add_all(["layer", "--out", layer, "--meta", meta, "--prefix", SITE_PACKAGES])
    args.add("--name", "python: " + ", ".join([f.dirname.split("/")[-1].split("-")[0] for f in files]))
    args.add_all("--records", files)
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = files,
        outputs = [layer, meta],
        mnemonic = "OciPythonLayer",
        progress_message = "Writing the Python layer %s (%d distributions)" % (ctx.label.name, len(files)),
        # The installed files are read through the RECORDs' site-packages, outside the sandbox's inputs.
        execution_requirements = {"no-sandbox": "1"},
    )
    return [DefaultInfo(files = depset([layer, meta])), OciLayerInfo(layer = layer, meta = meta)]

python_layer = rule(
    implementation = _python_layer_impl,
    attrs = {
        "include": attr.label_list(doc = "targets whose @pypi closure goes in"),
        "also_in": attr.label_list(doc = "keep only distributions also in each of these targets' closures"),
        "exclude": attr.label_list(doc = "targets whose @pypi closure stays out (the layers below this one)"),
        "_tool": attr.label(default = _TOOL, executable = True, cfg = "exec"),
    },
)

_LAUNCHER = """#!/usr/bin/python3
# The `tuneforge` command of the image (deploy/images): cli.main from /{app}.
import sys

if __name__ == "__main__":  # guarded: vLLM's engine re-imports the main module in its workers
    from cli.main import main

    sys.exit(main(sys.argv[1:]))
"""

def _code_layer_impl(ctx):
    launcher = ctx.actions.declare_file(ctx.label.name + ".tuneforge")
    ctx.actions.write(launcher, _LAUNCHER.format(app = APP), is_executable = True)
    pth = ctx.actions.declare_file(ctx.label.name + ".pth")
    ctx.actions.write(pth, "/%s\n" % APP)
    sources = {}
    for target in ctx.attr.deps:
        for f in target[DefaultInfo].default_runfiles.files.to_list() + target[DefaultInfo].files.to_list():
            if f.owner.workspace_name == "" and not f.short_path.startswith("../"):
                sources[f.short_path] = f
    pairs = ["usr/local/bin/tuneforge=" + launcher.path, SITE_PACKAGES + "/tuneforge-app.pth=" + pth.path]
    pairs += ["%s/%s=%s" % (APP, short, sources[short].path) for short in sorted(sources)]
    layer = ctx.actions.declare_file(ctx.label.name + ".tar.gz")
    meta = ctx.actions.declare_file(ctx.label.name + ".json")
    args = ctx.actions.args()
    args.add_all(["layer", "--out", layer, "--meta", meta, "--name", "tuneforge code: %d files" % len(sources)])
    args.add_all("--files", pairs)
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = [launcher, pth] + [sources[s] for s in sorted(sources)],
        outputs = [layer, meta],
        mnemonic = "OciCodeLayer",
        progress_message = "Writing the code layer %s" % ctx.label.name,
    )
    return [DefaultInfo(files = depset([layer, meta])), OciLayerInfo(layer = layer, meta = meta)]

code_layer = rule(
    implementation = _code_layer_impl,
    attrs = {
        "deps": attr.label_list(doc = "first-party py_library targets and files; their sources go under /" + APP),
        "_tool": attr.label(default = _TOOL, executable = True, cfg = "exec"),
    },
)

def _oci_image_impl(ctx):
    revision = ctx.var.get("revision", "unknown")
    version = ctx.var.get("version", "dev")
    # --define=variant=cuda (make images ENGINE=cuda): the same rules over a CUDA venv, tagged apart.
    variant = ctx.var.get("variant", "")
    if variant:
        version = version + "-" + variant
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/home/tuneforge",
        "PYTHONUNBUFFERED": "1",
        # The default model is built here on first use; /data/home is a volume in the stack.
        "TUNEFORGE_HOME": "/data/home",
    }
    env.update(ctx.attr.env)
    labels = {
        "org.opencontainers.image.title": "tuneforge-" + ctx.attr.service,
        "org.opencontainers.image.description": ctx.attr.description,
        "org.opencontainers.image.source": ctx.attr.source,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    # `tuneforge serve <service>` on 0.0.0.0, ports from the environment, more flags after the image name.
    entrypoint = ctx.attr.entrypoint or ["/bin/sh", "-c", 'exec tuneforge serve %s %s "$@"' % (ctx.attr.service, " ".join(ctx.attr.flags)), "tuneforge-" + ctx.attr.service]
    config = {
        "User": "10001:10001",
        "WorkingDir": "/data",
        "Env": ["%s=%s" % (k, env[k]) for k in sorted(env)],
        "Entrypoint": entrypoint,
        "Cmd": [],
        "ExposedPorts": {"%d/tcp" % p: {} for p in ctx.attr.ports},
        "Labels": labels,
        "StopSignal": "SIGTERM",
    }
    if ctx.attr.healthcheck:
        # Docker's field (docker reads it; podman ignores it in OCI images, so compose.yaml repeats it).
        config["Healthcheck"] = {
            "Test": ["CMD-SHELL", ctx.attr.healthcheck],
            "Interval": 10 * 1000000000,
            "Timeout": 5 * 1000000000,
            "StartPeriod": ctx.attr.health_start_period_s * 1000000000,
            "Retries": 3,
        }
    config_file = ctx.actions.declare_file(ctx.label.name + ".config.json")
    ctx.actions.write(config_file, json.encode({"config": config, "annotations": labels}))
    layers = [ctx.attr.base] + ctx.attr.layers
    out = ctx.actions.declare_file(ctx.label.name + ".tar")
    summary = ctx.actions.declare_file(ctx.label.name + ".summary.json")
    args = ctx.actions.args()
    args.add_all(["image", "--out", out, "--config", config_file, "--summary", summary])
    args.add("--ref", "localhost/tuneforge-%s:%s" % (ctx.attr.service, version))
    inputs = [config_file]
    for layer in layers:
        info = layer[OciLayerInfo]
        args.add("--layer", "%s=%s" % (info.layer.path, info.meta.path))
        inputs += [info.layer, info.meta]
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [out, summary],
        mnemonic = "OciImage",
        progress_message = "Writing the image archive %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out, summary]))]

oci_image = rule(
    implementation = _oci_image_impl,
    attrs = {
        "service": attr.string(mandatory = True),
        "description": attr.string(default = ""),
        "source": attr.string(default = "https://github.com/tuneforge/tuneforge"),
        "base": attr.label(providers = [OciLayerInfo], default = "//deploy/images:base"),
        "layers": attr.label_list(providers = [OciLayerInfo], doc = "bottom to top, after the base"),
        "flags": attr.string_list(doc = "flags after `tuneforge serve <service>` (shell words: ${VAR:-default} expands)"),
        "env": attr.string_dict(),
        "ports": attr.int_list(),
        "healthcheck": attr.string(doc = "a shell command, exit 0 when healthy"),
        "entrypoint": attr.string_list(doc = "instead of `tuneforge serve <service>` (the Prometheus and Alertmanager images)"),
        "health_start_period_s": attr.int(default = 30),
        "_tool": attr.label(default = _TOOL, executable = True, cfg = "exec"),
    },
    doc = "An oci-archive (`<name>.tar`) and its digests and sizes (`<name>.summary.json`). Tag it `manual`.",
)
