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

install() {
    local list
    list=$(mktemp "${TMPDIR:-/var/tmp}/luks-tpm-files.XXXXXX") || return 1
    # luks-tpm-files lists the interpreter, the modules luks-tpm imports, and every library it dlopens
    # (libcryptsetup, libkeyutils, libcrypto, the TSS and its TCTI, libgcc_s): see its docstring.
    if ! luks_tpm_list_files "$dracutsysrootdir" >"$list"; then
        derror "luks-tpm: cannot list what luks-tpm needs (does its interpreter import luks_tpm?)"
        rm -f "$list"
        return 1
    fi
    luks_tpm_install_files "$list" "$initdir" inst_binary inst_library inst_simple || { rm -f "$list"; return 1; }
    rm -f "$list"
    luks_tpm_write_launcher "$initdir" "$luks_tpm_interpreter"
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
        luks_tpm_strip_crypttab "$initdir/etc/crypttab"
    fi
    while read -r name _ && IFS= read -r line <&3; do
        awk -v name="$name" '$1 == name { found = 1 } END { exit !found }' "$initdir/etc/crypttab" 2>/dev/null ||
            printf '%s\n' "$line" >>"$initdir/etc/crypttab"
    done <"$initdir$LUKS_TPM_CRYPTTAB" 3< <(luks_tpm_crypttab strip <"$initdir$LUKS_TPM_CRYPTTAB")

    # The fence before the real root runs, and before an emergency shell (both modes source emergency hooks).
    inst_hook emergency 00 "$moddir/luks-tpm-emergency.sh"
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
