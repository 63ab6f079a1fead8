"""The TSS's ESYS API through tpm2-pytss's compiled binding, without tpm2-pytss's Python layer.

tpm2-pytss's package imports `cryptography` at module level (for PEM keys, certificates and software
policy helpers luks-tpm never uses): 150 ms of every unlock, and 3.7 MiB of every initramfs. Its cffi
extension `_libtpm2_pytss` alone holds the whole ESYS API, the structs and the constants, so luks-tpm
loads that one file, under its own name (a later `import tpm2_pytss` shares it, and with it the cffi
types), and calls ESYS directly. Structs are cffi values with the C field names.

`Esys` is one ESYS context on one TCTI. Its methods are the TPM commands luks-tpm sends, with ESYS's
own defaults for session handles (a password session where the command needs authorization). Outputs
that ESYS allocates are freed when the Python value is collected; the callers that receive key
material zero it before that (context.secret_from_tpm2b).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

_BINDING = "tpm2_pytss._libtpm2_pytss"


def _load_binding() -> Any:
    module = sys.modules.get(_BINDING)
    if module is not None:
        return module
    package = importlib.util.find_spec("tpm2_pytss")  # locates the package without running its __init__
    locations = (package.submodule_search_locations or []) if package is not None else []
    candidates = [path for location in locations for path in sorted(Path(location).glob("_libtpm2_pytss*.so"))]
    if not candidates:
        raise ImportError("tpm2-pytss's compiled binding (_libtpm2_pytss) is not installed")
    loader = importlib.machinery.ExtensionFileLoader(_BINDING, str(candidates[0]))
    spec = importlib.util.spec_from_loader(_BINDING, loader, origin=str(candidates[0]))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[_BINDING] = module
    return module


_binding = _load_binding()
ffi: Any = _binding.ffi
lib: Any = _binding.lib

PASSWORD, NONE = lib.ESYS_TR_PASSWORD, lib.ESYS_TR_NONE


class TssError(Exception):
    """A TSS or TPM response code; `error` is the code without its handle, parameter or session number
    (as tpm2-pytss's TSS2_Exception has it)."""

    def __init__(self, rc: int) -> None:
        super().__init__(ffi.string(lib.Tss2_RC_Decode(rc)).decode(errors="replace"))
        self.rc = rc
        self.error = lib.TPM2_RC_FMT1 + (rc & 0x3F) if rc & lib.TPM2_RC_FMT1 else rc


def check(rc: int) -> None:
    if rc != 0:
        raise TssError(rc)


def owned(pointer: Any) -> Any:
    """An ESYS-allocated output, freed with Esys_Free when Python drops it."""
    return ffi.gc(pointer, lib.Esys_Free)


def unmarshal(kind: str, data: bytes) -> Any:
    """A TPM2B structure from its wire form (a TssError from the MU layer when it does not parse)."""
    value = ffi.new(f"{kind} *")
    offset = ffi.new("size_t *")
    check(getattr(lib, f"Tss2_MU_{kind}_Unmarshal")(data, len(data), offset, value))
    return value


def marshal(kind: str, value: Any) -> bytes:
    size = ffi.sizeof(kind)
    buffer = ffi.new("uint8_t[]", size)
    offset = ffi.new("size_t *")
    check(getattr(lib, f"Tss2_MU_{kind}_Marshal")(value, buffer, size, offset))
    return bytes(ffi.buffer(buffer, offset[0]))


def tpm2b(kind: str, data: bytes = b"") -> Any:
    value = ffi.new(f"{kind} *")
    value.size = len(data)
    ffi.memmove(value.buffer, data, len(data))
    return value


class Esys:
    """One ESYS context over one TCTI (a `name:config` string, as tpm2-tools take it)."""

    def __init__(self, tcti: str) -> None:
        self._tcti = ffi.new("TSS2_TCTI_CONTEXT **")
        check(lib.Tss2_TctiLdr_Initialize(tcti.encode(), self._tcti))
        self._context = ffi.new("ESYS_CONTEXT **")
        rc = lib.Esys_Initialize(self._context, self._tcti[0], ffi.NULL)
        if rc != 0:
            lib.Tss2_TctiLdr_Finalize(self._tcti)
            raise TssError(rc)

    @property
    def context(self) -> Any:
        """The ESYS_CONTEXT * (for the few calls that need the SAPI context under it)."""
        return self._context[0]

    def close(self) -> None:
        if self._context[0] != ffi.NULL:
            lib.Esys_Finalize(self._context)
            lib.Tss2_TctiLdr_Finalize(self._tcti)

    def _out(self, kind: str) -> Any:
        return ffi.new(f"{kind} **")

    def _handle(self, function: str, *args: Any) -> int:
        handle = ffi.new("ESYS_TR *")
        check(getattr(lib, function)(self.context, *args, handle))
        return int(handle[0])

    # ---- ESYS's records of TPM objects -----------------------------------------------------------------

    def tr_from_tpmpublic(self, tpm_handle: int) -> int:
        return self._handle("Esys_TR_FromTPMPublic", tpm_handle, NONE, NONE, NONE)

    def tr_get_name(self, handle: int) -> bytes:
        name = self._out("TPM2B_NAME")
        check(lib.Esys_TR_GetName(self.context, handle, name))
        value = owned(name[0])
        return bytes(ffi.buffer(value.name, value.size))

    def tr_close(self, handle: int) -> None:
        check(lib.Esys_TR_Close(self.context, ffi.new("ESYS_TR *", handle)))

    def tr_set_auth(self, handle: int, auth: Any) -> None:
        check(lib.Esys_TR_SetAuth(self.context, handle, auth))

    def trsess_set_attributes(self, session: int, flags: int, mask: int = 0xFF) -> None:
        check(lib.Esys_TRSess_SetAttributes(self.context, session, flags, mask))

    def trsess_get_attributes(self, session: int) -> int:
        flags = ffi.new("TPMA_SESSION *")
        check(lib.Esys_TRSess_GetAttributes(self.context, session, flags))
        return int(flags[0])

    # ---- commands --------------------------------------------------------------------------------------

    def flush_context(self, handle: int) -> None:
        check(lib.Esys_FlushContext(self.context, handle))

    def read_public(self, handle: int) -> Any:
        public = self._out("TPM2B_PUBLIC")
        check(lib.Esys_ReadPublic(self.context, handle, NONE, NONE, NONE, public, ffi.NULL, ffi.NULL))
        return owned(public[0])

    def create_primary(self, hierarchy: int, template: Any, sensitive: Any = None) -> int:
        sensitive = sensitive if sensitive is not None else ffi.new("TPM2B_SENSITIVE_CREATE *")
        handle = ffi.new("ESYS_TR *")
        check(
            lib.Esys_CreatePrimary(
                self.context, hierarchy, PASSWORD, NONE, NONE, sensitive, template,
                ffi.new("TPM2B_DATA *"), ffi.new("TPML_PCR_SELECTION *"),
                handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
            )
        )  # fmt: skip
        return int(handle[0])

    def create(self, parent: int, sensitive: Any, template: Any, session: int) -> tuple[bytes, bytes]:
        """TPM2_Create: the new object's (public, private) in wire form."""
        private, public = self._out("TPM2B_PRIVATE"), self._out("TPM2B_PUBLIC")
        check(
            lib.Esys_Create(
                self.context, parent, session, NONE, NONE, sensitive, template,
                ffi.new("TPM2B_DATA *"), ffi.new("TPML_PCR_SELECTION *"),
                private, public, ffi.NULL, ffi.NULL, ffi.NULL,
            )
        )  # fmt: skip
        return marshal("TPM2B_PUBLIC", owned(public[0])), marshal("TPM2B_PRIVATE", owned(private[0]))

    def load(self, parent: int, private: Any, public: Any) -> int:
        return self._handle("Esys_Load", parent, PASSWORD, NONE, NONE, private, public)

    def start_auth_session(self, salt_key: int, kind: int, symmetric: Any) -> int:
        return self._handle(
            "Esys_StartAuthSession", salt_key, NONE, NONE, NONE, NONE, ffi.NULL, kind, symmetric,
            lib.TPM2_ALG_SHA256,
        )  # fmt: skip

    def policy_pcr(self, session: int, digest: bytes, selection: Any) -> None:
        check(lib.Esys_PolicyPCR(self.context, session, NONE, NONE, NONE, tpm2b("TPM2B_DIGEST", digest), selection))

    def policy_auth_value(self, session: int) -> None:
        check(lib.Esys_PolicyAuthValue(self.context, session, NONE, NONE, NONE))

    def policy_restart(self, session: int) -> None:
        check(lib.Esys_PolicyRestart(self.context, session, NONE, NONE, NONE))

    def policy_get_digest(self, session: int) -> bytes:
        digest = self._out("TPM2B_DIGEST")
        check(lib.Esys_PolicyGetDigest(self.context, session, NONE, NONE, NONE, digest))
        value = owned(digest[0])
        return bytes(ffi.buffer(value.buffer, value.size))

    def hmac(self, key: int, message: bytes, session: int) -> Any:
        """TPM2_HMAC (SHA-256): the TPM2B_DIGEST * ESYS allocated; the caller zeroes and frees it."""
        result = self._out("TPM2B_DIGEST")
        check(
            lib.Esys_HMAC(
                self.context,
                key,
                session,
                NONE,
                NONE,
                tpm2b("TPM2B_MAX_BUFFER", message),
                lib.TPM2_ALG_SHA256,
                result,
            )
        )
        return result[0]

    def unseal(self, item: int, session: int) -> Any:
        """TPM2_Unseal: the TPM2B_SENSITIVE_DATA * ESYS allocated; the caller zeroes and frees it."""
        result = self._out("TPM2B_SENSITIVE_DATA")
        check(lib.Esys_Unseal(self.context, item, session, NONE, NONE, result))
        return result[0]

    def pcr_read(self, selection: Any) -> tuple[Any, Any]:
        """TPM2_PCR_Read: (the selection the TPM answered for, the digests)."""
        returned, digests = self._out("TPML_PCR_SELECTION"), self._out("TPML_DIGEST")
        check(lib.Esys_PCR_Read(self.context, NONE, NONE, NONE, selection, ffi.NULL, returned, digests))
        return owned(returned[0]), owned(digests[0])

    def pcr_extend(self, pcr: int, digests: Any) -> None:
        check(lib.Esys_PCR_Extend(self.context, pcr, PASSWORD, NONE, NONE, digests))

    def get_capability(self, capability: int, first: int, count: int) -> Any:
        more, data = ffi.new("TPMI_YES_NO *"), self._out("TPMS_CAPABILITY_DATA")
        check(lib.Esys_GetCapability(self.context, NONE, NONE, NONE, capability, first, count, more, data))
        return owned(data[0])

    def evict_control(self, auth: int, handle: int, persistent: int) -> int:
        return self._handle("Esys_EvictControl", auth, handle, PASSWORD, NONE, NONE, persistent)

    def nv_read_public(self, index: int) -> Any:
        public = self._out("TPM2B_NV_PUBLIC")
        check(lib.Esys_NV_ReadPublic(self.context, index, NONE, NONE, NONE, public, ffi.NULL))
        return owned(public[0])

    def clear(self, auth: int) -> None:
        check(lib.Esys_Clear(self.context, auth, PASSWORD, NONE, NONE))
