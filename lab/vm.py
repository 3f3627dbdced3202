"""The kernel lab VM: Debian's distro kernel under QEMU, booted once, running many commands.

Hosts and CI runners whose kernel lacks ESP (or kprobes) still need to prove the product against
a real IPsec stack. QEMU boots an installed /boot/vmlinuz-* (by default Debian 12's 6.1, with ESP,
GCM, KPROBES, BTF; `kernel=` or $IPSEC_CAPTURE_LAB_KERNEL picks another, e.g. backports' 6.12)
over the host's own root, shared read-only by virtio-9p, so the guest sees
the same Python, venv, iproute2, nft, tshark and kernel modules as the host. Writes in the guest
land in tmpfs overlays, except in `rw` directories, which are the host's own.

A guest agent (guest_agent.py, on the host's python3) reads commands from a virtio-serial port
whose host end is a unix socket we listen on, and streams back stdout/stderr and the exit code,
so one boot (10-15 s under TCG) serves a whole test session.

    with LabVM(memory="2G", cpus=2, rw=["/tmp/out"]) as vm:
        r = vm.run("uname -r", timeout=30)
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ipsec_capture.errors import UserError

AGENT = Path(__file__).with_name("guest_agent.py")
PORT_NAME = "ipsec-capture-agent"
# Modules the initramfs loads before the host root can be mounted (9p over virtio-pci), plus the
# agent's virtio port and overlayfs, which saves two slow modprobe execs under TCG.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_console", "overlay")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# PID 1 inside the initramfs (busybox): mount the host root and hand over to stage 2.
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "lab-init: insmod $m failed"; done
die() {{ echo "lab-init: $1"; echo o > /proc/sysrq-trigger; }}
mount -t 9p -o {NINEP_OPTS},cache=loose,ro hostroot /newroot || die "cannot mount the host root"
mount -t tmpfs -o mode=755 run /newroot/run
mkdir -p /newroot/run/lab
mount -t 9p -o {NINEP_OPTS},cache=none labctl /newroot/run/lab || die "cannot mount the control dir"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/bash /run/lab/stage2.sh
"""

# Stage 2, on the host's read-only root: writable overlays, rw shares, then the agent.
STAGE2_SCRIPT = """#!/bin/bash
export PATH={path} HOME=/root TERM=dumb LANG=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs shm /dev/shm
ln -sf /proc/self/fd /dev/fd
mount -t debugfs debugfs /sys/kernel/debug; mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup
for d in /tmp /etc /var /root /home; do
  n=${{d//\\//_}}; mkdir -p /run/ovl/$n/u /run/ovl/$n/w
  mount -t overlay -o lowerdir=$d,upperdir=/run/ovl/$n/u,workdir=/run/ovl/$n/w ovl$n $d
done
mkdir -p /var/tmp /var/log /run/netns; mount -t tmpfs vartmp /var/tmp
while IFS=$'\\t' read -r tag dir; do
  mkdir -p "$dir" && mount -t 9p -o {ninep},cache=none "$tag" "$dir"
done < /run/lab/rwdirs
hostname lab; ip link set lo up
{python} -S -u {agent}
echo "lab: agent exited rc=$?" > /dev/kmsg
sync
echo o > /proc/sysrq-trigger
"""


class VMError(UserError):
    """The VM could not boot, died, or stopped answering."""


@dataclass(slots=True)
class Result:
    """A guest command's outcome; rc is 124 when it was killed for its timeout."""

    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0


class CommandFailed(VMError):
    def __init__(self, cmd: str, result: Result) -> None:
        self.result = result
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"in the lab VM, `{cmd}` exited {result.rc}: {' | '.join(tail)}")


# Debian 12's own kernel line: what `lab vm` boots unless asked for another (other kernels, e.g.
# bookworm-backports' 6.12, are picked by version or path: IPSEC_CAPTURE_LAB_KERNEL or --kernel).
DEFAULT_KERNEL = "6.1"
KERNEL_ENV = "IPSEC_CAPTURE_LAB_KERNEL"


