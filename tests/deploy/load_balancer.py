"""Running deploy/nginx.conf on this machine, in front of servers on loopback ports.

Only Docker's DNS parts are swapped: the `resolver` line and the `resolve` flags go (Debian's nginx 1.22
predates `resolve` on upstream servers, and there is no 127.0.0.11 here), and the service names become
127.0.0.1 ports. The routing, limits and headers are the committed ones."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.deploy.compose_model import REPO_ROOT
from tests.support.net import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)


def render(config: str, listen: int, api: int, replica: int, control: int) -> str:
    config = re.sub(r"^\s*resolver .*;\n", "", config, flags=re.MULTILINE)
    config = config.replace(" resolve;", ";")
    config = config.replace("server api:8000", f"server 127.0.0.1:{api}")
    config = config.replace("server api-replica:8000", f"server 127.0.0.1:{replica}")
    config = config.replace("server control:8001", f"server 127.0.0.1:{control}")
    return config.replace("listen 8000;", f"listen 127.0.0.1:{listen};")


@contextmanager
def running_nginx(directory: Path, api_port: int, replica_port: int, control_port: int) -> Iterator[str]:
    """nginx with the rendered config, until it answers /lb-healthz; yields its URL."""
    assert NGINX is not None, "nginx is not installed"
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(render((REPO_ROOT / "deploy" / "nginx.conf").read_text(), port, api_port, replica_port,
                             control_port))
    base = [NGINX, "-p", str(directory), "-c", str(config)]
    globals_ = f"pid {directory}/nginx.pid; error_log {directory}/error.log;"
    checked = subprocess.run([*base, "-t", "-g", globals_], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen([*base, "-g", f"daemon off; {globals_}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/lb-healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (directory / "error.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
