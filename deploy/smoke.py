"""The demo's path against the stack of deploy/compose.yaml: prepare, train, watch the adapter go live, ask it.

Brings the stack up with podman-compose (unless --no-up), waits for gRPC health SERVING of the
three services, prepares a self-cognition dataset through dataprep, trains a LoRA through the
trainer, waits until serving has hot-loaded the published checkpoint, asks the adapter and the
base model through the official `openai` client, and checks that Prometheus scrapes all three
services. Exits 0 when the adapter names its identity and the base does not, 1 otherwise.

    python -m deploy.smoke [--stack_dir DIR] [--no-up] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
USER = 10001  # the images' user: the volumes must be its to write


def compose(stack_dir: pathlib.Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEFORGE_STACK_DIR": str(stack_dir)}
    return subprocess.run(["podman-compose", "--podman-run-args=--runtime runc", "-f", str(HERE / "compose.yaml"),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def prepare_volumes(stack_dir: pathlib.Path) -> None:
    from libs.default_model.resolve import resolve_model

    # The smoke run's folders too: we write its dataset there, the services their outputs.
    for name in ("datasets", "runs", "models", "runs/smoke/data"):
        (stack_dir / name).mkdir(parents=True, exist_ok=True)
    base = stack_dir / "models" / "base"
    if not base.exists():
        shutil.copytree(resolve_model(None), base)
    for path in [stack_dir, *stack_dir.rglob("*")]:
        os.chown(path, USER, USER)


def wait_healthy(address: str, timeout: float) -> None:
    """gRPC health SERVING at `address`, asked on a fresh channel every 10 s: one channel kept for
    minutes backs off up to 2 minutes between connection attempts while a container starts."""
    from cli.stack import wait_serving
    from libs.common.errors import Unavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            return wait_serving(address, timeout=min(10.0, max(1.0, deadline - time.monotonic())))
        except Unavailable:
            if time.monotonic() >= deadline:
                raise


def prometheus_up(url: str, jobs: list[str], timeout: float) -> dict[str, str]:
    """Waits until Prometheus has scraped each job with up == 1; returns each job's last value."""
    deadline = time.monotonic() + timeout
    while True:
        query = urllib.parse.urlencode({"query": "up"})
        try:
            with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as reply:
                result = json.load(reply)["data"]["result"]
            values = {r["metric"]["job"]: r["value"][1] for r in result}
        except OSError:
            values = {}
        if all(values.get(job) == "1" for job in jobs) or time.monotonic() > deadline:
            return values
        time.sleep(2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--stack_dir", default=str(HERE / "stack"), help="host folder of the volumes")
    parser.add_argument("--no-up", dest="up", action="store_false", help="use a stack that is already up")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--max_steps", type=int, default=80, help="optimizer steps of the adapter")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the stack to become healthy")
    args = parser.parse_args(argv)

    from cli.demo import DemoConfig, Endpoints, run_path
    from libs.common.errors import TuneForgeError

    stack_dir = pathlib.Path(args.stack_dir).resolve()
    started = time.monotonic()
    failures: list[str] = []
    try:
        prepare_volumes(stack_dir)
        if args.up:
            print(f"[1/5] podman-compose up (volumes under {stack_dir})", flush=True)
            up = compose(stack_dir, "up", "-d")
            if up.returncode != 0:
                print(up.stdout[-3000:] + up.stderr[-3000:], file=sys.stderr)
                return 1
        print("[2/5] waiting for gRPC health SERVING: dataprep, trainer, serving", flush=True)
        for name, address in (("dataprep", "127.0.0.1:50051"), ("trainer", "127.0.0.1:50052"),
                              ("serving", "127.0.0.1:50053")):
            wait_healthy(address, timeout=max(10.0, args.timeout - (time.monotonic() - started)))
            print(f"      {name} {address} SERVING after {time.monotonic() - started:.0f} s", flush=True)
        config = DemoConfig(model_name=["Zephyrine"], model_author=["Quillon Labs"], max_steps=args.max_steps,
                            load_timeout=120.0)
        result = run_path(Endpoints("127.0.0.1:50051", "127.0.0.1:50052", "http://127.0.0.1:8000",
                                    dataprep_for_trainer="dataprep:50051"),
                          pathlib.Path("/data/models/base"), config, stack_dir / "runs" / "smoke",
                          first_step=3, total=5, server_out=pathlib.Path("/data/runs/smoke"))
        failures += result["failures"]
        print("[5/5] Prometheus scrapes the three services", flush=True)
        up_values = prometheus_up("http://127.0.0.1:9090", ["dataprep", "trainer", "serving"], timeout=60)
        print(f"      up: {json.dumps(up_values, sort_keys=True)}")
        failures += [f"Prometheus: up{{job={job!r}}} is {up_values.get(job)!r}, not 1"
                     for job in ("dataprep", "trainer", "serving") if up_values.get(job) != "1"]
    except (TuneForgeError, OSError, subprocess.SubprocessError) as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        if args.up and not args.keep:
            logs = compose(stack_dir, "logs", timeout=120)
            (stack_dir / "compose.log").write_text(logs.stdout + logs.stderr)
            compose(stack_dir, "down", timeout=300)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if not failures:
        print(f"smoke passed in {time.monotonic() - started:.0f} s: the adapter trained in the stack answers "
              f"with its identity through the openai client")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
