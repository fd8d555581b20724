#!/usr/bin/env bash
# Run one command as root inside a fresh, throw-away qemu VM and exit with its
# status (see README.md beside this file; set up once with setup.sh).
#
#   tools/vm-lane/run.sh [OPTIONS] [--] COMMAND [ARGS...]
#
#   --cgroup v2        (default) pure cgroup v2: kernel booted with
#                      cgroup_no_v1=all, cgroup2 at /sys/fs/cgroup
#                      (nsdelegate,memory_recursiveprot, as systemd mounts it)
#   --cgroup v1        systemd's hybrid layout: tmpfs at /sys/fs/cgroup, every
#                      v1 controller at /sys/fs/cgroup/<ctrl> (cpu,cpuacct and
#                      net_cls,net_prio co-mounted, with symlinks), name=systemd
#                      at .../systemd, a controller-less cgroup2 at .../unified
#   --no-userns        kernel.unprivileged_userns_clone=0 (Debian's switch:
#                      non-root gets EPERM, root still can)
#   --no-userns-all    user.max_user_namespaces=0 (nobody can; ENOSPC)
#   --rw DIR           share DIR read-write at the same path (repeatable); all
#                      other writes go to a tmpfs overlay and vanish
#   --tmp tmpfs|ext4   what /tmp is (default tmpfs). ext4: a fresh sparse disk
#                      image (NANOBOX_VMLANE_TMP_SIZE, default 4G), like the
#                      ext4 root a stock Debian 12 host keeps /tmp on; on the
#                      6.1 kernel only such file systems (not tmpfs, overlayfs,
#                      9p) support idmapped mounts
#   --timeout SECONDS  kill the VM after this long (default 600); exit 124
#   --mem SIZE         guest memory (default 2G: with 1G the kernel's overcommit
#                      heuristic refuses a 1 GiB allocation outright)
#   --smp N            guest CPUs (default 2)
#   --kernel NAME      kernel in the cache (default "current"; see setup.sh)
#   --append ARGS      extra kernel command line (e.g. loglevel=7)
#
# The command runs as root in the guest, in the current directory, with this
# shell's exported environment (TERM=dumb when stdout is not a terminal).
# Its stdout and stderr arrive merged on stdout (serial console, live); the
# lane's own "[vmlane] ..." lines go to stderr. Exit status: the command's;
# 124 on timeout; 125 if the guest never reported one (boot failure, panic).
#
# Environment: NANOBOX_VMLANE_CACHE (default /var/cache/nanobox-vmlane),
# NANOBOX_VMLANE_ACCEL (auto|kvm|tcg; auto picks KVM only with kvm_intel or
# kvm_amd loaded, never a PVM-only /dev/kvm), NANOBOX_VMLANE_TB_MB (TCG
# translation cache, default 256), NANOBOX_VMLANE_SMP, NANOBOX_VMLANE_MEM,
# NANOBOX_VMLANE_TIMEOUT (defaults for the options).
#
# The guest's / is the host's / read-only over 9p plus a tmpfs overlay, so it
# sees the same programs and files (as they were at boot) without any image.
# Fresh and empty: /tmp (see --tmp; unless the current directory is under
# /tmp), /run and /dev/shm (tmpfs). Also mounted: /proc, /sys, /dev (devtmpfs), /dev/pts,
# /dev/mqueue, securityfs (Landlock's /sys/kernel/security/lsm), the booted
# kernel's modules at /lib/modules (modprobe works). Loopback is up; there is
# no other network.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit "${1:-2}"; }
err() { echo "vm-lane run: $*" >&2; }

CACHE=${NANOBOX_VMLANE_CACHE:-/var/cache/nanobox-vmlane}
KERNEL=current CG=v2 APPEND="" RWS=() TMPFS=tmpfs
MEM=${NANOBOX_VMLANE_MEM:-2G} SMP=${NANOBOX_VMLANE_SMP:-2} TMO=${NANOBOX_VMLANE_TIMEOUT:-600}
need() { [ $# -ge 2 ] || { err "$1 needs a value"; exit 2; }; }
while [ $# -gt 0 ]; do
  case $1 in
    --cgroup) need "$@"; CG=$2; shift 2 ;;
    --no-userns) APPEND+=" sysctl.kernel.unprivileged_userns_clone=0"; shift ;;
    --no-userns-all) APPEND+=" sysctl.user.max_user_namespaces=0"; shift ;;
    --rw) need "$@"
          [ -d "$2" ] || { err "--rw $2: not a directory"; exit 2; }
          RWS+=("$(realpath "$2")"); shift 2 ;;
    --tmp) need "$@"; TMPFS=$2; shift 2 ;;
    --timeout) need "$@"; TMO=$2; shift 2 ;;
    --mem) need "$@"; MEM=$2; shift 2 ;;
    --smp) need "$@"; SMP=$2; shift 2 ;;
    --kernel) need "$@"; KERNEL=$2; shift 2 ;;
    --append) need "$@"; APPEND+=" $2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    -*) err "unknown option $1"; usage ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { err "no command given"; usage; }
