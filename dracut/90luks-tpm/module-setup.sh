#!/bin/bash
# shellcheck disable=SC2154  # hostonly, initdir, moddir, dracutsysrootdir, systemdsystemunitdir: set by dracut
# dracut module: unlock every crypttab volume marked x-luks-tpm from the TPM in one pass, before the crypt
# module (or systemd-cryptsetup) asks for passphrases. Those it cannot open fall through to them.

# shellcheck source-path=SCRIPTDIR source=../../hooks/functions.sh
. /usr/lib/luks-tpm/functions

# Included by default when hostonly and /etc/crypttab has an x-luks-tpm entry; otherwise on request
# (--add luks-tpm).
check() {
    if [[ $hostonly ]] && luks_tpm_has_marked "$dracutsysrootdir/etc/crypttab"; then
        return 0
    fi
    return 255
}

depends() {
    echo crypt
    return 0
}

installkernel() {
    # Built in on Debian/Fedora kernels; modules elsewhere. Missing ones are not an error.
    hostonly='' instmods -o tpm_tis tpm_crb dm_crypt
}

# The command that lists what to copy, in luks_tpm_lister (same rules as the initramfs-tools hook): a
# development install's interpreter ($LUKS_TPM_PYTHON, PYTHON= in /etc/luks-tpm/initramfs.conf), else
# the Debian package's runtime for Debian's python3, else the #! line of the luks-tpm command.
luks_tpm_find_lister() {
    local python=${LUKS_TPM_PYTHON:-} launcher
    if [[ -z $python && -r $dracutsysrootdir/etc/luks-tpm/initramfs.conf ]]; then
        python=$(sed -n 's/^PYTHON=//p' "$dracutsysrootdir/etc/luks-tpm/initramfs.conf" | tail -n1)
    fi
    # -I: ignore PYTHON* variables and the user's site-packages, exactly like the boot-time run.
    luks_tpm_lister=("$python" -I "$LUKS_TPM_LIBDIR/luks-tpm-files")
    if [[ -z $python && -d $LUKS_TPM_LIBDIR/python/luks_tpm ]]; then
        # -S: nothing from the system's site-packages; -B: no byte-code written into the package's files.
        luks_tpm_lister=(/usr/bin/python3 -I -S -B "$LUKS_TPM_LIBDIR/luks-tpm-files" --path "$LUKS_TPM_LIBDIR/python")
        return 0
    fi
    if [[ -z $python ]] && launcher=$(command -v luks-tpm); then
        python=$(sed -n '1s/^#! *\([^ ]*\).*/\1/p' "$launcher")
    fi
    luks_tpm_lister[0]=${python:-/usr/bin/python3}
}

install() {
    local list kind src dest interpreter=""
    local -a luks_tpm_lister
    luks_tpm_find_lister
    # luks-tpm-files lists the interpreter, the modules luks-tpm imports, and every library it dlopens
    # (libcryptsetup, libkeyutils, the TSS's TCTI, libgcc_s): see its docstring.
    if ! list=$("${luks_tpm_lister[@]}"); then
        derror "luks-tpm: ${luks_tpm_lister[0]} cannot import luks_tpm"
        return 1
    fi
    while IFS=$'\t' read -r kind src dest; do
        case $kind in
        python) inst_binary "$src" "$dest" && interpreter=$dest ;;
        exec)
            inst_library "$src" "$dest" || return 1
            # pip wheels ship unstripped extension modules; strip our copies only.
            if [[ $dest == "$LUKS_TPM_LIBDIR"/* ]] && command -v strip >/dev/null; then
                strip --strip-unneeded "$initdir$dest"
            fi
            ;;
        file) inst_simple "$src" "$dest" ;;
        dir) mkdir -p "$initdir$dest" ;;
        esac || { derror "luks-tpm: cannot install $src"; return 1; }
    done <<<"$list"
    [[ -n $interpreter ]] || return 1

    # The command: isolated (-I), no site (-S): no venv, .pth or PYTHON* variables in the initramfs.
    mkdir -p "$initdir/usr/sbin"
    cat >"$initdir/usr/sbin/luks-tpm" <<LAUNCHER
#!/bin/sh
exec $interpreter -I -S -c 'import sys; sys.path[:0] = ["$LUKS_TPM_LIBDIR/python"]; sys.argv[0] = "luks-tpm"; from luks_tpm.__main__ import main; sys.exit(main())' "\$@"
LAUNCHER
    chmod 0755 "$initdir/usr/sbin/luks-tpm"
    inst_simple "$LUKS_TPM_LIBDIR/functions" "$LUKS_TPM_LIBDIR/functions"
    inst_script "$moddir/luks-tpm-dracut.sh" /usr/sbin/luks-tpm-dracut
    inst_multiple -o awk sed grep sleep timeout

    # Our entries, marked, in our own list; in the image's /etc/crypttab (which the crypt module writes
    # only in hostonly mode, filtered to the root's devices) under the same names but without the marker,
    # so that the crypt module and systemd-cryptsetup see the volumes we opened as open, and
    # systemd-cryptsetup does not warn about an unknown option for each of them.
    local line name
    mkdir -p "$initdir$LUKS_TPM_LIBDIR"
    : >"$initdir$LUKS_TPM_CRYPTTAB"
    if [[ -r $dracutsysrootdir/etc/crypttab ]]; then
        luks_tpm_crypttab marked <"$dracutsysrootdir/etc/crypttab" >"$initdir$LUKS_TPM_CRYPTTAB"
    fi
    if [[ -f $initdir/etc/crypttab ]]; then
        luks_tpm_crypttab strip <"$initdir/etc/crypttab" >"$initdir/etc/crypttab.luks-tpm"
        mv "$initdir/etc/crypttab.luks-tpm" "$initdir/etc/crypttab"
    fi
    while read -r name _ && IFS= read -r line <&3; do
        awk -v name="$name" '$1 == name { found = 1 } END { exit !found }' "$initdir/etc/crypttab" 2>/dev/null ||
            printf '%s\n' "$line" >>"$initdir/etc/crypttab"
    done <"$initdir$LUKS_TPM_CRYPTTAB" 3< <(luks_tpm_crypttab strip <"$initdir$LUKS_TPM_CRYPTTAB")

    # The fence before the real root runs, and before an emergency shell (both modes source emergency hooks).
    inst_hook emergency 00 "$moddir/luks-tpm-fence.sh"
    if dracut_module_included systemd; then
        inst_simple "$moddir/luks-tpm.service" "${systemdsystemunitdir:?}/luks-tpm.service"
        inst_simple "$moddir/luks-tpm-fence.service" "$systemdsystemunitdir/luks-tpm-fence.service"
        $SYSTEMCTL -q --root "$initdir" add-wants cryptsetup.target luks-tpm.service
        $SYSTEMCTL -q --root "$initdir" add-wants initrd.target luks-tpm-fence.service
        $SYSTEMCTL -q --root "$initdir" add-wants initrd-switch-root.target luks-tpm-fence.service
    else
        # Before udev is triggered, so it is queued ahead of the crypt module's cryptroot-ask jobs.
        inst_hook pre-trigger 90 "$moddir/luks-tpm-queue.sh"
        inst_hook pre-pivot 90 "$moddir/luks-tpm-fence.sh"
    fi
}