def _version_key(path: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", path)]


def lab_kernels() -> list[Path]:
    """Installed /boot/vmlinuz-* with ESP modules (a lab can run on them), newest first."""
    found = []
    for path in sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key, reverse=True):
        kver = path.removeprefix("/boot/vmlinuz-")
        if glob.glob(f"/lib/modules/{kver}/kernel/net/ipv4/esp4.ko*") and os.access(path, os.R_OK):
            found.append(Path(path))
    return found


def find_kernel(choice: str | None = None) -> Path:
    """The lab kernel: `choice` (or $IPSEC_CAPTURE_LAB_KERNEL) as a path to a vmlinuz, or as a
    version such as `6.12` or `6.1.0-57-amd64` (the newest installed kernel of that line); by
    default Debian 12's 6.1 (DEFAULT_KERNEL), so installing a backports kernel changes nothing
    for anyone who did not ask for it."""
    choice = choice or os.environ.get(KERNEL_ENV) or None
    if choice and ("/" in choice or os.path.exists(choice)):
        if not os.access(choice, os.R_OK):
            raise VMError(f"lab kernel {choice} does not exist or is not readable")
        return Path(choice)
    kernels = lab_kernels()
    if not kernels:
        raise VMError("no lab kernel: install Debian's linux-image-amd64 (./dev.sh setup)")
    line = choice or DEFAULT_KERNEL
    # `6.1` is the 6.1 line (6.1.0-57-amd64), never 6.12: the version must end or go on with . - +
    series = re.compile(re.escape(line) + r"($|[.+-])")
    for path in kernels:
        if series.match(path.name.removeprefix("vmlinuz-")):
            return path
    if choice:
        have = ", ".join(p.name.removeprefix("vmlinuz-") for p in kernels)
        raise VMError(f"no lab kernel {choice!r} installed (have: {have}); ./dev.sh setup installs "
                      "6.1 and bookworm-backports' 6.12")
    return kernels[0]  # not a Debian 12 machine: its newest kernel with ESP


def kvm_usable() -> bool:
    """True only for real hardware virtualisation; PVM's /dev/kvm cannot run a stock kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))


def cache_dir(kver: str) -> Path:
    base = os.environ.get("IPSEC_CAPTURE_LAB_CACHE") or (
        "/var/cache/ipsec-capture/lab" if os.geteuid() == 0
        else os.path.expanduser("~/.cache/ipsec-capture/lab"))
    path = Path(base) / kver
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpio_entry(out: io.BufferedIOBase, ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> None:
    """One 'newc' cpio header + name + data, each padded to 4 bytes (the initramfs format)."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
    out.write(head + b"\0" * (-len(head) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def build_initramfs(kver: str, cache: Path) -> Path:
    """busybox + the 9p/virtio modules + our init, cached under a hash of what went in."""
    busybox = "/bin/busybox"  # busybox-static's: the initramfs has no libc
    if not os.path.exists(busybox):
        raise VMError("busybox-static is missing: run ./dev.sh setup (apt-get install busybox-static)")
    dep = subprocess.run(["modprobe", "-S", kver, "-a", "--show-depends", *INITRAMFS_MODULES],
                         capture_output=True, text=True)
    if dep.returncode != 0:
        raise VMError(f"cannot resolve the initramfs modules for {kver}: {dep.stderr.strip()}")
    mods: list[str] = []
    for line in dep.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "insmod" and parts[1] not in mods:
            mods.append(parts[1])
    digest = hashlib.sha256((INIT_SCRIPT + "\n".join(mods)).encode()).hexdigest()[:12]
    target = cache / f"initramfs-{digest}.cpio.gz"
    if target.exists():
        return target
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with gzip.open(tmp, "wb", compresslevel=1) as out:
        ino = iter(range(1, 10_000))
        for d in ("bin", "dev", "mods", "proc", "sys", "newroot"):
            _cpio_entry(out, next(ino), d, 0o40755)
        _cpio_entry(out, next(ino), "dev/console", 0o20600, rdev=(5, 1))
        _cpio_entry(out, next(ino), "bin/busybox", 0o100755, Path(busybox).read_bytes())
        _cpio_entry(out, next(ino), "init", 0o100755, INIT_SCRIPT.encode())
        names = [os.path.basename(m) for m in mods]
        for path, name in zip(mods, names, strict=True):
            _cpio_entry(out, next(ino), f"mods/{name}", 0o100644, Path(path).read_bytes())
        _cpio_entry(out, next(ino), "mods/order", 0o100644, "\n".join(names).encode() + b"\n")
        _cpio_entry(out, next(ino), "TRAILER!!!", 0)
    tmp.rename(target)
    return target


def bzimage_payload(blob: bytes) -> bytes:
    """The compressed kernel inside a bzImage, cut out by its boot header (payload_offset and
    payload_length at 0x248, after the setup sectors), or the whole blob if it has no such header."""
    if len(blob) < 0x250 or blob[0x202:0x206] != b"HdrS":
        return blob
    setup = (blob[0x1F1] or 4) + 1
    offset, length = struct.unpack_from("<II", blob, 0x248)
    start = setup * 512 + offset
    return blob[start:start + length] if length and start + length <= len(blob) else blob


def _unzstd(payload: bytes) -> bytes:
    """zstd (6.12's compression): the kernel appends the uncompressed size (4 bytes, LE) to the
    frame, which the `zstd` tool would call trailing garbage, so it is cut off and checked."""
    if shutil.which("zstd") is None:
        raise OSError("the zstd tool is missing: apt-get install zstd (./dev.sh setup)")
    size = struct.unpack("<I", payload[-4:])[0]
    proc = subprocess.run(["zstd", "-d", "-c", "-q"], input=payload[:-4], capture_output=True)
    if proc.returncode != 0 or len(proc.stdout) != size:
        raise OSError(f"zstd: {proc.stderr.decode(errors='replace').strip() or 'wrong size'}")
    return proc.stdout


_UNPACK: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),  # 6.1
    (b"\x28\xb5\x2f\xfd", _unzstd),  # 6.12
    (b"\x1f\x8b\x08\x00", lambda b: gzip.GzipFile(fileobj=io.BytesIO(b)).read()),
)


