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

# kernel_version [base|update|VERSION]: the kernel ABI (e.g. 6.1.0-56-amd64). "base" (the default, or $KV)
# is the second newest linux-image-6.1.0-N-amd64 the mirror offers: what the test system boots. "update"
# is the newest (what linux-image-amd64 points at): what a later scenario installs. Chosen from apt-cache
# every time, because old ABIs drop off the mirror.
kernel_version() {
    local which=${1:-${KV:-base}} versions
    case $which in
    base | update) ;;
    *)
        printf '%s\n' "$which"
        return
        ;;
    esac
    versions=$(kernel_versions)
    if [[ -z $versions ]]; then  # a fresh machine may have no package lists yet
        apt-get update -qq >&2 || true
        versions=$(kernel_versions)
    fi
    (($(wc -l <<<"$versions") >= 2)) || die "apt-cache offers fewer than two linux-image-6.1.0-N-amd64 (apt-get update?)"
    if [[ $which == update ]]; then tail -n1 <<<"$versions"; else tail -n2 <<<"$versions" | head -n1; fi
}
kernel_versions() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
        sed -n 's/^linux-image-\(6\.1\.0-[0-9]*-amd64\) .*/\1/p' | sort -V
}

# fetch_deb PACKAGE: the path of PACKAGE's .deb, downloaded once into $WORK/debs (never installed).
fetch_deb() {
    local deb
    deb=$(compgen -G "$WORK/debs/${1}_*.deb" | head -n1) || true
    if [[ -z $deb ]]; then
        log "downloading $1"
        mkdir -p "$WORK/debs"
        # apt warns that it cannot drop privileges to _apt for a directory _apt cannot write; harmless.
        (cd "$WORK/debs" && apt-get download -q "$1" 2>&1 | { grep -v '^W: Download is performed unsandboxed' || true; } >&2)
        deb=$(compgen -G "$WORK/debs/${1}_*.deb" | head -n1) || die "apt-get download $1 failed"
    fi
    printf '%s\n' "$deb"
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

# The root filesystem's UUID (in cryptroot, images/mksystem): fixed, because grub-mkconfig writes it into
# grub.cfg (images/mkboot), which GRUB measures.
# shellcheck disable=SC2034
ROOT_FS_UUID=7e57f500-0000-4000-8000-000000000001
