# shellcheck shell=bash
# Common settings for the test-VM scripts in images/. Sourced, not run.
# Everything these scripts build or download goes under $WORK (gitignored), so the host stays untouched.

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${LUKS_TPM_WORK:-$TOP/.work/vm}
# shellcheck disable=SC2034  # used by the scripts that source this file
IMAGES=$TOP/images
# The venv's interpreter (Debian's /usr/bin/python3.11): mksystem enrolls the test disks with it. The
# initramfs builders use the package's runtime instead (luks_tpm_deb).
# shellcheck disable=SC2034
PYTHON=${LUKS_TPM_PYTHON:-$TOP/.venv/bin/python}
mkdir -p "$WORK"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "$*"; exit 1; }

# luks-tpm's Debian package, built (or found up to date) by packaging/build-deb: what the images install.
luks_tpm_deb() {
    "$TOP/packaging/build-deb" "$TOP/dist" || die "cannot build the luks-tpm package"
}

# unpack_luks_tpm DEB ROOT: the package's files under ROOT, and the byte-code its postinst would compile
# (the hooks copy byte-code instead of sources into the initramfs), named by its installed paths.
unpack_luks_tpm() {
    dpkg-deb -x "$1" "$2"
    /usr/bin/python3 -m compileall -q -d /usr/lib/luks-tpm/python "$2/usr/lib/luks-tpm/python" >/dev/null
}

# The kernel the test VM boots: the one the linux-image-amd64 metapackage points at today.
kernel_version() {
    if [[ -z ${KV:-} ]]; then
        KV=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -n1)
        if [[ -z $KV ]]; then  # a fresh machine may have no package lists yet
            apt-get update -qq >&2 || true
            KV=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -n1)
        fi
        [[ -n $KV ]] || die "cannot find the kernel version of linux-image-amd64 (apt-get update?)"
    fi
    printf '%s\n' "$KV"
}

# Short content hash of files/directories (names and contents), for cache keys.
hash_inputs() {
    local path
    for path in "$@"; do
        if [[ -d $path ]]; then
            (cd "$path" && find . -name __pycache__ -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
        elif [[ -e $path ]]; then
            sha256sum "$path"
        else
            printf '%s\n' "$path"
        fi
    done | sha256sum | cut -c1-16
}
