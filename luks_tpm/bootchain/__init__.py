"""Measured boot on OVMF/UEFI -> Debian shim -> GRUB 2.06-13 -> Linux, stdlib only: parse and replay the TCG2
event log (eventlog), Authenticode (authenticode), GRUB's script and measurements (grubscript, grubemu), and the
next boot's PCRs (predict.next_boot). Errors: errors.EventLogError, ReplayMismatch, PEFormatError, Unpredictable.
"""