def extract_vmlinux(kernel: Path, cache: Path) -> Path | None:
    """The uncompressed ELF inside a bzImage, for QEMU's PVH entry (skips firmware + unpacking):
    xz (Debian's 6.1), zstd (6.12) or gzip."""
    target = cache / "vmlinux"
    if target.exists() and target.stat().st_mtime >= kernel.stat().st_mtime:
        return target
    blob = bzimage_payload(kernel.read_bytes())
    for magic, unpack in _UNPACK:
        at = blob.find(magic)
        if at < 0:
            continue
        try:
            elf = unpack(blob[at:])
        except (lzma.LZMAError, OSError, EOFError, struct.error):
            continue
        if elf[:4] == b"\x7fELF":
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(elf)
            tmp.rename(target)
            return target
    return None  # unknown compression: boot the bzImage instead (a few seconds slower)


def kernel_elf(choice: str = DEFAULT_KERNEL) -> Path:
    """The uncompressed vmlinux of a lab kernel (cached): its .BTF section is what bpf/build.py
    makes vmlinux.h from (dev.sh: Debian 12's 6.1, whatever else is installed)."""
    kernel = find_kernel(choice)
    elf = extract_vmlinux(kernel, cache_dir(kernel.name.removeprefix("vmlinuz-")))
    if elf is None:
        raise VMError(f"cannot unpack {kernel} (not xz, zstd or gzip)")
    return elf


