"""Everything that talks to the TPM; the only package that imports tpm2-pytss.

- context: the connection (`Tpm`), handle lifetime, sessions, return codes as `TpmError`
- srk: the storage root key and the endorsement key (which TPM, which owner seed)
- pcr: PCR reads, policy digests, the PCR-15 fence
- keys: the derived primary's HMAC, Seal and Unseal (the only results that are key material)
- info: identity and dictionary-attack state
"""

from .context import Tpm, TpmError

__all__ = ["Tpm", "TpmError"]
