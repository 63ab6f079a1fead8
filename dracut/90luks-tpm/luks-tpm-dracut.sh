#!/bin/sh
# luks-tpm-dracut unlock|fence: the unlock pass (an initqueue job, or luks-tpm.service with systemd) and
# the PCR 15 fence (the pre-pivot and emergency hooks, or luks-tpm-fence.service); see the functions.
# shellcheck source-path=SCRIPTDIR source=../../hooks/functions.sh
. /usr/lib/luks-tpm/functions

case $1 in
unlock)
    # rd.luks=0: dracut opens no LUKS volume at all.
    luks_tpm_also_off=rd.luks=0
    luks_tpm_unlock
    ;;
fence) luks_tpm_fence ;;
*) luks_tpm_say "usage: $0 unlock|fence" ;;
esac
exit 0
