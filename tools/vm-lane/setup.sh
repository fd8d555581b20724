#!/usr/bin/env bash
# One-time, idempotent set-up of the VM lane (see README.md beside this file).
#
# Installs the host tools (qemu-system-x86, busybox-static, cpio, kmod, zstd,
# python3, e2fsprogs), downloads Debian's generic amd64 kernel package with
# `apt-get download` WITHOUT installing it (/boot and the host's modules are
# untouched, update-initramfs never runs), and builds into the cache:
#
#   $CACHE/<kernel>/root/          the unpacked package (modules, config)
#   $CACHE/<kernel>/vmlinux        ELF kernel, booted by qemu directly (PVH)
#   $CACHE/<kernel>/initrd.cpio.gz static busybox + virtio/9p/overlay/ext4 modules
#   $CACHE/current -> <kernel>     what run.sh boots by default
#
# When everything is in place it only checks and exits (~0.1 s, no network,
# no root needed). Otherwise it needs root, Debian 12+ on amd64 and the
# Debian mirror once. Kernel directories no symlink refers to any more (after
# a Debian kernel ABI bump) are removed when no VM is running.
#
# Environment:
#   NANOBOX_VMLANE_CACHE  cache directory (default /var/cache/nanobox-vmlane)
#   NANOBOX_VMLANE_KPKG   kernel package (default: the one linux-image-amd64
#                         depends on). Not linux-image-cloud-amd64: no 9p.
#   NANOBOX_VMLANE_SUITE  take the kernel from another Debian suite, e.g.
#                         trixie (kernel 6.12: Landlock ABI 6, but no cgroup-v1
#                         memory controller). The kernel is then linked as
#                         $CACHE/<suite> (boot it with run.sh --kernel <suite>);
#                         /etc/apt is not touched.
set -euo pipefail

CACHE=${NANOBOX_VMLANE_CACHE:-/var/cache/nanobox-vmlane}
SUITE=${NANOBOX_VMLANE_SUITE:-}
LINK=${SUITE:-current}
export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes LC_ALL=C

say() { echo "vm-lane setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --------------------------------------------------------------- can it work?
[ "$(uname -m)" = x86_64 ] || die "needs an x86_64 host (this is $(uname -m))"
[ -r /etc/os-release ] || die "needs Debian 12 or newer (no /etc/os-release)"
# shellcheck disable=SC1091
read -r os_id os_ver < <(. /etc/os-release && echo "${ID:-unknown} ${VERSION_ID:-}")
[ "$os_id" = debian ] || die "needs Debian 12 or newer (this is '$os_id'): it boots Debian's own kernel package"
case $os_ver in
  '' ) say "warning: Debian testing/unstable: kernel and tools may differ from what this lane was tested with" ;;
  [0-9]|1[01]) die "needs Debian 12 or newer (this is Debian $os_ver)" ;;
esac

# ------------------------------------------------------ the guest's stage 1
# The initramfs's /init (static busybox sh). It loads the virtio/9p/overlay
# modules, mounts the host's / read-only over 9p with a throw-away tmpfs
# overlay on top, mounts run.sh's exchange directory (9p tag "vmlane") at
# /run/vmlane/io and hands over to the stage 2 script run.sh put there (the
# configuration-specific part lives in run.sh, so changing it needs no new
# initramfs). Editing this text makes the next setup rebuild the initramfs.
read -r -d '' INIT <<'INIT' || true
#!/bin/busybox sh
bb=/bin/busybox
die() { echo "[vmlane] stage 1: $*"; $bb poweroff -f; }
$bb mount -t devtmpfs dev /dev
$bb mount -t proc proc /proc
while read -r m; do $bb insmod "/mods/$m" || die "insmod $m failed"; done < /mods/order
o=trans=virtio,version=9p2000.L,msize=512000
$bb mkdir -p /lower /rw
$bb mount -t 9p -o $o,ro,cache=loose hostroot /lower || die "cannot mount the host's / over 9p"
$bb mount -t tmpfs -o mode=755 rw /rw
$bb mkdir -p /rw/upper /rw/work
$bb mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,xino=off overlay /newroot \
  || die "cannot mount the overlay root"
$bb mount -t tmpfs -o mode=755,nosuid,nodev run /newroot/run
$bb mkdir -p /newroot/run/vmlane/io
$bb cp /bin/busybox /newroot/run/vmlane/busybox
$bb mount -t 9p -o $o vmlane /newroot/run/vmlane/io || die "cannot mount the exchange directory"
[ -r /newroot/run/vmlane/io/stage2.sh ] || die "no stage2.sh in the exchange directory"
$bb mount --move /dev /newroot/dev
$bb mount --move /proc /newroot/proc
exec $bb switch_root /newroot /run/vmlane/busybox sh /run/vmlane/io/stage2.sh
INIT
MODULES="virtio_pci 9pnet_virtio 9p overlay virtio_blk ext4"   # plus their dependencies
INIT_HASH=$(printf '%s\n%s\n' "$INIT" "$MODULES" | sha256sum | cut -c1-16)

