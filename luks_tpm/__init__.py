"""luks-tpm: bind LUKS2 volumes to the TPM 2.0 and unlock them through the kernel keyring."""

__version__ = "0.1.0"
