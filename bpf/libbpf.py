"""A small ctypes binding of the system's libbpf (Debian's libbpf1, libbpf.so.1, 1.1 or newer).

Only what core.py needs: open a BPF object file, set its `const volatile` globals, choose which
programs load, load (libbpf does the CO-RE relocations against the running kernel's BTF),
update maps, attach programs one at a time, read a ring buffer, and look names up in BTF (the
kernel's drop reasons, which functions exist, where a global sits in the object).

Why ctypes and not cffi or a binding from PyPI: ctypes is in the standard library and loads in
milliseconds (the bench compares it with cffi's ABI mode, which parses C declarations at import);
the PyPI bindings (pylibbpf 0.0.x) are pre-1.0 and bundle their own libbpf copy instead of the
distribution's, which gets security updates. libbpf 1.x reports errors as NULL or a negative
errno and sets errno; every failure here is a LibbpfError with libbpf's own last log lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

LIB = "libbpf.so.1"
INSTALL = "apt-get install libbpf1"

# <linux/btf.h> BTF_KIND_*
BTF_KIND_ENUM = 6
BTF_KIND_FUNC = 12
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_ENUM64 = 19
# <bpf/libbpf.h> enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class LibbpfError(OSError):
    """A libbpf call failed: errno and what we asked; `log` holds libbpf's last messages (the
    verifier's complaint on a failed load)."""

    log: str = ""