case $CG in
  v2) APPEND+=" cgroup_no_v1=all" ;;
  v1) ;;
  *) err "--cgroup takes v2 or v1"; exit 2 ;;
esac
[[ $TMO =~ ^[0-9]+$ ]] || { err "--timeout takes whole seconds"; exit 2; }
case $TMPFS in tmpfs|ext4) ;; *) err "--tmp takes tmpfs or ext4"; exit 2 ;; esac

K=$(readlink -e "$CACHE/$KERNEL") || K=/nonexistent
if [ ! -s "$K/vmlinux" ] || [ ! -s "$K/initrd.cpio.gz" ]; then
  err "no kernel '$KERNEL' in $CACHE: run tools/vm-lane/setup.sh (as root) first"; exit 125
fi
MODS=$K/root/lib/modules
command -v qemu-system-x86_64 >/dev/null || { err "qemu-system-x86_64 missing: run setup.sh"; exit 125; }

# Hold a shared lock while the VM runs: setup.sh does not delete a kernel in use.
if [ -r "$CACHE/.use.lock" ]; then exec 9<"$CACHE/.use.lock"; flock -s 9; fi

ACCEL=${NANOBOX_VMLANE_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
  # A PVM /dev/kvm (kvm_pvm, no vmx/svm flag, e.g. inside some cloud sandboxes)
  # opens fine but boots only PVM-built guest kernels: stock kernels hang.
  ACCEL=tcg
  if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] \
     && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then ACCEL=kvm; fi
fi
case $ACCEL in
  kvm) ACC=(-accel kvm -cpu host) ;;
  tcg) ACC=(-accel "tcg,thread=multi,tb-size=${NANOBOX_VMLANE_TB_MB:-256}" -cpu max) ;;
  *) err "NANOBOX_VMLANE_ACCEL must be auto, kvm or tcg"; exit 2 ;;
esac

# The exchange directory (9p tag "vmlane", /run/vmlane/io in the guest):
# stage2.sh, config and cmd.sh in; rc out.
IO=$(mktemp -d "${TMPDIR:-/tmp}/nanobox-vmlane.XXXXXX")
trap 'rm -rf "$IO"' EXIT
chmod 755 "$IO"

