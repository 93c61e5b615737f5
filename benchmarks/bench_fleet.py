"""Fleet scale on devices in network namespaces (issue 14 part 4): deploy wall time and controller memory for
1, 10 and 50 devices at several --parallel values, then a lab run that benches every device.

Each device is a real sshd in a network namespace of its own behind a veth pair (tests/lab/netns.py), all on
this machine: the devices share its CPUs with the controller, so the wall times bound what the controller
costs rather than what a real fleet's network costs. Every deploy sends a fresh artifact (random bytes, so
every device really receives it), through the CLI in a child process whose peak RSS is the controller's
memory (os.wait4's ru_maxrss).

    sudo .venv/bin/python benchmarks/bench_fleet.py [--devices 50] [--artifact-mb 1] [--parallel 1,4,16,50]
        [--bench-parallel 1,8] [--no-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.lab.netns import netns_problem, start_netns_host  # noqa: E402
from tests.lab.sshd import generate_key, trust_device, write_inventory  # noqa: E402
from tests.sshd_fixtures import make_synthetic_artifact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--artifact-mb", type=float, default=1.0)
    parser.add_argument("--parallel", default="1,4,16,50", help="--parallel values tried for each fleet size")
    parser.add_argument("--bench-parallel", default="1,8", help="lab run.parallel values for the bench stage")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    problem = netns_problem()
    if problem:
        raise SystemExit(f"bench_fleet: {problem}")

    sizes = sorted({1, min(10, args.devices), args.devices})
    parallels = [int(p) for p in args.parallel.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-fleet-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
        env.pop("SSH_AUTH_SOCK", None)
        key = generate_key(tmp / "client_ed25519")
        hosts = []
        started = time.monotonic()
        try:
            for index in range(1, args.devices + 1):
                hosts.append(start_netns_host(tmp / f"sshd{index}", index, client_key=key))
                trust_device(hosts[-1].sshd, home / ".ssh" / "known_hosts")
            print(f"{args.devices} netns devices up in {time.monotonic() - started:.1f} s "
                  f"(sshd each, veth, one CPU pool of {os.cpu_count()} cores shared with the controller)")
            names = [f"d{i:02d}" for i in range(1, args.devices + 1)]
            groups = {f"fleet{n}": names[:n] for n in sizes}
            inventory = write_inventory(tmp / "inventory.yaml", dict(zip(names, (h.sshd for h in hosts), strict=True)),
                                        python=sys.executable, workdir_root=tmp / "devices", groups=groups)
            _deploy_table(tmp, inventory, env, sizes, parallels, args.artifact_mb)
            if not args.no_bench:
                _bench_table(tmp, inventory, env, args.devices, [int(p) for p in args.bench_parallel.split(",")])
        finally:
            for host in hosts:
                host.stop()


def _run_measured(argv: list[str], env: dict) -> tuple[int, float, float, str]:
    """(exit code, wall s, peak RSS MiB, output) of a child process."""
    started = time.monotonic()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    output = child.stdout.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.monotonic() - started, usage.ru_maxrss / 1024, output


def _deploy_table(tmp: Path, inventory: Path, env: dict, sizes: list[int], parallels: list[int],
                  artifact_mb: float) -> None:
    rows = []
    for count, size in enumerate(sizes):
        for parallel in sorted({p for p in parallels if p <= size} | {min(size, 8)}):
            artifact = make_synthetic_artifact(tmp / f"artifact-{size}-{parallel}-{count}",
                                               {"model.tflite": os.urandom(int(artifact_mb * 1e6))})
            code, wall, rss, output = _run_measured(
                [sys.executable, "-m", "edgeq", "deploy", str(artifact), "--target", f"fleet{size}",
                 "--parallel", str(parallel), "-i", str(inventory)], env)
            if code != 0:
                raise SystemExit(f"deploy to fleet{size} at --parallel {parallel} failed ({code}):\n{output}")
            rows.append((size, parallel, wall, wall / size, rss))
    print(f"\ndeploy of a fresh {artifact_mb:g} MB artifact (edgeq deploy --target GROUP --parallel P, CLI in a "
          "child process; wall time includes its start)")
    print(f"{'devices':>8}{'parallel':>10}{'wall s':>9}{'s/device':>10}{'controller peak RSS MiB':>25}")
    for size, parallel, wall, per_device, rss in rows:
        print(f"{size:>8}{parallel:>10}{wall:>9.1f}{per_device:>10.2f}{rss:>25.0f}")


def _bench_table(tmp: Path, inventory: Path, env: dict, devices: int, parallels: list[int]) -> None:
    digits = tmp / "digits"
    subprocess.run([sys.executable, "examples/digits/train.py", "--output", str(digits)], cwd=REPO, env=env,
                   check=True, capture_output=True)
    print(f"\nlab run benching {devices} devices (digits CNN, TFLite INT8 for x86-avx2; runs 50, warmup 5, "
          "min_seconds 0, no power sensor); convert cached after the first")
    print(f"{'run.parallel':>13}{'wall s':>9}{'s/device':>10}{'peak RSS MiB':>14}{'ok':>5}"
          f"{'p50 ms median':>15}{'p50 min..max':>18}")
    for parallel in parallels:
        lab = {
            "name": f"fleet of {devices}",
            "models": [{"name": "digits", "path": str(digits / "digits.keras"),
                        "calibration": str(digits / "calib.npz"), "eval": str(digits / "eval.npz")}],
            "build": {"max_accuracy_drop": 0.05},
            "run": {"targets": [f"fleet{devices}"], "warmup": 5, "runs": 50, "min_seconds": 0,
                    "parallel": parallel, "keep_releases": 2},
            "history": {"dir": str(tmp / "history"), "keep": 5},
            "artifacts": str(tmp / "lab-artifacts"),
        }
        (tmp / "lab.yaml").write_text(yaml.safe_dump(lab))
        # One build before timing, so that each row times deploy + bench only.
        if parallel == parallels[0]:
            _run_measured([sys.executable, "-m", "edgeq", "lab", "run", str(tmp / "lab.yaml"), "-i", str(inventory),
                           "--idle-seconds", "0"], env)
        code, wall, rss, output = _run_measured(
            [sys.executable, "-m", "edgeq", "lab", "run", str(tmp / "lab.yaml"), "-i", str(inventory),
             "--idle-seconds", "0"], env)
        latest = sorted((tmp / "history").iterdir())[-1]
        p50s, ok = _p50s(latest)
        if code not in (0, 3) or not p50s:
            raise SystemExit(f"lab run at parallel {parallel} failed ({code}):\n{output[-3000:]}")
        print(f"{parallel:>13}{wall:>9.1f}{wall / devices:>10.2f}{rss:>14.0f}{ok:>5}"
              f"{statistics.median(p50s):>15.3f}{min(p50s):>9.3f}..{max(p50s):<8.3f}")


def _p50s(run_dir: Path) -> tuple[list[float], int]:
    """p50 latencies of a lab run's ok results, and how many results were ok."""
    import json

    p50s = []
    for path in run_dir.rglob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if isinstance(data, dict) and data.get("status") == "ok" and isinstance(data.get("latency_ms"), dict):
            p50s.append(float(data["latency_ms"]["p50"]))
    return p50s, len(p50s)


if __name__ == "__main__":
    main()
