#!/bin/sh
# dracut emergency hook (with and without systemd): raise the PCR 15 fence before the emergency shell, and
# give no shell while volumes the TPM opened are open. dracut sources hooks into its own shell: run the
# script instead of defining anything here.
/usr/sbin/luks-tpm-dracut emergency
