#!/usr/bin/env bash
# dev.sh - the project's two entry points on a fresh Debian/Ubuntu machine (as root, or as a user
# who may sudo: dev.sh runs itself again with sudo when it is not root):
#   ./dev.sh demo   install what is needed, build the IPsec lab, capture it (VM if the kernel lacks ESP)
#   ./dev.sh test   install what is needed, run the whole test suite (host + kernel lab VM)
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
  python3-bpfcc                               # kprobes (bcc); a system package, linked into the venv
  qemu-system-x86 busybox-static              # the kernel lab VM
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

say() { printf '[dev.sh] %s\n' "$*" >&2; }

# Root installs packages and creates network namespaces. A root shell (containers, cloud images,
# CI) often has no sudo at all, so sudo is asked for only by a user who is not root.
as_root() {
  [ "$(id -u)" = 0 ] && return
  if command -v sudo >/dev/null 2>&1; then
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

setup() { install_apt; unpack_libreswan; install_venv; }

case "${1:-}" in
  setup|demo|test|bench) as_root "$@" ;;
esac
case "${1:-}" in
  setup) setup setup ;;
  demo) setup demo; shift; exec "$PY" -m ipsec_capture.lab.demo "$@" ;;
  test)
    setup test; shift
    "$VENV/bin/ruff" check .
    exec "$PY" -m pytest "$@" ;;
  bench)
    setup bench; shift
    [ $# -gt 0 ] || set -- capture decrypt correlate report kprobes
    for b in "$@"; do "$PY" -m "bench.$b"; done ;;
  *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
