# shellcheck shell=sh
# luks-tpm's boot functions, installed as /usr/lib/luks-tpm/functions and copied into the initramfs (both
# builders). Sourced at build time by the initramfs-tools hook and the dracut module (which crypttab
# entries are ours) and at boot by the builder-specific scripts (the unlock pass, the fence).
# POSIX sh (dash, busybox ash, bash). Sourcing only defines luks_tpm_* names: dracut sources its hooks
# into its own shell, so nothing here runs at load time, exits, or uses a name without that prefix.
# The kernel command line: luks_tpm=0 (or off) skips the unlock pass but never the fence;
# luks_tpm.timeout= bounds the waits for the TPM and the disks (seconds, default 10);
# luks_tpm.unlock_timeout= bounds each luks-tpm run (the unlock pass, the fence; default 120);
# luks_tpm.fence=optional boots on when the fence cannot be raised (the default stops the boot).

LUKS_TPM=/usr/sbin/luks-tpm
LUKS_TPM_LIBDIR=/usr/lib/luks-tpm
# Inside the initramfs: the entries to unlock, marked, written by the build-time hook from the crypttab
# the image carries (the copy the other tools read has the marker stripped, so they stay quiet).
LUKS_TPM_CRYPTTAB=$LUKS_TPM_LIBDIR/crypttab
LUKS_TPM_TCTI=device:/dev/tpmrm0
# What the unlock pass leaves for the fence: that it found the TPM, and the mappings it opened from it.
LUKS_TPM_RUN=/run/luks-tpm
LUKS_TPM_CMDLINE=/proc/cmdline
LUKS_TPM_SYS_BLOCK=/sys/block

luks_tpm_say() { echo "luks-tpm: $*" >&2; }

