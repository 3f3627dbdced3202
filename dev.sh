#!/usr/bin/env bash
# dev.sh - the project's two entry points on a fresh Debian/Ubuntu machine (as root, or as a user
# who may sudo: dev.sh runs itself again with sudo when it is not root):
#   ./dev.sh demo   install what is needed, build the IPsec lab, capture it (VM if the kernel lacks ESP)
#   ./dev.sh test   install what is needed, run the whole test suite (host + kernel lab VM on 6.1),
#                   then the lab's probe and end-to-end tests again on 6.12
# and the helpers they use:
#   ./dev.sh setup  only install (apt packages, .venv with the project and its dev tools)
#   ./dev.sh bench [capture|decrypt|correlate|report|kprobes]   run benchmarks (kprobes: in the lab VM)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python

APT_PACKAGES=(
  python3 python3-venv python3-pip            # the venv's interpreter (same one bcc is built for)
  nftables iptables iproute2 tcpdump tshark   # rules, peers and the Wireshark oracle
  libbpf1                                     # loads the shipped CO-RE probes (bpf/core.py, at run time)
  clang bpftool libbpf-dev                    # builds them once (bpf/build.py: build machine only)
  python3-bpfcc                               # kprobes (bcc, the fallback); a system package, linked into the venv
  qemu-system-x86 busybox-static zstd         # the kernel lab VM (zstd: 6.12's kernel payload)
  linux-image-amd64 linux-headers-amd64       # the lab's kernel (ESP, GCM, kprobes) and bcc's headers
  chromium                                    # the HTML report test takes a screenshot
  prometheus                                  # `watch` tests: a real Prometheus server and promtool
  procps kmod ca-certificates iputils-ping ncat
  strongswan-charon strongswan-swanctl libstrongswan-standard-plugins  # `lab up --daemon strongswan`
)
# `lab up --daemon libreswan`: Debian's libreswan conflicts with strongswan-charon, so it is unpacked
# (with the libraries it needs that are not installed here) into a private root pluto runs from.
LIBRESWAN_DEBS=(libreswan libnss3-tools libevent-pthreads-2.1-7 libldns3 libcurl3-nss)
LIBRESWAN_ROOT=${IPSEC_CAPTURE_LIBRESWAN_ROOT:-/var/cache/ipsec-capture/libreswan}

# The second lab kernel: bookworm-backports' 6.12 (the kernel line of Debian 13, RHEL 10). Only its
# versioned image and headers come from backports (never the linux-image-amd64 metapackage, so
# the 6.1 default and every other package stay Debian 12's own).
BACKPORTS=bookworm-backports
BACKPORTS_SOURCE=/etc/apt/sources.list.d/ipsec-capture-$BACKPORTS.sources

say() { printf '[dev.sh] %s\n' "$*" >&2; }

# Root installs packages and creates network namespaces. A root shell (containers, cloud images,
# CI) often has no sudo at all, so sudo is asked for only by a user who is not root.
as_root() {
  [ "$(id -u)" = 0 ] && return
  if [ -n "$(command -v sudo)" ]; then  # no /dev/null: some images keep it root-only
    say "not root: running again as root with sudo"
    exec sudo -- "$ROOT/dev.sh" "$@"
  fi
  say "needs root (installs packages, creates network namespaces), and sudo is not installed: run it as root"
  exit 77
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/ipsec-capture-apt.log 2>&1 \
      || { tail -n 30 /tmp/ipsec-capture-apt.log >&2; say "apt-get install failed (log: /tmp/ipsec-capture-apt.log)"; exit 1; }
  fi
}

unpack_libreswan() {
  [ -x "$LIBRESWAN_ROOT/usr/libexec/ipsec/pluto" ] && return 0
  say "libreswan: unpacking ${LIBRESWAN_DEBS[*]} into $LIBRESWAN_ROOT"
  local dl
  dl=$(mktemp -d)
  chmod 755 "$dl"  # apt-get download fetches as the _apt user
  (cd "$dl" && apt-get download -q "${LIBRESWAN_DEBS[@]}") >/tmp/ipsec-capture-apt.log 2>&1 \
    || { apt-get update -q >/dev/null; (cd "$dl" && apt-get download -q "${LIBRESWAN_DEBS[@]}") \
           >/tmp/ipsec-capture-apt.log 2>&1; } \
    || { tail -n 20 /tmp/ipsec-capture-apt.log >&2; say "apt-get download libreswan failed"; exit 1; }
  rm -rf "$LIBRESWAN_ROOT.tmp"
  mkdir -p "$LIBRESWAN_ROOT.tmp"
  for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$LIBRESWAN_ROOT.tmp"; done
  rm -rf "$dl" "$LIBRESWAN_ROOT"
  mv "$LIBRESWAN_ROOT.tmp" "$LIBRESWAN_ROOT"
}