KEEP_TMP=0
case $PWD/ in
  /tmp/*) err "note: the current directory is under /tmp: the guest keeps the host's /tmp (overlay)"
          KEEP_TMP=1
          [ "$TMPFS" = tmpfs ] && TMPFS=none ;;
esac
printf 'CGROUP=%s\nTMPFS=%s\nKEEP_TMP=%s\n' "$CG" "$TMPFS" "$KEEP_TMP" > "$IO/config"
i=0
# shellcheck disable=SC2054  # the commas are qemu's
DEVS=(-fsdev "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"
      -device virtio-9p-pci,fsdev=root,mount_tag=hostroot
      -fsdev "local,id=vmlane,path=$IO,security_model=none"
      -device virtio-9p-pci,fsdev=vmlane,mount_tag=vmlane
      -fsdev "local,id=kmods,path=$MODS,security_model=none,readonly=on"
      -device virtio-9p-pci,fsdev=kmods,mount_tag=kmods)
: > "$IO/mounts"
for d in "${RWS[@]}"; do
  case $d in *[[:space:]]*) err "--rw $d: paths with white space are not supported"; exit 2 ;; esac
  DEVS+=(-fsdev "local,id=rw$i,path=$d,security_model=none,multidevs=remap"
         -device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
  echo "rw$i $d" >> "$IO/mounts"
  i=$((i + 1))
done

if [ "$TMPFS" = ext4 ]; then
  command -v mkfs.ext4 >/dev/null || { err "mkfs.ext4 missing: run setup.sh"; exit 125; }
  truncate -s "${NANOBOX_VMLANE_TMP_SIZE:-4G}" "$IO/tmp.img"
  # No journal and no background inode-table zeroing: it is thrown away.
  mkfs.ext4 -q -F -m 0 -O ^has_journal -E lazy_itable_init=1 "$IO/tmp.img"
  # shellcheck disable=SC2054
  DEVS+=(-drive "file=$IO/tmp.img,if=none,id=tmp,format=raw,cache=unsafe"
         -device virtio-blk-pci,drive=tmp)
fi

# The command, with the caller's exported environment and directory.
{
  export -p | grep -vE '^declare -x (BASH_[A-Z_]*|SHLVL|OLDPWD|PWD|_)(=|$)' || true
  [ -t 1 ] || echo 'export TERM=dumb'       # no colour codes into logs
  printf 'cd -- %q || { echo "[vmlane] cannot enter %q in the guest"; exit 125; }\n' "$PWD" "$PWD"
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} > "$IO/cmd.sh"

# Stage 2, run by the guest's PID 1 (busybox sh) after stage 1 (the
# initramfs, see setup.sh) has switched to the overlay root.
cat > "$IO/stage2.sh" <<'STAGE2'
bb=/run/vmlane/busybox
IO=/run/vmlane/io
o=trans=virtio,version=9p2000.L,msize=512000
. $IO/config
die() { echo "[vmlane] stage 2: $*"; $bb poweroff -f; }
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
$bb mkdir -p /dev/pts /dev/shm /dev/mqueue /lib/modules
$bb mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
$bb mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue
for l in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
  [ -e "/dev/${l%%:*}" ] || $bb ln -s "${l#*:}" "/dev/${l%%:*}"
done
$bb mount -t securityfs -o nosuid,nodev,noexec securityfs /sys/kernel/security
$bb mount -t 9p -o $o,ro kmods /lib/modules || die "cannot mount /lib/modules"
case $TMPFS in
  tmpfs) $bb mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp ;;
  ext4)
    # Always at /vmtmp (tests put pytest's basetemp there), and over /tmp
    # unless the checkout itself lives under /tmp.
    $bb mkdir -p /vmtmp
    $bb mount -t ext4 -o nosuid,nodev,noinit_itable /dev/vda /vmtmp && $bb chmod 1777 /vmtmp \
      || die "cannot mount the ext4 /tmp disk"
    if [ "$KEEP_TMP" != 1 ]; then $bb mount --bind /vmtmp /tmp || die "cannot mount /tmp"; fi ;;
esac
if [ "$CGROUP" = v1 ]; then
  $bb mount -t tmpfs -o nosuid,nodev,noexec,mode=755 cgroup /sys/fs/cgroup
  ctrls=$($bb awk 'NR > 1 && $4 == 1 {printf "%s ", $1}' /proc/cgroups)
  for c in $ctrls; do
    case $c in
      cpu|cpuacct) g=cpu,cpuacct ;;
      net_cls|net_prio) g=net_cls,net_prio ;;
      *) g=$c ;;
    esac
    case " $ctrls " in *" ${g%,*} "*" ${g#*,} "*) ;; *) g=$c ;; esac   # a partner missing: alone
    [ -d /sys/fs/cgroup/$g ] && continue
    $bb mkdir -p /sys/fs/cgroup/$g
    $bb mount -t cgroup -o nosuid,nodev,noexec,$g cgroup /sys/fs/cgroup/$g \
      || { echo "[vmlane] warning: cannot mount cgroup v1 $g"; $bb rmdir /sys/fs/cgroup/$g; continue; }
    [ "$g" = "$c" ] || for s in ${g%,*} ${g#*,}; do $bb ln -s $g /sys/fs/cgroup/$s; done
  done
  $bb mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  $bb mount -t cgroup -o nosuid,nodev,noexec,none,name=systemd cgroup /sys/fs/cgroup/systemd
  $bb mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup/unified \
    || die "cannot mount cgroup2"
else
  $bb mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup \
    || die "cannot mount cgroup2"
fi
while read -r tag path; do
  $bb mkdir -p "$path" 2>/dev/null
  $bb mount -t 9p -o $o "$tag" "$path" || die "cannot mount --rw $path"
done < $IO/mounts
$bb hostname vmlane
$bb ip link set lo up
echo "[vmlane] command starts at guest uptime $($bb cut -d' ' -f1 /proc/uptime)s"
/bin/bash $IO/cmd.sh < /dev/null
echo $? > $IO/rc
echo "[vmlane] command ended at guest uptime $($bb cut -d' ' -f1 /proc/uptime)s"
$bb sync
$bb poweroff -f
STAGE2

# Pass the console through line by line as it comes: CRs dropped, the lane's
# own lines to stderr, the kernel's last "reboot: Power down" left out. mawk
# (Debian's awk) reads a pipe in big blocks unless told -W interactive.
if command -v mawk >/dev/null; then AWK=(mawk -W interactive); else AWK=(awk); fi

set +e
timeout -k 5 "$TMO" qemu-system-x86_64 "${ACC[@]}" -M pc -smp "$SMP" -m "$MEM" \
  -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
  -kernel "$K/vmlinux" -initrd "$K/initrd.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1$APPEND" \
  "${DEVS[@]}" < /dev/null |
  "${AWK[@]}" '{ sub(/\r$/, "") }
       /^\[vmlane\] / { print > "/dev/stderr"; fflush("/dev/stderr"); next }
       /^\[ *[0-9.]+\] reboot: Power down$/ { next }
       { print; fflush() }'
q=${PIPESTATUS[0]}
set -e
if [ "$q" = 124 ]; then err "timed out after ${TMO}s"; exit 124; fi
if [ ! -s "$IO/rc" ]; then err "the guest reported no exit status (qemu exit status $q)"; exit 125; fi
exit "$(cat "$IO/rc")"
