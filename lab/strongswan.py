"""strongSwan's charon in a lab namespace: its own strongswan.conf, swanctl.conf, vici socket, log.

Debian 12's charon (5.9.8) reads STRONGSWAN_CONF for its settings, so every path is ours except
its pid file, hard-coded as /var/run/charon.pid: charon runs in the mount namespace `ip netns
exec` gives it, with a private tmpfs on /run, so two charons (one per namespace) never see each
other's. Plugins are listed (`charon.load`), not taken from /etc/strongswan.d, so a host's own
strongSwan configuration cannot change the lab; curve25519 comes from the openssl plugin of
libstrongswan-standard-plugins. Routes stay ours (install_routes = no): scenarios.py routes the
tunnel subnets. Children are grouped by IKE connection; each connection has its own identities
(`<conn>-left`/`<conn>-right`) so the responder picks the right one for each IKE SA.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ipsec_capture.errors import UserError

from .daemons import PSK, Child, side_dir, wait_for

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "/usr/sbin/swanctl"
PLUGIN_DIR = Path("/usr/lib/ipsec/plugins")
PLUGINS = ("random", "nonce", "openssl", "pem", "pkcs1", "x509", "pubkey", "kdf", "aes", "sha1", "sha2",
           "hmac", "gcm", "kernel-netlink", "socket-default", "vici")
IKE_PROPOSAL = "aes256-sha256-x25519"
PACKAGES = "strongswan-charon strongswan-swanctl libstrongswan-standard-plugins"


def _peer(side: str) -> str:
    return "right" if side == "left" else "left"


def strongswan_conf(d: Path) -> str:
    plugins = " ".join(p for p in PLUGINS if (PLUGIN_DIR / f"libstrongswan-{p}.so").exists())
    return f"""charon {{
  load = {plugins}
  install_routes = no
  install_virtual_ip = no
  retransmit_tries = 3
  plugins {{
    vici {{
      socket = unix://{d}/charon.vici
    }}
  }}
  filelog {{
    lab {{
      path = {d}/charon.log
      time_format = %T
      default = 1
      flush_line = yes
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
}}
swanctl {{
  load = pem pkcs1 x509 pubkey openssl random
  socket = unix://{d}/charon.vici
}}
"""


def swanctl_conf(side: str, children: list[Child]) -> str:
    """Both sides' connections mirror each other; only the left initiates (swanctl --initiate)."""
    peer = _peer(side)
    conns: dict[str, list[Child]] = {}
    for c in children:
        conns.setdefault(c.ike, []).append(c)
    out = ["connections {"]
    secrets = ["secrets {"]
    for name, kids in conns.items():
        first = kids[0]
        me = first.left_addr if side == "left" else first.right_addr
        them = first.right_addr if side == "left" else first.left_addr
        out += [f"  {name} {{", "    version = 2", f"    local_addrs = {me}", f"    remote_addrs = {them}",
                f"    proposals = {IKE_PROPOSAL}", f"    encap = {'yes' if first.natt else 'no'}",
                "    unique = never", "    dpd_delay = 0", "    rekey_time = 0", "    reauth_time = 0",
                f"    local {{\n      auth = psk\n      id = {name}-{side}\n    }}",
                f"    remote {{\n      auth = psk\n      id = {name}-{peer}\n    }}", "    children {"]
        for c in kids:
            out += [f"      {c.name} {{", f"        mode = {c.mode}",
                    f"        esp_proposals = {c.strongswan_esp}",
                    f"        local_ts = {c.ts(side)}", f"        remote_ts = {c.ts(peer)}",
                    "        start_action = none", "        dpd_action = none", "        rekey_time = 0",
                    "      }"]
        out += ["    }", "  }"]
        secrets += [f"  ike-{name} {{", f"    id-1 = {name}-left", f"    id-2 = {name}-right",
                    f'    secret = "{PSK}"', "  }"]
    return "\n".join([*out, "}", *secrets, "}", ""])


class StrongSwan:
    name = "strongswan"

    def _swanctl(self, prefix: str, side: str, *args: str, timeout: float = 60) -> str:
        d = side_dir(prefix, side)
        env = {**os.environ, "STRONGSWAN_CONF": str(d / "strongswan.conf")}
        try:
            p = subprocess.run([SWANCTL, *args, "--uri", f"unix://{d}/charon.vici"], capture_output=True,
                               text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"strongSwan ({side}): swanctl {' '.join(args)} took over {timeout:.0f} s; "
                            f"see {d}/charon.log") from None
        if p.returncode != 0:
            tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
            raise UserError(f"strongSwan ({side}): swanctl {' '.join(args)} failed: {tail}; "
                            f"see {d}/charon.log")
        return p.stdout

    def prepare(self, prefix: str, children: list[Child]) -> None:
        if not (os.path.exists(CHARON) and os.path.exists(SWANCTL)):
            raise UserError(f"strongSwan is not installed: apt-get install {PACKAGES} (./dev.sh setup)")
        for side in ("left", "right"):
            d = side_dir(prefix, side)
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            (d / "strongswan.conf").write_text(strongswan_conf(d))
            fd = os.open(d / "swanctl.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(swanctl_conf(side, children))

    def start(self, prefix: str, side: str, netns: str) -> int:
        d = side_dir(prefix, side)
        (d / "charon.vici").unlink(missing_ok=True)
        env = {**os.environ, "STRONGSWAN_CONF": str(d / "strongswan.conf")}
        with open(d / "charon.out", "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, "sh", "-c", f"mount -t tmpfs lab-run /run && exec {CHARON}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)

        def answers() -> bool:
            if proc.poll() is not None:
                raise UserError(f"strongSwan ({side}): charon exited {proc.returncode}; "
                                f"see {d}/charon.log and {d}/charon.out")
            return (d / "charon.vici").exists()

        wait_for(answers, f"charon in {netns} opening its vici socket")
        self._swanctl(prefix, side, "--load-all", "--file", str(d / "swanctl.conf"))
        return proc.pid

    def initiate(self, prefix: str, children: list[Child]) -> None:
        for c in children:
            self._swanctl(prefix, "left", "--initiate", "--child", c.name, "--timeout", "30", timeout=60)

    def rekey(self, prefix: str, child: Child) -> None:
        self._swanctl(prefix, "left", "--rekey", "--child", child.name)

    def terminate(self, prefix: str, children: list[Child]) -> None:
        """Forget the left's IKE SAs without waiting for the peer (it may be gone)."""
        for ike in dict.fromkeys(c.ike for c in children):
            self._swanctl(prefix, "left", "--terminate", "--ike", ike, "--force")