install_backports_kernel() {
  # shellcheck disable=SC1091
  [ "$(. /etc/os-release; echo "${VERSION_CODENAME:-}")" = bookworm ] || return 0
  compgen -G "/boot/vmlinuz-6.12*" >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  if ! grep -rqs "$BACKPORTS" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "apt: adding $BACKPORTS (the 6.12 lab kernel)"
    # the mirror this machine already uses for bookworm (its first deb822 or one-line source)
    local mirror
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || { say "apt: no bookworm mirror found in /etc/apt to add $BACKPORTS from"; exit 1; }
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
      "$mirror" "$BACKPORTS" /usr/share/keyrings/debian-archive-keyring.gpg >"$BACKPORTS_SOURCE"
  fi
  apt-get update -q >/dev/null
  local want=() meta version
  for meta in linux-image-amd64 linux-headers-amd64; do
    version=$(apt-cache madison "$meta" | awk -F'|' -v r="$BACKPORTS" '$3 ~ r {gsub(/ /, "", $2); print $2; exit}')
    [ -n "$version" ] || { say "apt: no $meta in $BACKPORTS"; exit 1; }
    want+=("$(apt-cache show "$meta=$version" | sed -n 's/^Depends: \([^ ,]*\).*/\1/p' | head -n1)/$BACKPORTS")
  done
  say "apt: installing the 6.12 lab kernel ${want[*]}"
  apt-get install -y -q --no-install-recommends "${want[@]}" >/tmp/ipsec-capture-apt.log 2>&1 \
    || { tail -n 30 /tmp/ipsec-capture-apt.log >&2; say "apt-get install failed (log: /tmp/ipsec-capture-apt.log)"; exit 1; }
}

# The CO-RE object, built from bpf/xfrm_probes.bpf.c against vmlinux.h from the 6.1 lab kernel's BTF
# (bpf/build.py says why); rebuilt only when its source or that BTF changed.
build_bpf() {
  local btf
  btf=$("$PY" -c 'from ipsec_capture.lab.vm import kernel_elf; print(kernel_elf())') \
    || { say "no 6.1 lab kernel to take BTF from (apt-get install linux-image-amd64)"; exit 1; }
  "$PY" -m ipsec_capture.bpf.build --btf "$btf" --if-stale
}

install_venv() {
  if [ ! -x "$PY" ]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv "$VENV"
  fi
  local stamp=$VENV/.installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "pip: installing ipsec-capture (editable) and its dev tools"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q -e ".[dev]"
    touch "$stamp"
  fi
  # bcc is not on PyPI: expose only Debian's bcc package to the venv (not all of dist-packages).
  local site
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
    ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
  fi
}

setup() { install_apt; install_backports_kernel; unpack_libreswan; install_venv; build_bpf; }

case "${1:-}" in
  setup|demo|test|bench) as_root "$@" ;;
esac
case "${1:-}" in
  setup) setup setup ;;
  demo) setup demo; shift; exec "$PY" -m ipsec_capture.lab.demo "$@" ;;
  test)
    setup test; shift
    "$VENV/bin/ruff" check .
    [ $# -eq 0 ] || exec "$PY" -m pytest "$@"
    "$PY" -m pytest   # everything; the lab VM boots Debian 12's 6.1
    # the second lab kernel, bookworm-backports' 6.12: the probes and a smaller end-to-end set
    say "lab tests again on the 6.12 kernel"
    IPSEC_CAPTURE_LAB_KERNEL=6.12 IPSEC_CAPTURE_LAB_SCENARIOS=gcm,natt \
      exec "$PY" -m pytest -m lab tests/lab/test_lab_bpf.py tests/lab/test_lab_e2e.py ;;
  bench)
    setup bench; shift
    [ $# -gt 0 ] || set -- capture decrypt correlate report kprobes
    for b in "$@"; do "$PY" -m "bench.$b"; done ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