# luks_tpm_crypttab marked|strip: filter a crypttab on stdin. `marked` prints the entries whose options
# (4th field) include x-luks-tpm; `strip` prints every line, those entries without that option. A `#`
# starts a comment anywhere on a line, as for luks-tpm's own parser (luks_tpm/crypttab.py).
luks_tpm_crypttab() {
    awk -v mode="$1" '
    {
        raw = $0
        sub(/#.*/, "")
        marked = 0
        kept = ""
        if (NF >= 4) {
            n = split($4, option, ",")
            for (i = 1; i <= n; i++) {
                if (option[i] == "x-luks-tpm") marked = 1
                else kept = kept (kept == "" ? "" : ",") option[i]
            }
        }
        if (mode == "marked") {
            if (marked) print raw
        } else if (!marked) {
            print raw
        } else {
            line = $1 " " $2 " " $3
            if (kept != "") line = line " " kept
            for (i = 5; i <= NF; i++) line = line " " $i
            print line
        }
    }'
}

# luks_tpm_strip_crypttab FILE: crypttab FILE, in place, without the x-luks-tpm marker (the copy in the
# image that cryptroot or systemd-cryptsetup reads: quiet about an option they do not know).
luks_tpm_strip_crypttab() {
    luks_tpm_crypttab strip <"$1" >"$1.luks-tpm" && mv "$1.luks-tpm" "$1"
}

# luks_tpm_list_files SYSROOT: print the files luks-tpm needs in a boot image (luks-tpm-files' list), as
# listed by the interpreter luks-tpm is installed for. A development install first: $LUKS_TPM_PYTHON, or
# PYTHON= in SYSROOT/etc/luks-tpm/initramfs.conf, an interpreter that imports luks_tpm from its own
# site-packages or venv. Else the Debian package's runtime in $LUKS_TPM_LIBDIR/python, for Debian's
# python3. Else the interpreter on the #! line of the luks-tpm command (pip install), or Debian's python3.
# -I: no PYTHON* variables and no user site-packages, exactly like the boot-time run.
luks_tpm_list_files() {
    luks_tpm_python=${LUKS_TPM_PYTHON:-}
    if [ -z "$luks_tpm_python" ] && [ -r "$1/etc/luks-tpm/initramfs.conf" ]; then
        luks_tpm_python=$(sed -n 's/^PYTHON=//p' "$1/etc/luks-tpm/initramfs.conf" | tail -n1)
    fi
    if [ -z "$luks_tpm_python" ] && [ -d "$LUKS_TPM_LIBDIR/python/luks_tpm" ]; then
        # -S: nothing from the system's site-packages; -B: no byte-code written into the package's files.
        /usr/bin/python3 -I -S -B "$LUKS_TPM_LIBDIR/luks-tpm-files" --path "$LUKS_TPM_LIBDIR/python"
        return
    fi
    if [ -z "$luks_tpm_python" ] && luks_tpm_launcher=$(command -v luks-tpm); then
        luks_tpm_python=$(sed -n '1s/^#! *\([^ ]*\).*/\1/p' "$luks_tpm_launcher")
    fi
    "${luks_tpm_python:-/usr/bin/python3}" -I "$LUKS_TPM_LIBDIR/luks-tpm-files"
}

# luks_tpm_install_files LIST DESTDIR COPY_PYTHON COPY_EXEC COPY_FILE: copy what LIST (luks_tpm_list_files'
# output, a file) names into the image at DESTDIR, through the builder's own copy functions (each called as
# FUNCTION SRC DEST, failing with a non-zero status). The interpreter's path in the image goes to
# luks_tpm_interpreter. pip wheels ship unstripped extension modules (debug info: megabytes): our copies
# under $LUKS_TPM_LIBDIR are stripped.
luks_tpm_install_files() {
    luks_tpm_interpreter=""
    luks_tpm_tab=$(printf '\t')
    while IFS=$luks_tpm_tab read -r luks_tpm_kind luks_tpm_src luks_tpm_dest; do
        case $luks_tpm_kind in
        python) "$3" "$luks_tpm_src" "$luks_tpm_dest" && luks_tpm_interpreter=$luks_tpm_dest ;;
        exec)
            "$4" "$luks_tpm_src" "$luks_tpm_dest" || return 1
            case $luks_tpm_dest in
            "$LUKS_TPM_LIBDIR"/*) if command -v strip >/dev/null; then strip --strip-unneeded "$2$luks_tpm_dest"; fi ;;
            esac
            ;;
        file) "$5" "$luks_tpm_src" "$luks_tpm_dest" ;;
        dir) mkdir -p "$2$luks_tpm_dest" ;;
        esac || { luks_tpm_say "cannot copy $luks_tpm_src"; return 1; }
    done <"$1"
    [ -n "$luks_tpm_interpreter" ] || { luks_tpm_say "the list names no interpreter"; return 1; }
}

# luks_tpm_write_launcher DESTDIR INTERPRETER: the luks-tpm command of a boot image: isolated (-I: no
# PYTHON* variables, no cwd on sys.path), no site (-S: no venv, .pth), the runtime first on sys.path.
luks_tpm_write_launcher() {
    mkdir -p "$1/usr/sbin"
    cat >"$1/usr/sbin/luks-tpm" <<LUKS_TPM_LAUNCHER
#!/bin/sh
exec $2 -I -S -c 'import sys; sys.path[:0] = ["$LUKS_TPM_LIBDIR/python"]; sys.argv[0] = "luks-tpm"; from luks_tpm.__main__ import main; main()' "\$@"
LUKS_TPM_LAUNCHER
    chmod 0755 "$1/usr/sbin/luks-tpm"
}

# luks_tpm_has_marked FILE: true if crypttab FILE has an entry marked x-luks-tpm.
luks_tpm_has_marked() {
    [ -r "$1" ] && [ -n "$(luks_tpm_crypttab marked <"$1")" ]
}

# luks_tpm_cmdline: read the kernel command line into luks_tpm_enabled (1/0), luks_tpm_timeout and
# luks_tpm_unlock_timeout. $luks_tpm_also_off: more arguments that mean "no unlock pass" (dracut: rd.luks=0).
luks_tpm_cmdline() {
    luks_tpm_enabled=1 luks_tpm_timeout=10 luks_tpm_unlock_timeout=120 luks_tpm_fence_optional=0
    read -r luks_tpm_args <"$LUKS_TPM_CMDLINE"
    for luks_tpm_arg in $luks_tpm_args; do
        case $luks_tpm_arg in
        luks_tpm=0 | luks_tpm=off) luks_tpm_enabled=0 ;;
        luks_tpm.timeout=*) luks_tpm_timeout=${luks_tpm_arg#luks_tpm.timeout=} ;;
        luks_tpm.unlock_timeout=*) luks_tpm_unlock_timeout=${luks_tpm_arg#luks_tpm.unlock_timeout=} ;;
        luks_tpm.fence=optional) luks_tpm_fence_optional=1 ;;
        esac
        for luks_tpm_off in ${luks_tpm_also_off-}; do
            [ "$luks_tpm_arg" != "$luks_tpm_off" ] || luks_tpm_enabled=0
        done
    done
}

# luks_tpm_wait_tpm: wait (bounded by luks_tpm_timeout; the budget left is in luks_tpm_tenths) for the
# kernel's TPM resource manager. Once it was found missing, later calls (the fence) do not wait again.
luks_tpm_wait_tpm() {
    # Built in on Debian kernels; modules elsewhere.
    modprobe -q tpm_tis 2>/dev/null
    modprobe -q tpm_crb 2>/dev/null
    luks_tpm_tenths=$((luks_tpm_timeout * 10))
    [ ! -e "$LUKS_TPM_RUN/no-tpm" ] || luks_tpm_tenths=0
    while [ ! -c /dev/tpmrm0 ] && [ "$luks_tpm_tenths" -gt 0 ]; do
        sleep 0.1
        luks_tpm_tenths=$((luks_tpm_tenths - 1))
    done
    [ -c /dev/tpmrm0 ] && return 0
    mkdir -p "$LUKS_TPM_RUN" && : >"$LUKS_TPM_RUN/no-tpm"
    return 1
}

# luks_tpm_wait_disks: give udev what is left of the same budget to make the /dev/disk/by-uuid links of
# our volumes (luks-tpm also finds them by their headers when there is no link).
luks_tpm_wait_disks() {
    luks_tpm_uuids=$(awk '$2 ~ /^UUID=/ { print substr($2, 6) }' "$LUKS_TPM_CRYPTTAB")
    for luks_tpm_uuid in $luks_tpm_uuids; do
        while [ ! -e "/dev/disk/by-uuid/$luks_tpm_uuid" ] && [ "$luks_tpm_tenths" -gt 0 ]; do
            sleep 0.1
            luks_tpm_tenths=$((luks_tpm_tenths - 1))
        done
    done
}

# luks_tpm_run ARG...: luks-tpm ARG... on the TPM, bounded by luks_tpm_unlock_timeout (a TPM that stops
# answering must not hang the boot); its exit status in luks_tpm_rc, its time (seconds) in luks_tpm_took.
luks_tpm_run() {
    read -r luks_tpm_started _ </proc/uptime
    if command -v timeout >/dev/null; then
        timeout "$luks_tpm_unlock_timeout" "$LUKS_TPM" --tcti "$LUKS_TPM_TCTI" "$@"
    else
        "$LUKS_TPM" --tcti "$LUKS_TPM_TCTI" "$@"
    fi
    luks_tpm_rc=$?
    read -r luks_tpm_ended _ </proc/uptime
    luks_tpm_took=$(echo "$luks_tpm_started $luks_tpm_ended" | awk '{ printf "%.2f", $2 - $1 }')
}

# luks_tpm_unlock: the one unlock pass, before the builder's own passphrase prompts: it opens
# every volume it can (TPM -> kernel keyring -> dm-crypt inside one process: no key file, pipe, argv or
# environment) and leaves the rest to the prompts. Never fails the boot.
luks_tpm_unlock() {
    [ -x "$LUKS_TPM" ] && [ -s "$LUKS_TPM_CRYPTTAB" ] || return 0
    luks_tpm_cmdline
    [ "$luks_tpm_enabled" = 1 ] || return 0
    modprobe -q dm_crypt 2>/dev/null
    mkdir -p "$LUKS_TPM_RUN"
    if ! luks_tpm_wait_tpm; then
        luks_tpm_say "no TPM (/dev/tpmrm0) after ${luks_tpm_timeout}s; falling back to passphrase"
        return 0
    fi
    luks_tpm_wait_disks
    [ -d /run/cryptsetup ] || mkdir -m0700 /run/cryptsetup
    : >"$LUKS_TPM_RUN/tpm-used"
    luks_tpm_crypt_mappings >"$LUKS_TPM_RUN/before"
    luks_tpm_run open --all --crypttab "$LUKS_TPM_CRYPTTAB"
    luks_tpm_crypt_mappings >"$LUKS_TPM_RUN/after"
    luks_tpm_new_mappings "$LUKS_TPM_RUN/before" "$LUKS_TPM_RUN/after" >"$LUKS_TPM_RUN/tpm-opened"
    luks_tpm_say "unlock pass took ${luks_tpm_took}s (exit $luks_tpm_rc)"
    case $luks_tpm_rc in
    0) ;;
    5) luks_tpm_say "some volumes were not opened; asking for their passphrase" ;;
    *) luks_tpm_say "failed (exit $luks_tpm_rc); falling back to passphrase" ;;
    esac
    return 0
}

# luks_tpm_crypt_mappings: "DM-UUID NAME" of every dm-crypt mapping (libcryptsetup's CRYPT-* UUIDs).
luks_tpm_crypt_mappings() {
    for luks_tpm_dm in "$LUKS_TPM_SYS_BLOCK"/dm-*/dm; do
        if [ ! -r "$luks_tpm_dm/uuid" ] || ! read -r luks_tpm_dm_uuid <"$luks_tpm_dm/uuid"; then
            continue
        fi
        case $luks_tpm_dm_uuid in
        CRYPT-*) read -r luks_tpm_dm_name <"$luks_tpm_dm/name" && echo "$luks_tpm_dm_uuid $luks_tpm_dm_name" ;;
        esac
    done
}

