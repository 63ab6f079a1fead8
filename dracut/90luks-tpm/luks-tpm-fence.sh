#!/bin/sh
# dracut pre-pivot hook (no systemd): raise the PCR 15 fence before the real root runs. dracut sources
# hooks into its own shell: run the script instead of defining anything here.
/usr/sbin/luks-tpm-dracut fence
