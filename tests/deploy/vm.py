"""A booted Debian 12 systemd in a container (systemd-nspawn), for the deploy tests.

The rootfs is made once with debootstrap and cached as a zstd tarball outside the repo
(``$OLLAMA_LB_ROOTFS_CACHE``, default ``/var/cache/ollama-lb-test``); each run unpacks a fresh
copy. The container shares the host's network namespace, so the appliance inside reaches
simulated nodes the test runs on the host's loopback, and the test reaches the appliance.
Both --register=no and --keep-unit are needed: the host has no systemd or D-Bus.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

# What install.sh would otherwise fetch with apt-get (curl for the keepalived check script,
# keepalived for --ha, redis-server for --workers): baked in, so the tests need no mirror.
PACKAGES = ("systemd,systemd-sysv,dbus,procps,iproute2,python3,python3-venv,ca-certificates,"
            "curl,keepalived,redis-server")
# Units the packages enable that must not start in a container sharing the host's network:
# Debian's default Redis would listen on the host's 127.0.0.1:6379 (install.sh --workers
# disables it too when it installs the package itself).
DISABLED = ("redis-server.service",)
CACHE = Path(os.environ.get("OLLAMA_LB_ROOTFS_CACHE", "/var/cache/ollama-lb-test"))
# The name follows the package list, so a cache made from an older list is not reused.
_IMAGE = hashlib.sha256(f"{PACKAGES} {DISABLED}".encode()).hexdigest()[:10]
TARBALL = CACHE / f"bookworm-rootfs-{_IMAGE}.tar.zst"
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]


def why_not() -> str | None:
    """The reason this machine cannot run the deploy tests, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "zstd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install systemd-container debootstrap zstd)"
    return None


def apt_mirror() -> str:
    """The mirror this machine's own apt sources use (never a name written in the repo)."""
    for path in glob.glob("/etc/apt/sources.list.d/*.sources"):
        for line in Path(path).read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb ") and "security" not in line:
            return line.split()[1]
    raise RuntimeError("no apt mirror configured on this machine")


def ensure_rootfs_tarball() -> Path:
    if TARBALL.exists():
        return TARBALL
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / "rootfs.building"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                    str(work), apt_mirror()], check=True, capture_output=True, timeout=900)
    for unit in DISABLED:
        for link in work.glob(f"etc/systemd/system/*.wants/{unit}"):
            link.unlink()
    tmp = TARBALL.with_suffix(".tmp")
    subprocess.run(["tar", "--zstd", "-cf", str(tmp), "-C", str(work), "."], check=True,
                   timeout=300)
    tmp.rename(TARBALL)
    shutil.rmtree(work, ignore_errors=True)
    return TARBALL


class VM:
    """One booted container; ``run()`` executes a command inside it."""

    def __init__(self, root: Path, binds: dict[str, str], netns: str | None = None) -> None:
        """``netns``: a network namespace (``ip netns add``) for the container instead of the
        host's, with CAP_NET_ADMIN in it (keepalived adds its address; nspawn grants that
        only with --private-network, not with a namespace given by path)."""
        self.root = root
        root.mkdir(parents=True)
        subprocess.run(["tar", "--zstd", "-xf", str(ensure_rootfs_tarball()), "-C", str(root)],
                       check=True, timeout=300)
        args = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root)]
        args += [f"--bind-ro={host}:{guest}" for host, guest in binds.items()]
        if netns is not None:
            args += [f"--network-namespace-path=/run/netns/{netns}",
                     "--capability=CAP_NET_ADMIN"]
        self.log = open(root.parent / "console.log", "wb")  # noqa: SIM115
        self.nspawn = subprocess.Popen([*args, "--boot"], stdout=self.log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self._find_init()
        self.run("systemctl", "is-system-running", "--wait", timeout=60, check=False)

    def _find_init(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = subprocess.run(["pgrep", "-P", str(self.nspawn.pid)],
                                      capture_output=True, text=True).stdout.split()
            for pid in children:
                if Path(f"/proc/{pid}/root/run/systemd/private").exists():
                    return int(pid)
            if self.nspawn.poll() is not None:
                raise RuntimeError("the container exited while booting")
            time.sleep(0.1)
        raise RuntimeError("systemd did not come up in the container")

    def run(self, *cmd: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p",
                              "-r", "-w", *CLEAN_ENV, *cmd], capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}:\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-c", script, **kw)  # type: ignore[arg-type]

    def main_pid(self, unit: str = "ollama-lb") -> int:
        return int(self.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def read(self, path: str) -> str:
        return (self.root / path.lstrip("/")).read_text()

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.root / path.lstrip("/"))

    def stop(self) -> None:
        if self.nspawn.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
