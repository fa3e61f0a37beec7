"""Certificates for the TLS tests, made by the ``openssl`` command (a test CA, leaves it signs).

Each call makes fresh keys (EC P-256: fast), valid for a day, with the SANs a loopback test
needs (``IP:127.0.0.1``, ``DNS:localhost``), so the clients verify hostnames as they would in
production instead of turning verification off.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")
WHY_NOT = None if OPENSSL else "the openssl command is not installed (apt-get install openssl)"


def _run(*args: str, cwd: Path) -> None:
    out = subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@dataclass(frozen=True)
class Ca:
    """A certificate authority: ``ca.pem`` verifies what ``issue`` signs."""

    dir: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.dir / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.dir / f"{self.name}.key"

    def issue(self, name: str, *, client: bool = False, cn: str = "localhost"
              ) -> tuple[Path, Path]:
        """(cert, key) for a server (SANs for loopback) or a client (clientAuth)."""
        ext = self.dir / f"{name}.ext"
        usage = "clientAuth" if client else "serverAuth"
        san = "" if client else "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        ext.write_text(f"{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       f"extendedKeyUsage={usage}\n")
        cert, key, csr = (self.dir / f"{name}{s}" for s in (".pem", ".key", ".csr"))
        _run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr),
             cwd=self.dir)
        _run("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
             "-set_serial", str(abs(hash((name, cert))) % 2**63), "-days", "1",
             "-extfile", str(ext), "-out", str(cert), cwd=self.dir)
        return cert, key


def make_ca(directory: Path, name: str = "ca") -> Ca:
    directory.mkdir(parents=True, exist_ok=True)
    ca = Ca(directory, name)
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN=ollama-lb test {name}", "-days", "1",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", str(ca.key), "-out", str(ca.cert), cwd=directory)
    return ca
