#!/bin/sh
# Unlock every /etc/crypttab entry marked x-luks-tpm from the TPM, in one pass (dracut, with or without
# systemd). Bounded: waits at most luks_tpm.timeout= seconds (default 10) for the TPM and the volumes
# (the pass itself: luks_tpm.unlock_timeout=, default 120),
# then leaves whatever is not open to the passphrase prompt. Never loops, never deletes anything.
TAB=/etc/crypttab
RE='^[[:space:]]*[^#[:space:]]+[[:space:]]+[^[:space:]]+[[:space:]]+[^[:space:]]+[[:space:]]+([^[:space:]]*,)?x-luks-tpm(,|[[:space:]]|$)'
say() { echo "luks-tpm: $*" >&2; }

grep -Eq "$RE" "$TAB" 2>/dev/null || exit 0
timeout=10 unlock_timeout=120
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case $arg in
    luks_tpm=0 | luks_tpm=off | rd.luks=0) exit 0 ;;
    luks_tpm.timeout=*) timeout=${arg#luks_tpm.timeout=} ;;
    luks_tpm.unlock_timeout=*) unlock_timeout=${arg#luks_tpm.unlock_timeout=} ;;
    esac
done

modprobe -q tpm_tis 2>/dev/null
modprobe -q tpm_crb 2>/dev/null
modprobe -q dm_crypt 2>/dev/null
tenths=$((timeout * 10))
while [ ! -c /dev/tpmrm0 ] && [ "$tenths" -gt 0 ]; do
    sleep 0.1
    tenths=$((tenths - 1))
done
if [ ! -c /dev/tpmrm0 ]; then
    say "no TPM (/dev/tpmrm0) after ${timeout}s; falling back to passphrase"
    exit 0
fi
uuids=$(grep -E "$RE" "$TAB" | sed -n 's/^[[:space:]]*[^[:space:]]\{1,\}[[:space:]]\{1,\}UUID=\([^[:space:]]*\)[[:space:]].*/\1/p')
for uuid in $uuids; do
    while [ ! -e "/dev/disk/by-uuid/$uuid" ] && [ "$tenths" -gt 0 ]; do
        sleep 0.1
        tenths=$((tenths - 1))
    done
done

[ -d /run/cryptsetup ] || mkdir -m0700 /run/cryptsetup
read -r started _ </proc/uptime
# The key goes TPM -> kernel keyring -> dm-crypt inside this one process: no key file, pipe, argv, env.
# A TPM that stops answering must not hang the boot: bound the whole pass (luks_tpm.unlock_timeout=).
bound=""
command -v timeout >/dev/null && bound="timeout $unlock_timeout"
$bound /usr/sbin/luks-tpm --tcti device:/dev/tpmrm0 open --all --crypttab "$TAB"
rc=$?
read -r ended _ </proc/uptime
say "unlock pass took $(echo "$started $ended" | awk '{printf "%.2f", $2 - $1}')s (exit $rc)"
case $rc in
0) ;;
5) say "some volumes were not opened; asking for their passphrase" ;;
*) say "failed (exit $rc); falling back to passphrase" ;;
esac
exit 0
