"""Everything that talks to the TPM; the only package that touches the TSS (tpm2-pytss's compiled ESYS binding).

- esys: ESYS through that binding alone, without tpm2-pytss's Python layer (and its `cryptography`)
- templates: the public areas of the derived primary, sealed objects, the SRK and the EK
- context: the connection (`Tpm`), handle lifetime, sessions, return codes as `TpmError`
- srk: the storage root key and the endorsement key (which TPM, which owner seed)
- pcr: PCR reads, policy digests, the PCR-15 fence
- keys: the derived primary's HMAC, Seal and Unseal (the only results that are key material)
- info: identity and dictionary-attack state
"""

from .context import Tpm
from .responses import TpmError

__all__ = ["Tpm", "TpmError"]