def venv_bin() -> str | None:
    """The running project's venv bin dir, so `ipsec-capture` resolves the same in the guest."""
    if sys.prefix != sys.base_prefix:
        return os.path.join(sys.prefix, "bin")
    return None


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _pdeathsig() -> None:
    """QEMU dies with us even if we are SIGKILLed (no orphaned 2 GB VM)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class LabVM:
    """One QEMU guest, booted by start(), commands by run(), gone after stop()."""

    def __init__(self, memory: str = "2G", cpus: int = 2, rw: Sequence[str | os.PathLike] = (),
                 kernel: str | os.PathLike | None = None, boot_timeout: float = 180,
                 accel: str = "auto") -> None:
        self.memory = memory
        self.cpus = cpus
        self.rw = [os.path.realpath(p) for p in rw]
        self.kernel_choice = os.fspath(kernel) if kernel else None  # a path or a version (find_kernel)
        self.kernel: Path | None = None  # the vmlinuz booted, once started
        self.boot_timeout = boot_timeout
        self.accel = accel
        self.boot_seconds = 0.0
        self.guest_uptime_at_ready = 0.0
        self._proc: subprocess.Popen | None = None
        self._ctl: str | None = None
        self._sock: socket.socket | None = None
        self._buf = b""

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> LabVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._sock is not None

    def start(self) -> LabVM:
        if shutil.which("qemu-system-x86_64") is None:
            raise VMError("qemu-system-x86_64 is missing: run ./dev.sh setup "
                          "(apt-get install qemu-system-x86)")
        kernel = self.kernel = find_kernel(self.kernel_choice)
        kver = kernel.name.removeprefix("vmlinuz-")
        if not os.path.isdir(f"/lib/modules/{kver}"):
            raise VMError(f"/lib/modules/{kver} is missing: reinstall linux-image-{kver}")
        cache = cache_dir(kver)
        initrd = build_initramfs(kver, cache)
        image = extract_vmlinux(kernel, cache) or kernel
        try:
            self._ctl = tempfile.mkdtemp(prefix="ipsec-capture-vm-")
            argv = self._qemu_argv(image, initrd)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(os.path.join(self._ctl, "agent.sock"))
                listener.listen(1)
                t0 = time.monotonic()
                with open(os.path.join(self._ctl, "qemu.err"), "wb") as qemu_err:
                    self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=qemu_err, preexec_fn=_pdeathsig)
                deadline = t0 + self.boot_timeout
                self._sock = self._accept(listener, deadline)
            finally:
                listener.close()
            ready = self._frame(deadline)
            if ready is None or ready.get("t") != "ready":
                raise VMError(f"the lab VM did not boot within {self.boot_timeout:.0f} s; "
                              f"console tail:\n{self.console_tail()}")
            self.boot_seconds = time.monotonic() - t0
            self.guest_uptime_at_ready = float(ready.get("uptime", 0.0))
        except BaseException:
            self.stop()
            raise
        return self

    def _qemu_argv(self, image: Path, initrd: Path) -> list[str]:
        assert self._ctl is not None
        ctl = self._ctl
        with open(os.path.join(ctl, "rwdirs"), "w") as f:
            for i, d in enumerate(self.rw):
                os.makedirs(d, exist_ok=True)
                f.write(f"rw{i}\t{d}\n")
        python = os.path.realpath("/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                                  else sys.executable)
        Path(ctl, "stage2.sh").write_text(STAGE2_SCRIPT.format(
            path=GUEST_PATH, ninep=NINEP_OPTS, python=shlex.quote(python), agent=shlex.quote(str(AGENT))))
        use_kvm = self.accel == "kvm" or (self.accel == "auto" and kvm_usable())
        accel = ["-machine", "pc,accel=kvm", "-cpu", "host"] if use_kvm else ["-machine", "pc,accel=tcg",
                                                                               "-cpu", "max"]
        append = ("console=ttyS0 panic=-1 rdinit=/init init_on_alloc=0 mitigations=off "
                  "random.trust_cpu=on printk.time=1 quiet loglevel=4")
        argv = ["qemu-system-x86_64", *accel, "-smp", str(self.cpus), "-m", self.memory,
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(image), "-initrd", str(initrd), "-append", append,
                "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-fsdev", f"local,id=labctl,path={ctl},security_model=none,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=labctl,mount_tag=labctl",
                "-chardev", f"file,id=con,path={ctl}/console.log", "-serial", "chardev:con",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={ctl}/agent.sock",
                "-device", f"virtserialport,chardev=agent,name={PORT_NAME}"]
        for i, d in enumerate(self.rw):
            argv += ["-fsdev", f"local,id=rw{i},path={d},security_model=none,multidevs=remap",
                     "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}"]
        return argv

    def _accept(self, listener: socket.socket, deadline: float) -> socket.socket:
        listener.settimeout(0.2)
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                conn, _ = listener.accept()
                return conn
            except TimeoutError:
                continue
        raise VMError(f"the lab VM did not boot within {self.boot_timeout:.0f} s (QEMU never connected "
                      f"the agent port; qemu: {self._qemu_err()}); console tail:\n{self.console_tail()}")

    def stop(self) -> None:
        """Shut the guest down (kill QEMU if it dawdles) and remove every temp file."""
        proc, self._proc = self._proc, None
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(b'{"op":"shutdown"}\n')
        if proc is not None:
            try:
                proc.wait(timeout=10 if sock is not None else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if sock is not None:
            sock.close()
        if self._ctl is not None:
            shutil.rmtree(self._ctl, ignore_errors=True)
            self._ctl = None

    # ---------------------------------------------------------------- commands
    def run(self, cmd: str | Sequence[str], timeout: float = 300, check: bool = False,
            env: dict[str, str] | None = None, cwd: str | None = None,
            on_output: Callable[[str, bytes], None] | None = None) -> Result:
        """Run `cmd` in the guest (a string goes to bash -c) and wait for it.

        on_output(stream, chunk) sees output as it arrives ("out"/"err"). A command past its
        timeout is SIGKILLed in the guest (with its process group) and gives rc 124; the VM stays up.
        """
        if not self.running:
            raise VMError("the lab VM is not running (start() it first)")
        argv = ["/bin/bash", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        genv = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        if venv_bin():
            genv["PATH"] = f"{venv_bin()}:{GUEST_PATH}"
        genv.update(env or {})
        cwd = cwd or str(project_root())
        req = {"op": "run", "argv": argv, "env": genv, "cwd": cwd, "timeout": timeout}
        t0 = time.monotonic()
        self._send(req)
        out, err = bytearray(), bytearray()
        # The guest enforces `timeout`; ours is a backstop for a guest that stopped answering.
        deadline = t0 + timeout + 30
        kill_sent = False
        try:
            while True:
                frame = self._frame(deadline)
                if frame is None:
                    if not kill_sent:
                        self._send({"op": "kill"})
                        kill_sent, deadline = True, time.monotonic() + 15
                        continue
                    self.stop()
                    raise VMError(f"the lab VM stopped answering during `{cmd}`; VM stopped")
                kind = frame.get("t")
                if kind in ("out", "err"):
                    chunk = base64.b64decode(frame["d"])
                    (out if kind == "out" else err).extend(chunk)
                    if on_output is not None:
                        on_output(kind, chunk)
                elif kind == "exit":
                    timed_out = bool(frame.get("timed_out"))
                    result = Result(rc=124 if timed_out else int(frame["rc"]),
                                    stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
                                    timed_out=timed_out, seconds=time.monotonic() - t0)
                    break
        except KeyboardInterrupt:
            self._send({"op": "kill"})
            raise
        if check and result.rc != 0:
            raise CommandFailed(cmd if isinstance(cmd, str) else shlex.join(argv), result)
        return result

    # ---------------------------------------------------------------- wire
    def _send(self, frame: dict) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(json.dumps(frame).encode() + b"\n")
        except OSError as err:
            raise VMError(f"lost the lab VM's agent ({err}); console tail:\n{self.console_tail()}") from err

    def _frame(self, deadline: float) -> dict | None:
        """The next frame from the guest, None at the deadline; VMError if the guest is gone."""
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(262144)
            except TimeoutError:
                self._check_alive()
                continue
            if not chunk:
                self._check_alive(wait=2.0)
                raise VMError(f"the lab VM closed the agent port; console tail:\n{self.console_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _check_alive(self, wait: float = 0.0) -> None:
        if self._proc is None:
            raise VMError("the lab VM is not running")
        try:
            rc = self._proc.wait(timeout=wait) if wait else self._proc.poll()
        except subprocess.TimeoutExpired:
            return
        if rc is not None:
            tail = self.console_tail()
            panic = "kernel panic" if "Kernel panic" in tail else f"QEMU exit code {rc}"
            raise VMError(f"the lab VM ended ({panic}); qemu: {self._qemu_err()}; console tail:\n{tail}")

    def _qemu_err(self) -> str:
        try:
            return Path(self._ctl or "/nonexistent", "qemu.err").read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def console_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self._ctl or "/nonexistent", "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])
