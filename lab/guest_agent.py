"""The lab VM's command loop: runs inside the guest, one command at a time, over a virtio port.

The host boots the VM once and sends many commands, so booting (10+ s under TCG) is paid once per
session. Frames are JSON lines both ways; output is base64 so any bytes survive:

    host -> guest  {"op": "run", "argv": [...], "env": {...}, "cwd": "/", "timeout": 60}
                   {"op": "kill"}        (stop the running command)
                   {"op": "shutdown"}    (exit; the guest's init then powers the VM off)
    guest -> host  {"t": "ready", "uptime": 9.8}
                   {"t": "out" | "err", "d": "<base64>"}
                   {"t": "exit", "rc": 0, "timed_out": false}

Standard library only: it runs on the host's /usr/bin/python3, seen read-only over 9p.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time

PORT_NAME = "ipsec-capture-agent"
VPORT_SYSFS = "/sys/class/virtio-ports"
# After the command exits, how long to keep reading output that its children still write.
DRAIN_SECONDS = 0.5


def find_port(name: str = PORT_NAME) -> str:
    """/dev path of the virtio port that QEMU named `name` (no udev in the guest)."""
    for _ in range(100):
        try:
            for vport in os.listdir(VPORT_SYSFS):
                with open(f"{VPORT_SYSFS}/{vport}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{vport}"
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"guest_agent: no virtio port named {name}")


class Agent:
    """Reads requests from the port fd, runs them, streams frames back."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.inbuf = b""

    def send(self, frame: dict) -> None:
        data = json.dumps(frame, separators=(",", ":")).encode() + b"\n"
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def read_frames(self) -> list[dict]:
        """Whatever complete frames are available now; [] with EOF raises SystemExit."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            time.sleep(0.05)  # host side not connected: a virtio port reads 0
            return []
        self.inbuf += chunk
        frames = []
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                frames.append(json.loads(line))
        return frames

    def loop(self) -> None:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        self.send({"t": "ready", "uptime": uptime})
        while True:
            for req in self.read_frames():
                op = req.get("op")
                if op == "run":
                    self.run(req)
                elif op == "shutdown":
                    self.send({"t": "bye"})
                    return

    def run(self, req: dict) -> None:
        env = dict(req.get("env") or {})
        try:
            proc = subprocess.Popen(
                req["argv"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=req.get("cwd") or "/", env=env, start_new_session=True,
            )
        except OSError as err:
            self.send({"t": "err", "d": base64.b64encode(f"{err}\n".encode()).decode()})
            self.send({"t": "exit", "rc": 127, "timed_out": False})
            return
        timeout = req.get("timeout")
        deadline = time.monotonic() + timeout if timeout else None
        assert proc.stdout is not None and proc.stderr is not None  # both are PIPEs
        stdout, stderr = proc.stdout, proc.stderr
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ, "out")
        sel.register(stderr, selectors.EVENT_READ, "err")
        sel.register(self.fd, selectors.EVENT_READ, "ctl")
        timed_out = killed = False
        exited_at: float | None = None
        open_pipes = 2
        while open_pipes:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > DRAIN_SECONDS:
                break  # a background child keeps the pipe open: do not wait for it
            if deadline is not None and now > deadline and not killed:
                timed_out = killed = True
                self.kill(proc)
            for key, _ in sel.select(timeout=0.1):
                if key.data == "ctl":
                    for ctl in self.read_frames():
                        if ctl.get("op") == "kill" and not killed:
                            killed = True
                            self.kill(proc)
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_pipes -= 1
                    continue
                self.send({"t": key.data, "d": base64.b64encode(data).decode()})
        sel.close()
        stdout.close()
        stderr.close()
        rc = proc.wait()
        self.send({"t": "exit", "rc": rc, "timed_out": timed_out})

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the command's whole process group (it was started in its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    port = sys.argv[1] if len(sys.argv) > 1 else find_port()
    fd = os.open(port, os.O_RDWR)
    Agent(fd).loop()


if __name__ == "__main__":
    main()