class _BtfType(ctypes.Structure):
    """struct btf_type (<linux/btf.h>): the common head of every BTF type record."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val_lo32", ctypes.c_uint32), ("val_hi32", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


_P = ctypes.c_void_p
# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list): on x86-64 a va_list
# argument is a pointer, which vsnprintf takes as it is
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _P)
# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, ctypes.c_size_t)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_set_print": (_P, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "bpf_object__open_file": (_P, [ctypes.c_char_p, _P]),
    "bpf_object__load": (ctypes.c_int, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__btf": (_P, [_P]),
    "bpf_object__find_map_by_name": (_P, [_P, ctypes.c_char_p]),
    "bpf_object__next_program": (_P, [_P, _P]),
    "bpf_program__name": (ctypes.c_char_p, [_P]),
    "bpf_program__section_name": (ctypes.c_char_p, [_P]),
    "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
    "bpf_program__attach": (_P, [_P]),
    "bpf_link__destroy": (ctypes.c_int, [_P]),
    "bpf_map__fd": (ctypes.c_int, [_P]),
    "bpf_map__set_max_entries": (ctypes.c_int, [_P, ctypes.c_uint32]),
    "bpf_map__initial_value": (_P, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "bpf_map__update_elem": (ctypes.c_int, [_P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, ctypes.c_uint64]),
    "bpf_map__delete_elem": (ctypes.c_int, [_P, _P, ctypes.c_size_t, ctypes.c_uint64]),
    "bpf_map__lookup_elem": (ctypes.c_int, [_P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, ctypes.c_uint64]),
    "ring_buffer__new": (_P, [ctypes.c_int, SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (ctypes.c_int, [_P, ctypes.c_int]),
    "ring_buffer__consume": (ctypes.c_int, [_P]),
    "ring_buffer__free": (None, [_P]),
    "btf__load_vmlinux_btf": (_P, []),
    "btf__free": (None, [_P]),
    "btf__find_by_name_kind": (ctypes.c_int32, [_P, ctypes.c_char_p, ctypes.c_uint32]),
    "btf__type_by_id": (ctypes.POINTER(_BtfType), [_P, ctypes.c_uint32]),
    "btf__name_by_offset": (ctypes.c_char_p, [_P, ctypes.c_uint32]),
}

_lib: ctypes.CDLL | None = None
_log: deque[str] = deque(maxlen=40)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _P]


@_PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    """libbpf's messages (warnings, the verifier's log on a failed load) kept for the error."""
    if level > LIBBPF_INFO:
        return 0
    buf = ctypes.create_string_buffer(1024)
    n = _libc.vsnprintf(buf, len(buf), fmt, args)
    _log.append(buf.value.decode(errors="replace").rstrip())
    return n


def available() -> tuple[bool, str]:
    """Whether libbpf.so.1 loads here (for the source plan), and why not."""
    try:
        lib()
    except LibbpfError as err:
        return False, str(err)
    return True, "libbpf.so.1"


def lib() -> ctypes.CDLL:
    """libbpf.so.1, its functions typed (loaded once)."""
    global _lib
    if _lib is None:
        try:
            handle = ctypes.CDLL(ctypes.util.find_library("bpf") or LIB, use_errno=True)
        except OSError as err:
            raise LibbpfError(0, f"libbpf is not installed ({err}): {INSTALL}") from err
        missing = [name for name in _SIGNATURES if not hasattr(handle, name)]
        if missing:
            raise LibbpfError(0, f"this libbpf is too old (no {', '.join(missing[:3])}): needs libbpf 1.1+ "
                                 f"({INSTALL})")
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = restype, argtypes
        handle.libbpf_set_print(_print)
        _lib = handle
    return _lib


def last_messages(n: int = 6) -> str:
    return " | ".join(list(_log)[-n:])


def _fail(what: str, err: int | None = None) -> LibbpfError:
    code = abs(err) if err else ctypes.get_errno()
    why = os.strerror(code) if code else "failed"
    # the first message that names the failure, e.g. "prog 'x': BPF program load failed: ..."
    first = next((m.removeprefix("libbpf: ") for m in _log if "fail" in m or "error" in m), "")
    error = LibbpfError(code, f"{what}: {why}" + (f" ({first})" if first else ""))
    error.log = last_messages(20)
    return error


def clear_log() -> None:
    _log.clear()


class Btf:
    """A BTF type table: the kernel's (`vmlinux()`) or an object's (not owned, not freed)."""

    def __init__(self, ptr: int, owned: bool) -> None:
        self.ptr = ptr
        self.owned = owned

    @classmethod
    def vmlinux(cls) -> Btf:
        """/sys/kernel/btf/vmlinux, parsed by libbpf."""
        ptr = lib().btf__load_vmlinux_btf()
        if not ptr:
            raise _fail("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")
        return cls(ptr, owned=True)

    def close(self) -> None:
        if self.owned and self.ptr:
            lib().btf__free(self.ptr)
        self.ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def find(self, name: str, kind: int) -> int | None:
        tid = lib().btf__find_by_name_kind(self.ptr, name.encode(), kind)
        return tid if tid > 0 else None

    def _name(self, off: int) -> str:
        raw = lib().btf__name_by_offset(self.ptr, off)
        return raw.decode() if raw else ""

    def _members(self, tid: int, member: type[ctypes.Structure]) -> Iterator[ctypes.Structure]:
        t = lib().btf__type_by_id(self.ptr, tid)
        vlen = t.contents.info & 0xFFFF
        first = ctypes.addressof(t.contents) + ctypes.sizeof(_BtfType)
        for i in range(vlen):
            yield member.from_address(first + i * ctypes.sizeof(member))

    def has_func(self, name: str) -> bool:
        return self.find(name, BTF_KIND_FUNC) is not None

    def enum(self, name: str) -> dict[int, str]:
        """value -> enumerator name of enum `name` ({} if this BTF has no such enum)."""
        tid = self.find(name, BTF_KIND_ENUM)
        if tid is not None:
            return {m.val: self._name(m.name_off) for m in self._members(tid, _BtfEnum)}
        tid = self.find(name, BTF_KIND_ENUM64)
        if tid is not None:
            return {m.val_lo32 | m.val_hi32 << 32: self._name(m.name_off)
                    for m in self._members(tid, _BtfEnum64)}
        return {}

    def section_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """variable -> (offset, size) inside a data section (.rodata, .bss) of an object."""
        tid = self.find(section, BTF_KIND_DATASEC)
        if tid is None:
            return {}
        out = {}
        for info in self._members(tid, _BtfVarSecinfo):
            var = lib().btf__type_by_id(self.ptr, info.type)
            out[self._name(var.contents.name_off)] = (info.offset, info.size)
        return out


class Map:
    def __init__(self, ptr: int, name: str) -> None:
        self.ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self.ptr)

    def update(self, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
        err = lib().bpf_map__update_elem(self.ptr, k, len(key), v, len(value), 0)
        if err:
            raise _fail(f"cannot update map {self.name}", err)

    def delete(self, key: bytes) -> bool:
        k = ctypes.create_string_buffer(key, len(key))
        return lib().bpf_map__delete_elem(self.ptr, k, len(key), 0) == 0

    def lookup(self, key: bytes, value_size: int) -> bytes | None:
        k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
        if lib().bpf_map__lookup_elem(self.ptr, k, len(key), v, value_size, 0):
            return None
        return v.raw

    def data(self) -> tuple[int, int]:
        """(address, size) of a global data map's memory: before load the initial value libbpf
        will load, after load the kernel's own memory mapped into this process (.bss, .data)."""
        size = ctypes.c_size_t()
        addr = lib().bpf_map__initial_value(self.ptr, ctypes.byref(size))
        if not addr:
            raise _fail(f"map {self.name} has no data to map")
        return addr, size.value