# luks_tpm_new_mappings BEFORE AFTER: the lines of AFTER (luks_tpm_crypt_mappings) whose mapping BEFORE
# does not list. BEFORE is usually empty: the files are told apart by name, not by awk's NR == FNR, which
# holds in AFTER too when BEFORE has no line.
luks_tpm_new_mappings() {
    awk 'FILENAME == ARGV[1] { seen[$1]; next } !($1 in seen)' "$1" "$2"
}

# luks_tpm_strangers: the names of the dm-crypt mappings the unlock pass did not open, when it opened
# any from the TPM (a volume opened by passphrase beside TPM-opened ones: the cross-volume guard).
luks_tpm_strangers() {
    [ -s "$LUKS_TPM_RUN/tpm-opened" ] || return 0
    luks_tpm_crypt_mappings >"$LUKS_TPM_RUN/now"
    awk 'NR == FNR { ours[$1]; next } !($1 in ours) { print $2 }' "$LUKS_TPM_RUN/tpm-opened" "$LUKS_TPM_RUN/now" |
        tr '\n' ' '
}

# luks_tpm_stop MESSAGE: the boot must not go on (docs/security.md): say why on the console, then power
# off. Nothing after this runs, whatever happens to the power-off.
luks_tpm_stop() {
    luks_tpm_say "$*"
    luks_tpm_say "STOPPING THE BOOT: powering off in 5 seconds (docs/security.md, 'The cross-volume guard')"
    sleep 5
    echo o >/proc/sysrq-trigger 2>/dev/null
    poweroff -f 2>/dev/null
    while :; do sleep 60; done
}

