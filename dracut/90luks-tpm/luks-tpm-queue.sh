#!/bin/sh
# dracut pre-trigger hook (no systemd): queue the one-pass TPM unlock as a one-time "settled" job.
# Settled jobs run in name order once udev is idle: "00luks-tpm" comes before the crypt module's
# "cryptroot-ask-*" jobs, which then find our volumes open and skip them.
/sbin/initqueue --settled --onetime --unique --name 00luks-tpm /usr/sbin/luks-tpm-dracut unlock