class Program:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.name = lib().bpf_program__name(ptr).decode()
        self.section = lib().bpf_program__section_name(ptr).decode()

    def set_autoload(self, on: bool) -> None:
        if lib().bpf_program__set_autoload(self.ptr, on):
            raise _fail(f"cannot set autoload of {self.name}")

    def attach(self) -> Link:
        clear_log()
        link = lib().bpf_program__attach(self.ptr)
        if not link:
            raise _fail(f"cannot attach {self.section}")
        return Link(link)


class Link:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def destroy(self) -> None:
        if self.ptr:
            lib().bpf_link__destroy(self.ptr)
            self.ptr = 0


class BpfObject:
    """One opened BPF object file: programs, maps and globals by name; load() once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        clear_log()
        self.path = os.fspath(path)
        ptr = lib().bpf_object__open_file(self.path.encode(), None)
        if not ptr:
            raise _fail(f"cannot open BPF object {self.path}")
        self.ptr: int = ptr
        self.programs: dict[str, Program] = {}
        prog = lib().bpf_object__next_program(ptr, None)
        while prog:
            p = Program(prog)
            self.programs[p.name] = p
            prog = lib().bpf_object__next_program(ptr, prog)
        self.btf = Btf(lib().bpf_object__btf(ptr), owned=False)

    def map(self, name: str) -> Map:
        ptr = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not ptr:
            raise LibbpfError(0, f"{self.path} has no map {name}")
        return Map(ptr, name)

    def global_address(self, section: str, name: str) -> int:
        """Address of the global `name` in `section` (.rodata before load; .bss after load)."""
        where = self.btf.section_vars(section).get(name)
        if where is None:
            raise LibbpfError(0, f"{self.path} has no global {name} in {section}")
        addr, size = self.map(section).data()
        offset, var_size = where
        if offset + var_size > size:
            raise LibbpfError(0, f"global {name} lies outside {section}")
        return addr + offset

    def set_rodata(self, name: str, ctype: type[ctypes._SimpleCData], value: int) -> None:
        """Set a `const volatile` global before load (the verifier then knows its value)."""
        ctype.from_address(self.global_address(".rodata", name)).value = value

    def load(self) -> None:
        clear_log()
        err = lib().bpf_object__load(self.ptr)
        if err:
            raise _fail(f"cannot load {os.path.basename(self.path)}", err)

    def close(self) -> None:
        if self.ptr:
            lib().bpf_object__close(self.ptr)
            self.ptr = 0


class RingBuffer:
    """libbpf's ring buffer reader over one BPF_MAP_TYPE_RINGBUF map; `on_sample(address, size)`
    runs in the thread that calls poll()/consume() (address is valid only during the call)."""

    def __init__(self, ring: Map, on_sample: Callable[[int, int], None]) -> None:
        def sample(_ctx: int, data: int, size: int) -> int:
            on_sample(data, size)
            return 0

        self._callback = SAMPLE_FN(sample)  # kept alive as long as libbpf may call it
        ptr = lib().ring_buffer__new(ring.fd, self._callback, None, None)
        if not ptr:
            raise _fail(f"cannot read ring buffer {ring.name}")
        self.ptr: int = ptr

    def poll(self, timeout_ms: int) -> int:
        return lib().ring_buffer__poll(self.ptr, timeout_ms)

    def consume(self) -> int:
        return lib().ring_buffer__consume(self.ptr)

    def free(self) -> None:
        if self.ptr:
            lib().ring_buffer__free(self.ptr)
            self.ptr = 0


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    return n if n > 0 else os.cpu_count() or 1
