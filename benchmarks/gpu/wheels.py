"""The wheels the GPU machine lacks, computed from pyproject.toml and the machine's own package list.

    python3.12 benchmarks/gpu/wheels.py            # resolve, download into .whl/, write benchmarks/gpu/wheels.txt
    python3.12 benchmarks/gpu/wheels.py --check    # resolve only; exit 1 if wheels.txt or .whl/ is out of date

The GPU machine has no network, Python 3.12 and its own packages (benchmarks/gpu/device-packages.txt); what the
project needs beyond them travels as wheels in the git-ignored .whl/ and is installed there offline by run.sh with
``pip install --no-index --find-links .whl -r benchmarks/gpu/wheels.txt``. The set is not written by hand: pip's
resolver, told the device's platform and Python and held to the versions the device has (its torch, numpy, ...),
resolves the project's runtime dependencies (plus the test tools run.sh uses); every package of that closure the
device lacks is carried at the exact version the resolver chose, so a package and the exact companion it needs
(pydantic and its pydantic-core, fastapi and opentelemetry-api) always travel together. A device package whose
version is unknown but that a carried wheel needs (typing-extensions, anyio, ...) travels too, as a spare that pip
installs there only if the device's own copy is too old. Run it with Python 3.12: pip evaluates the dependencies'
environment markers with the running interpreter, so another Python could resolve a different closure.

Also writes .whl/device-standin.txt, the device's packages at its versions (the resolver's choice where the device's
version is unknown), from which benchmarks/gpu/rehearse.sh builds its stand-in for the device's Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE_PACKAGES = Path(__file__).with_name("device-packages.txt")
WHEEL_LIST = Path(__file__).with_name("wheels.txt")
WHEEL_DIR = REPO_ROOT / ".whl"
STANDIN = "device-standin.txt"
# What run.sh runs on the device beyond the service's own dependencies: the GPU tests and the API accuracy client,
# taken from pyproject's extras by name so that their version ranges stay in one place.
EXTRA_TOOLS = {"test": ["pytest", "pytest-timeout", "httpx"], "onnx": ["onnx", "onnxscript", "onnxruntime"]}
# What the device run does without: it serves HTTP only (run.sh sets APP_GRPC_PORT=0, and the gRPC server is imported
# only when enabled), and grpcio alone is 7.4 MB of the 64 MiB a call may carry, which the tree, the wheels and
# CIFAR-10's bundle otherwise passed.
NOT_ON_DEVICE = {"grpcio", "grpcio-health-checking", "protobuf"}
# The device image: CPython 3.12.3 on glibc 2.39 (Ubuntu 24.04). pip matches a manylinux tag exactly, so each one
# a wheel may carry is named.
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          *[arg for tag in ["manylinux2014_x86_64", "manylinux1_x86_64",
                            *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 40))]
            for arg in ("--platform", tag)]]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return canonical(match.group(1))


def read_device_packages(path: Path = DEVICE_PACKAGES) -> dict[str, str | None]:
    """name -> version where the list gives one, else None; of two spellings of one name the one with a version."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        key = canonical(name)
        packages[key] = version.strip() or packages.get(key)
    return packages


def project_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    wanted = [requirement for requirement in project["dependencies"]
              if requirement_name(requirement) not in NOT_ON_DEVICE]
    for extra, names in EXTRA_TOOLS.items():
        by_name = {requirement_name(requirement): requirement for requirement in extras[extra]}
        wanted += [by_name[canonical(name)] for name in names]
    return wanted


def resolve(requirements: list[str], device: dict[str, str | None]) -> list[dict]:
    """pip's resolution for the device: [{name, version, requires, url, sha256}], one per package of the closure."""
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as scratch:
        constraints = Path(scratch) / "device-constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(device.items()) if version))
        report = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--disable-pip-version-check", "--report", str(report), "--target", str(Path(scratch) / "t"),
                   *TARGET, "-c", str(constraints), *requirements]
        subprocess.run(command, check=True)
        installs = json.loads(report.read_text())["install"]
    resolved = []
    for item in installs:
        metadata = item["metadata"]
        requires = [requirement_name(requirement) for requirement in metadata.get("requires_dist", [])
                    if not re.search(r"\bextra\s*==", requirement.partition(";")[2])]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        resolved.append({"name": canonical(metadata["name"]), "version": metadata["version"], "requires": requires,
                         "url": item["download_info"]["url"], "sha256": hashes.get("sha256")})
    return sorted(resolved, key=lambda package: package["name"])


