"""Libreswan's pluto in a lab namespace, run from its unpacked Debian package.

Debian 12's `libreswan` (4.10) conflicts with strongswan-charon in apt, so one machine cannot
install both: dev.sh unpacks the package (and the libraries this machine lacks) into a private
root, LIBRESWAN_ROOT, with `apt-get download` + `dpkg-deb -x`. pluto takes every path as an
option (config, secrets, NSS db, ipsec dir, run dir, log) and finds its libraries through
LD_LIBRARY_PATH; the one path it cannot be told, the `/usr/libexec/ipsec/addconn` it runs at
start-up, comes from an overlay of the private root's /usr/libexec on /usr/libexec in the mount
namespace `ip netns exec` gives it (with a private /run too). whack drives it over its control
socket.

Facts of 4.10 this follows: the NSS db must exist even for PSK; as a responder pluto adds no
child with other ESP proposals to an existing IKE SA (NO_PROPOSAL_CHOSEN), so every child is its
own connection and IKE SA; the updown script is /bin/true (scenarios.py routes the subnets;
the default resolves to strongSwan's /usr/lib/ipsec/_updown here); `esn=either` (the default)
ends in ESN between two plutos, so each child says esn=yes or no; every SA gets a replay state
(window 128); two conns between the same addresses confuse the responder (daemons.NATT_V4).
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

from ipsec_capture.errors import UserError

from .daemons import PSK, Child, side_dir, wait_for

LIBRESWAN_ROOT = Path(os.environ.get("IPSEC_CAPTURE_LIBRESWAN_ROOT", "/var/cache/ipsec-capture/libreswan"))
IKE_PROPOSAL = "aes256-sha2_256-dh31"  # dh31: curve25519


def root() -> Path:
    if not (LIBRESWAN_ROOT / "usr/libexec/ipsec/pluto").exists():
        raise UserError(f"Libreswan is not unpacked in {LIBRESWAN_ROOT}: run ./dev.sh setup (it runs "
                        "apt-get download libreswan and its libraries, then dpkg-deb -x; Debian's libreswan "
                        "conflicts with strongSwan, so it is not installed)")
    return LIBRESWAN_ROOT


def lib_env() -> dict[str, str]:
    libs = [*glob.glob(str(root() / "usr/lib/*-linux-gnu")), str(root() / "usr/lib")]
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(libs)}


def ipsec_conf(children: list[Child]) -> str:
    """One conn per child (pluto's responder wants one IKE SA per ESP proposal set); the same file
    serves both sides: pluto finds which side it is from its own interface addresses."""
    out = ["config setup", "  uniqueids=no", ""]
    for c in children:
        out += [f"conn {c.name}", "  ikev2=yes", "  authby=secret", f"  ike={IKE_PROPOSAL}",
                f"  esp={c.libreswan_esp}", f"  esn={'yes' if c.esn else 'no'}", f"  type={c.mode}",
                f"  left={c.left_addr}", f"  leftid=@{c.name}-left", f"  right={c.right_addr}",
                f"  rightid=@{c.name}-right", f"  encapsulation={'yes' if c.natt else 'no'}",
                "  dpddelay=0", "  leftupdown=/bin/true", "  rightupdown=/bin/true", "  auto=add"]
        if c.mode == "tunnel":
            out += [f"  leftsubnet={c.left_net}", f"  rightsubnet={c.right_net}"]
        out.append("")
    return "\n".join(out)


def ipsec_secrets(children: list[Child]) -> str:
    return "".join(f'@{c.name}-left @{c.name}-right : PSK "{PSK}"\n' for c in children)


class Libreswan:
    name = "libreswan"

    def _whack(self, prefix: str, side: str, *args: str, timeout: float = 60) -> str:
        d = side_dir(prefix, side)
        argv = [str(root() / "usr/libexec/ipsec/whack"), "--ctlsocket", str(d / "run/pluto.ctl"), *args]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, env=lib_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"Libreswan ({side}): whack {' '.join(args)} took over {timeout:.0f} s; "
                            f"see {d}/pluto.log") from None
        if p.returncode != 0:
            tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
            raise UserError(f"Libreswan ({side}): whack {' '.join(args)} exited {p.returncode}: {tail}; "
                            f"see {d}/pluto.log")
        return p.stdout

    def prepare(self, prefix: str, children: list[Child]) -> None:
        certutil = str(root() / "usr/bin/certutil")
        for side in ("left", "right"):
            d = side_dir(prefix, side)
            (d / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
            (d / "nss").mkdir(mode=0o700, exist_ok=True)
            (d / "ipsec.conf").write_text(ipsec_conf(children))
            fd = os.open(d / "ipsec.secrets", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ipsec_secrets(children))
            p = subprocess.run([certutil, "-N", "-d", f"sql:{d / 'nss'}", "--empty-password"],
                               capture_output=True, text=True, env=lib_env())
            if p.returncode != 0:
                raise UserError(f"Libreswan ({side}): cannot create its NSS db: {p.stderr.strip()}")

    def start(self, prefix: str, side: str, netns: str) -> int:
        d = side_dir(prefix, side)
        r = root()
        (d / "run/pluto.ctl").unlink(missing_ok=True)
        pluto = (f"{r}/usr/libexec/ipsec/pluto --nofork --config {d}/ipsec.conf "
                 f"--secretsfile {d}/ipsec.secrets --nssdir {d}/nss --ipsecdir {d} --rundir {d}/run "
                 f"--dumpdir {d}/run --logfile {d}/pluto.log --no-dnssec")
        script = (f"mount -t overlay lab-libexec -o lowerdir={r}/usr/libexec:/usr/libexec /usr/libexec && "
                  f"mount -t tmpfs lab-run /run && exec {pluto}")
        with open(d / "pluto.out", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", netns, "sh", "-c", script],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=lib_env(),
                                    start_new_session=True)

        def answers() -> bool:
            if proc.poll() is not None:
                raise UserError(f"Libreswan ({side}): pluto exited {proc.returncode}; "
                                f"see {d}/pluto.log and {d}/pluto.out")
            return (d / "run/pluto.ctl").exists()

        wait_for(answers, f"pluto in {netns} opening its control socket")
        p = subprocess.run([f"{r}/usr/libexec/ipsec/addconn", "--ctlsocket", f"{d}/run/pluto.ctl", "--config",
                            f"{d}/ipsec.conf", "--autoall"], capture_output=True, text=True, env=lib_env(),
                           timeout=60)
        if p.returncode != 0:
            raise UserError(f"Libreswan ({side}): addconn failed: {(p.stderr or p.stdout).strip()}")
        self._whack(prefix, side, "--listen")
        return proc.pid

    def initiate(self, prefix: str, children: list[Child]) -> None:
        for c in children:
            self._whack(prefix, "left", "--name", c.name, "--initiate")

    def rekey(self, prefix: str, child: Child) -> None:
        self._whack(prefix, "left", "--name", child.name, "--rekey-ipsec")

    def terminate(self, prefix: str, children: list[Child]) -> None:
        for c in children:
            self._whack(prefix, "left", "--name", c.name, "--terminate")