# luks_tpm_raise: run `luks-tpm fence`; true when PCR 15 was extended. luks_tpm_why says why not.
luks_tpm_raise() {
    if [ ! -x "$LUKS_TPM" ]; then
        luks_tpm_why="$LUKS_TPM is missing"
        return 1
    fi
    if ! luks_tpm_wait_tpm; then
        luks_tpm_why="no TPM (/dev/tpmrm0)"
        return 1
    fi
    luks_tpm_run fence >/dev/null
    luks_tpm_why="luks-tpm fence failed (exit $luks_tpm_rc)"
    [ "$luks_tpm_rc" = 0 ]
}

# luks_tpm_fence [boot|emergency]: raise the PCR 15 fence once every volume is open (by the TPM or by
# passphrase) and before the real root runs (boot), or before an emergency shell (emergency). Always:
# also with luks_tpm=0, after a failed unlock pass, and whether or not a token is fenced (headers can be
# unreadable, and a swapped root can hide its markers). Then the boot stops (luks_tpm_stop) when:
# - the fence could not be raised although the unlock pass used the TPM (unless luks_tpm.fence=optional);
# - a volume was opened by passphrase beside volumes the TPM opened (the cross-volume guard);
# - an emergency shell would get volumes the TPM opened (luks_tpm=0 gives one, with passphrases).
# Without a TPM, or with one the boot never used, a fence that cannot be raised is said, and the boot
# goes on.
luks_tpm_fence() {
    luks_tpm_cmdline
    luks_tpm_strangers=$(luks_tpm_strangers)
    if luks_tpm_raise; then
        luks_tpm_say "fence raised (PCR 15) in ${luks_tpm_took}s"
    elif [ ! -e "$LUKS_TPM_RUN/tpm-used" ]; then
        luks_tpm_say "$luks_tpm_why: fence NOT raised (the unlock pass did not use the TPM)"
    elif [ "$luks_tpm_fence_optional" = 1 ]; then
        luks_tpm_say "$luks_tpm_why: fence NOT raised; booting on because of luks_tpm.fence=optional:" \
            "keys of fenced tokens stay obtainable until reboot"
    else
        luks_tpm_stop "$luks_tpm_why: the fence is NOT raised and this boot used the TPM"
    fi
    if [ -n "$luks_tpm_strangers" ]; then
        luks_tpm_stop "cross-volume guard: ${luks_tpm_strangers% } opened without the TPM beside volumes the" \
            "TPM opened (a look-alike volume?); boot with luks_tpm=0 to open every volume by passphrase"
    fi
    if [ "${1:-boot}" = emergency ] && [ -s "$LUKS_TPM_RUN/tpm-opened" ]; then
        luks_tpm_stop "no emergency shell while volumes the TPM opened are open; boot with luks_tpm=0 to" \
            "get one, with passphrases"
    fi
    return 0
}