def plan(resolved: list[dict], device: dict[str, str | None], roots: list[str]
         ) -> tuple[list[dict], list[dict], list[dict]]:
    """(carried: what the device lacks, reached from the project's requirements through packages it lacks, since
    a device package's own needs are met there already; spares: device packages of unknown version that a carried
    one needs; stand-in: every device package of the closure, at the device's version where known)."""
    by_name = {package["name"]: package for package in resolved}
    reached: set[str] = set()
    pending = [name for name in roots if name in by_name and name not in device]
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending += [need for need in by_name[name]["requires"] if need in by_name and need not in device]
    carried = [package for package in resolved if package["name"] in reached]
    needed = {name for package in carried for name in package["requires"]}
    spares = [package for package in resolved
              if package["name"] in device and device[package["name"]] is None and package["name"] in needed]
    standin = [package for package in resolved if package["name"] in device]
    for package in standin:
        known = device[package["name"]]
        if known is not None and known != package["version"]:
            raise SystemExit(f"error: the resolver chose {package['name']} {package['version']}, not the device's "
                             f"{known}; the constraints did not hold")
    return carried, spares, standin


def wheel_list_text(carried: list[dict], spares: list[dict]) -> str:
    lines = ["# The wheels the GPU machine lacks, written by benchmarks/gpu/wheels.py from pyproject.toml and",
             "# benchmarks/gpu/device-packages.txt (do not edit by hand). run.sh installs them on the device with",
             "#   python3 -m pip install --no-index --find-links .whl -r benchmarks/gpu/wheels.txt",
             "# Each line: the exact version pip resolved for CPython 3.12 manylinux x86-64, and the wheel's SHA-256."]
    lines += [f"{package['name']}=={package['version']}  # sha256 {package['sha256']}" for package in carried]
    lines += ["# Spares, in .whl/ but not asked for: device packages of unknown version that a wheel above needs;",
              "# pip takes one only if the device's own copy is too old."]
    lines += [f"#   {package['name']}=={package['version']}  # sha256 {package['sha256']}" for package in spares]
    return "\n".join(lines) + "\n"


def wheel_name_matches(path: Path, package: dict) -> bool:
    name, version = path.name.split("-")[:2]
    return canonical(name) == package["name"] and version == package["version"]


def download(packages: list[dict], folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    wanted = [package for package in packages if not any(wheel_name_matches(path, package)
                                                          for path in folder.glob("*.whl"))]
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        *TARGET, "-d", str(folder),
                        *(f"{package['name']}=={package['version']}" for package in wanted)], check=True)
    # One version of each package: two would stop the whole install on the device.
    for path in folder.glob("*.whl"):
        if not any(wheel_name_matches(path, package) for package in packages):
            path.unlink()
    for package in packages:
        [path] = [path for path in folder.glob("*.whl") if wheel_name_matches(path, package)]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if package["sha256"] and digest != package["sha256"]:
            raise SystemExit(f"error: {path.name} has SHA-256 {digest}, not the index's {package['sha256']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="resolve only, and fail if wheels.txt differs")
    parser.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="folder for the wheels (default .whl)")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 12):
        print(f"warning: Python {sys.version.split()[0]} resolves environment markers as itself, not as the "
              "device's 3.12", file=sys.stderr)
    device = read_device_packages()
    requirements = project_requirements()
    carried, spares, standin = plan(resolve(requirements, device), device,
                                    [requirement_name(requirement) for requirement in requirements])
    text = wheel_list_text(carried, spares)
    if args.check:
        if WHEEL_LIST.read_text() != text:
            print("benchmarks/gpu/wheels.txt is out of date: run benchmarks/gpu/wheels.py", file=sys.stderr)
            return 1
        print("benchmarks/gpu/wheels.txt is current")
        return 0
    download(carried + spares, args.wheels)
    WHEEL_LIST.write_text(text)
    (args.wheels / STANDIN).write_text("".join(f"{package['name']}=={package['version']}\n" for package in standin))
    size = sum(path.stat().st_size for path in args.wheels.glob("*.whl"))
    print(f"{len(carried)} wheels carried, {len(spares)} spares, {size / 2 ** 20:.1f} MiB in {args.wheels}:")
    for package in carried:
        print(f"  {package['name']}=={package['version']}")
    for package in spares:
        print(f"  (spare) {package['name']}=={package['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