# --------------------------------------------------------------- fast path
missing_pkgs() {
  command -v qemu-system-x86_64 >/dev/null || echo qemu-system-x86
  dpkg -s busybox-static >/dev/null 2>&1 || echo busybox-static   # /bin/busybox may be the dynamic one
  command -v cpio >/dev/null || echo cpio
  command -v modprobe >/dev/null && command -v depmod >/dev/null || echo kmod
  command -v zstd >/dev/null || echo zstd
  [ -x /usr/bin/python3 ] || echo python3
  command -v flock >/dev/null || echo util-linux
  command -v mkfs.ext4 >/dev/null || echo e2fsprogs
}

# apt lists fingerprint: the kernel package name is re-resolved (0.5 s) only
# when the package lists changed since the last resolution.
APT=()
if [ -n "$SUITE" ]; then
  A=$CACHE/apt-$SUITE
  APT=(-o "Dir::Etc::SourceList=$A/sources.list" -o Dir::Etc::SourceParts=/dev/null
       -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache")
  LISTS=$A/lists
else
  LISTS=/var/lib/apt/lists
fi
lists_fp() { stat -c '%n %Y %s' "$LISTS"/*_Packages* 2>/dev/null | sha256sum | cut -c1-16; }
resolve_kpkg() {  # prints the kernel package name, or nothing
  if [ -n "${NANOBOX_VMLANE_KPKG:-}" ]; then echo "$NANOBOX_VMLANE_KPKG"; return; fi
  local fp memo=$CACHE/kpkg-$LINK
  fp=$(lists_fp)
  if [ -r "$memo" ] && [ "$(sed -n 1p "$memo")" = "$fp" ]; then sed -n 2p "$memo"; return; fi
  local k
  k=$(apt-cache "${APT[@]}" depends linux-image-amd64 2>/dev/null \
      | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -n "$k" ] && [ -w "$CACHE" ]; then printf '%s\n%s\n' "$fp" "$k" > "$memo.$$" && mv "$memo.$$" "$memo"; fi
  echo "$k"
}
ready() {  # kernel dir is complete and its initramfs is current
  [ -s "$CACHE/$1/vmlinux" ] && [ -s "$CACHE/$1/initrd.cpio.gz" ] \
    && [ "$(cat "$CACHE/$1/initrd.hash" 2>/dev/null)" = "$INIT_HASH" ]
}

if [ -z "$(missing_pkgs)" ] && [ -d "$CACHE" ]; then
  KPKG=$(resolve_kpkg)
  if [ -n "$KPKG" ] && ready "${KPKG#linux-image-}" \
     && [ "$(readlink "$CACHE/$LINK")" = "${KPKG#linux-image-}" ]; then
    say "ready: $CACHE/$LINK -> ${KPKG#linux-image-}"
    exit 0
  fi
fi

# --------------------------------------------------------------- slow path
[ "$(id -u)" = 0 ] || die "must run as root the first time (apt-get, $CACHE); afterwards anyone may use run.sh"
command -v apt-get >/dev/null || die "apt-get not found"
mkdir -p "$CACHE"
exec 8>"$CACHE/.setup.lock"
flock 8    # one setup at a time

apt_updated=
apt_update() {  # $@: extra apt options
  local log
  if ! log=$(apt-get "$@" update -q 2>&1) || grep -qE '^(W|E): (Failed to fetch|Some index files failed)' <<<"$log"; then
    printf '%s\n' "$log" | grep -E '^(W|E):' >&2 || true
    die "apt-get update failed: cannot reach the Debian mirror (network or proxy?)"
  fi
}

pkgs=$(missing_pkgs)
if [ -n "$pkgs" ]; then
  say "installing: ${pkgs//$'\n'/ }"
  apt_update; apt_updated=1
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null \
    || die "apt-get install $pkgs failed"
fi

if [ -n "$SUITE" ]; then
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $SUITE main" \
    > "$A/sources.list"
  [ -n "$(ls "$A"/lists/*_Packages* 2>/dev/null)" ] || { apt_update "${APT[@]}"; }
elif [ -z "$apt_updated" ] && [ -z "$(ls /var/lib/apt/lists/*_Packages* 2>/dev/null)" ]; then
  apt_update; apt_updated=1   # e.g. a container image with its lists removed
fi

KPKG=$(resolve_kpkg)
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64 (apt lists broken?)"
KVER=${KPKG#linux-image-}
D=$CACHE/$KVER

download() {  # into $1
  local err
  chown _apt "$1" 2>/dev/null || true   # lets apt download sandboxed (no warning)
  err=$(cd "$1" && apt-get "${APT[@]}" download -q "$KPKG" 2>&1 >/dev/null) && return 0
  printf '%s\n' "$err" | grep -E '^(W|E):' >&2 || true
  return 1
}

if [ ! -s "$D/vmlinux" ] || [ ! -d "$D/root" ]; then
  say "downloading and unpacking $KPKG (not installing it)"
  T=$CACHE/.build-$KVER
  rm -rf "$T"; mkdir -p "$T/dl"
  if ! download "$T/dl"; then
    say "download failed; refreshing the package lists and retrying"
    apt_update "${APT[@]}"
    KPKG=$(resolve_kpkg); [ "${KPKG#linux-image-}" = "$KVER" ] \
      || die "the kernel package changed to $KPKG during set-up; run setup again"
    download "$T/dl" || die "apt-get download $KPKG failed: cannot reach the Debian mirror?"
  fi
  dpkg-deb -x "$T"/dl/*.deb "$T/root"
  rm -rf "$T/dl"
  [ -e "$T/root/lib" ] || ln -s usr/lib "$T/root/lib"    # newer packages ship /usr/lib/modules
  grep -qE '^CONFIG_NET_9P_VIRTIO=[ym]' "$T/root/boot/config-$KVER" \
    || die "$KPKG has no 9p over virtio; use the generic amd64 kernel"
  depmod -b "$T/root" "$KVER"   # the package ships no modules.dep (its postinst makes it)
  # bzImage -> ELF vmlinux: qemu boots an ELF through PVH, which skips the
  # firmware and the in-guest decompression (about 4 s less per boot under TCG).
  /usr/bin/python3 - "$T/root/boot/vmlinuz-$KVER" "$T/vmlinux" <<'PY'
import lzma, struct, subprocess, sys
d = open(sys.argv[1], "rb").read()
setup_sects = d[0x1F1] or 4
off, length = struct.unpack_from("<II", d, 0x248)    # payload_offset, payload_length
payload = d[(setup_sects + 1) * 512 + off:][:length]
if payload.startswith(b"\xfd7zXZ\x00"):               # Debian 12
    out = lzma.LZMADecompressor().decompress(payload)
elif payload.startswith(b"\x28\xb5\x2f\xfd"):         # Debian 13
    out = subprocess.run(["zstd", "-dcq"], input=payload, capture_output=True).stdout
else:
    sys.exit(f"unknown kernel compression {payload[:6]!r}")
if out[:4] != b"\x7fELF":
    sys.exit("the kernel payload is not an ELF vmlinux")
open(sys.argv[2], "wb").write(out)
PY
  rm -f "$T/root/boot/vmlinuz-$KVER"
  touch "$T/.nanobox-vmlane-kernel"
  rm -rf "$D"; mv "$T" "$D"
fi

if ! ready "$KVER"; then
  say "building the initramfs for $KVER"
  W=$(mktemp -d)
  trap 'rm -rf "$W"' EXIT
  mkdir -p "$W"/{bin,dev,proc,sys,newroot,mods}
  cp /bin/busybox "$W/bin/busybox"
  : > "$W/mods/order"
  # modprobe resolves the dependencies and prints them in load order.
  # shellcheck disable=SC2086
  modprobe -d "$D/root" -S "$KVER" --show-depends -a $MODULES | while read -r kind path _; do
    [ "$kind" = insmod ] || continue                    # "builtin <name>": nothing to load
    m=$(basename "$path"); m=${m%%.ko*}
    grep -qx "$m.ko" "$W/mods/order" && continue
    case $path in
      *.ko) cp "$path" "$W/mods/$m.ko" ;;
      *.ko.xz) xz -dc "$path" > "$W/mods/$m.ko" 2>/dev/null \
               || /usr/bin/python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' "$path" > "$W/mods/$m.ko" ;;
      *.ko.zst) zstd -qdc "$path" > "$W/mods/$m.ko" ;;
      *) die "unexpected module file $path" ;;
    esac
    echo "$m.ko" >> "$W/mods/order"
  done
  printf '%s\n' "$INIT" > "$W/init"
  chmod 755 "$W/init"
  (cd "$W" && find . | cpio -o -H newc --quiet | gzip -1) > "$D/initrd.cpio.gz.tmp"
  mv "$D/initrd.cpio.gz.tmp" "$D/initrd.cpio.gz"
  echo "$INIT_HASH" > "$D/initrd.hash"
fi

ln -sfn "$KVER" "$CACHE/.$LINK.tmp" && mv -T "$CACHE/.$LINK.tmp" "$CACHE/$LINK"
: >> "$CACHE/.use.lock"; chmod 644 "$CACHE/.use.lock"

# Drop kernels nothing points at any more, unless a VM is running (run.sh
# holds a shared lock on .use.lock while it runs).
if exec 9<"$CACHE/.use.lock" && flock -n -x 9; then
  keep=$(find "$CACHE" -mindepth 1 -maxdepth 1 -type l -printf '%l\n')
  for d in "$CACHE"/*/; do
    d=${d%/}; n=$(basename "$d")
    if [ ! -L "$d" ] && [ -e "$d/.nanobox-vmlane-kernel" ] && ! grep -qxF "$n" <<<"$keep"; then
      say "removing the unused kernel $n"; rm -rf "$d"
    fi
  done
  exec 9<&-
fi
say "ready: $CACHE/$LINK -> $KVER"
