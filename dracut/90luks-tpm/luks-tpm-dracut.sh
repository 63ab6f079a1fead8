#!/bin/sh
# luks-tpm-dracut unlock|fence|emergency: the unlock pass (an initqueue job, or luks-tpm.service with
# systemd), the PCR 15 fence (the pre-pivot hook, or luks-tpm-fence.service) and the emergency hook's
# fence; see the functions.
# shellcheck source-path=SCRIPTDIR source=../../hooks/functions.sh
. /usr/lib/luks-tpm/functions

case $1 in
unlock)
    # rd.luks=0: dracut opens no LUKS volume at all.
    luks_tpm_also_off=rd.luks=0
    luks_tpm_unlock
    ;;
fence) luks_tpm_fence boot ;;
emergency) luks_tpm_fence emergency ;;
*) luks_tpm_say "usage: $0 unlock|fence|emergency" ;;
esac
exit 0
