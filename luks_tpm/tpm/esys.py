"""The TSS's ESYS API through tpm2-pytss's compiled binding, without tpm2-pytss's Python layer.

tpm2-pytss's package imports `cryptography` at module level (for PEM keys, certificates and software
policy helpers luks-tpm never uses): 150 ms of every unlock, and 3.7 MiB of every initramfs. Its cffi
extension `_libtpm2_pytss` alone holds the whole ESYS API, the structs and the constants, so luks-tpm
loads that one file, under its own name (a later `import tpm2_pytss` shares it, and with it the cffi
types), and calls ESYS directly. Structs are cffi values with the C field names.

The binding is an internal module of tpm2-pytss, so what luks-tpm uses of it is declared here, once:
`FUNCTIONS`, `TYPES` and `CONSTANTS`, checked when the binding is loaded. A tpm2-pytss that lacks one of
them is refused then, with one line naming the symbol and the version found (pyproject.toml admits only
the release series that is tested, 3.0). The alternative, owning cffi declarations of ESYS as systemd
owns its dlopen table, needs cffi's C parser (pycparser) at run time or a build step of its own, in every
initramfs; the check gives the same guarantee for less.

`Esys` is one ESYS context on one TCTI. Its methods are the TPM commands luks-tpm sends, with ESYS's
own defaults for session handles (a password session where the command needs authorization). Outputs
that ESYS allocates are freed when the Python value is collected; the callers that receive key
material zero it before that (context.secret_from_tpm2b).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import Cause, ExitCode, LuksTpmError

# The TSS's own logging prints command and response buffers at debug/trace level, and ESYS's crypto
# trace prints decrypted parameters: the volume key. Force it off whatever the environment says; the TSS
# reads it when it first logs, so this happens before the binding (and with it the TSS) is loaded.
_USER_TSS2_LOG = os.environ.get("TSS2_LOG")
os.environ["TSS2_LOG"] = "all+NONE"
if _USER_TSS2_LOG not in (None, "", "all+NONE"):
    logging.getLogger(__name__).info(
        "ignoring TSS2_LOG=%s: the TSS's own debug and trace output can print key material", _USER_TSS2_LOG
    )

_BINDING = "tpm2_pytss._libtpm2_pytss"
TESTED = "3.0"  # the tpm2-pytss release series luks-tpm is tested with (pyproject.toml, the .deb)

# Everything luks-tpm takes from the binding: one table, checked at load.
FUNCTIONS = (
    "Esys_Initialize", "Esys_Finalize", "Esys_Free", "Esys_GetSysContext",
    "Esys_TR_FromTPMPublic", "Esys_TR_GetName", "Esys_TR_Close", "Esys_TR_SetAuth",
    "Esys_TRSess_SetAttributes", "Esys_TRSess_GetAttributes",
    "Esys_FlushContext", "Esys_ReadPublic", "Esys_CreatePrimary", "Esys_Create", "Esys_Load",
    "Esys_StartAuthSession", "Esys_PolicyPCR", "Esys_PolicyAuthValue", "Esys_PolicyRestart",
    "Esys_PolicyGetDigest", "Esys_HMAC", "Esys_Unseal", "Esys_PCR_Read", "Esys_PCR_Extend",
    "Esys_GetCapability", "Esys_EvictControl", "Esys_NV_ReadPublic", "Esys_Clear",
    "Esys_LoadExternal", "Esys_VerifySignature", "Esys_PolicyAuthorize", "Esys_Sign",
    "Esys_Import", "Esys_PolicyCommandCode", "Esys_PolicyOR",
    "Tss2_TctiLdr_Initialize", "Tss2_TctiLdr_Finalize", "Tss2_RC_Decode",
    "Tss2_MU_TPM2B_PUBLIC_Marshal", "Tss2_MU_TPM2B_PUBLIC_Unmarshal",
    "Tss2_MU_TPM2B_PRIVATE_Marshal", "Tss2_MU_TPM2B_PRIVATE_Unmarshal",
    "Tss2_MU_TPMT_SIGNATURE_Marshal", "Tss2_MU_TPMT_SIGNATURE_Unmarshal",
    "Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal",
)  # fmt: skip
TYPES = (
    "ESYS_CONTEXT *", "ESYS_TR", "TSS2_TCTI_CONTEXT *", "TSS2_SYS_CONTEXT *", "TPM2B_AUTH", "TPM2B_DATA",
    "TPM2B_DIGEST", "TPM2B_MAX_BUFFER", "TPM2B_NAME", "TPM2B_NV_PUBLIC", "TPM2B_PRIVATE", "TPM2B_PUBLIC",
    "TPM2B_SENSITIVE_CREATE", "TPM2B_SENSITIVE_DATA", "TPMA_SESSION", "TPMI_YES_NO", "TPML_DIGEST",
    "TPML_DIGEST_VALUES", "TPML_PCR_SELECTION", "TPMS_CAPABILITY_DATA", "TPMT_SYM_DEF",
    "TPMT_SIGNATURE", "TPMT_TK_VERIFIED", "TPMT_TK_HASHCHECK", "TPMT_SIG_SCHEME",
    "TPM2B_ENCRYPTED_SECRET", "TPMT_SYM_DEF_OBJECT",
)  # fmt: skip
CONSTANTS = (
    "ESYS_TR_NONE", "ESYS_TR_PASSWORD", "ESYS_TR_PCR0", "ESYS_TR_RH_ENDORSEMENT", "ESYS_TR_RH_LOCKOUT",
    "ESYS_TR_RH_OWNER", "TPM2_ALG_AES", "TPM2_ALG_CFB", "TPM2_ALG_ECC", "TPM2_ALG_HMAC",
    "TPM2_ALG_KEYEDHASH", "TPM2_ALG_NULL", "TPM2_ALG_RSA", "TPM2_ALG_SHA256", "TPM2_ALG_SYMCIPHER",
    "TPM2_CAP_HANDLES", "TPM2_CAP_PCRS", "TPM2_CAP_TPM_PROPERTIES", "TPM2_ECC_NIST_P256",
    "TPM2_PT_LOCKOUT_COUNTER", "TPM2_PT_LOCKOUT_INTERVAL", "TPM2_PT_LOCKOUT_RECOVERY", "TPM2_PT_MANUFACTURER",
    "TPM2_PT_MAX_AUTH_FAIL", "TPM2_PT_PERMANENT", "TPM2_RC_FMT1", "TPM2_RC_HANDLE",
    "TPM2_SE_HMAC", "TPM2_SE_POLICY", "TPM2_SE_TRIAL", "TPMA_SESSION_CONTINUESESSION",
    "TPMA_SESSION_DECRYPT", "TPMA_SESSION_ENCRYPT", "TPMA_PERMANENT_DISABLECLEAR",
    "TPMA_PERMANENT_INLOCKOUT", "TPMA_PERMANENT_LOCKOUTAUTHSET",
    "TPM2_ALG_ECDSA", "TPM2_ST_HASHCHECK", "TPM2_ST_VERIFIED", "TPM2_RH_NULL", "TPMA_OBJECT_SIGN_ENCRYPT",
    "TPM2_CC_Import", "TPM2_CC_Load", "TPMA_OBJECT_ADMINWITHPOLICY",
)  # fmt: skip


def _binding_file() -> Path | None:
    """The compiled binding's file, found without running tpm2-pytss's __init__ (which imports cryptography)."""
    package = importlib.util.find_spec("tpm2_pytss")
    for location in (package.submodule_search_locations or []) if package is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(location) / f"_libtpm2_pytss{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _unusable(what: str) -> LuksTpmError:
    from importlib.metadata import PackageNotFoundError, version  # here: only this error path reads it

    try:
        found = f"tpm2-pytss {version('tpm2-pytss')}"
    except PackageNotFoundError:
        found = "no tpm2-pytss"
    return LuksTpmError(
        f"{what} ({found} is installed; luks-tpm needs tpm2-pytss {TESTED}.x)",
        hint=f"install tpm2-pytss {TESTED}.x (the luks-tpm package carries it)",
        code=ExitCode.UNSUPPORTED,
        cause=Cause.UNSUPPORTED,
    )


def _load_binding() -> Any:
    module = sys.modules.get(_BINDING)
    if module is not None:
        return module
    path = _binding_file()
    if path is None:
        raise _unusable("tpm2-pytss's compiled binding (_libtpm2_pytss) is not installed")
    loader = importlib.machinery.ExtensionFileLoader(_BINDING, str(path))
    spec = importlib.util.spec_from_loader(_BINDING, loader, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[_BINDING] = module
    return module


def missing_symbols(binding: Any) -> list[str]:
    """What of FUNCTIONS, CONSTANTS and TYPES the binding lacks."""
    missing = [name for name in FUNCTIONS + CONSTANTS if not hasattr(binding.lib, name)]
    for kind in TYPES:
        try:
            binding.ffi.typeof(kind)
        except binding.ffi.error:
            missing.append(kind)
    return missing


_binding = _load_binding()
if _missing := missing_symbols(_binding):
    raise _unusable(f"tpm2-pytss's binding lacks {', '.join(_missing)}")
ffi: Any = _binding.ffi
lib: Any = _binding.lib

PASSWORD, NONE = lib.ESYS_TR_PASSWORD, lib.ESYS_TR_NONE


def address(pointer: Any) -> int:
    """A cffi pointer as the integer address a ctypes function takes: the one place where memory crosses
    from the binding's cffi to luks-tpm's ctypes (clib), for the libtss2-sys call tpm2-pytss does not bind."""
    return int(ffi.cast("uintptr_t", pointer))


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
    ffi.memmove(value.name if kind == "TPM2B_NAME" else value.buffer, data, len(data))
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

    def load(self, parent: int, private: Any, public: Any, session: int = PASSWORD) -> int:
        return self._handle("Esys_Load", parent, session, NONE, NONE, private, public)

    def import_(self, parent: int, session: int, public: Any, duplicate: Any, seed: Any) -> bytes:
        """TPM2_Import with no inner wrapper (symmetricAlg NULL): the object's private area under `parent`."""
        symmetric = ffi.new("TPMT_SYM_DEF_OBJECT *")
        symmetric.algorithm = lib.TPM2_ALG_NULL
        private = self._out("TPM2B_PRIVATE")
        check(
            lib.Esys_Import(
                self.context, parent, session, NONE, NONE, ffi.new("TPM2B_DATA *"), public, duplicate, seed,
                symmetric, private,
            )
        )  # fmt: skip
        return marshal("TPM2B_PRIVATE", owned(private[0]))

    def policy_command_code(self, session: int, code: int) -> None:
        check(lib.Esys_PolicyCommandCode(self.context, session, NONE, NONE, NONE, code))

    def policy_or(self, session: int, branches: tuple[bytes, ...]) -> None:
        digests = ffi.new("TPML_DIGEST *")
        digests.count = len(branches)
        for index, branch in enumerate(branches):
            digests.digests[index].size = len(branch)
            ffi.memmove(digests.digests[index].buffer, branch, len(branch))
        check(lib.Esys_PolicyOR(self.context, session, NONE, NONE, NONE, digests))

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
                self.context, key, session, NONE, NONE, tpm2b("TPM2B_MAX_BUFFER", message), lib.TPM2_ALG_SHA256,
                result,
            )
        )  # fmt: skip
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

    def load_external(self, public: Any, hierarchy: int) -> int:
        """TPM2_LoadExternal of a public area alone (a signature-checking key)."""
        return self._handle("Esys_LoadExternal", NONE, NONE, NONE, ffi.NULL, public, hierarchy)

    def verify_signature(self, key: int, digest: bytes, signature: Any) -> Any:
        """TPM2_VerifySignature: the TPMT_TK_VERIFIED ticket that PolicyAuthorize takes."""
        ticket = self._out("TPMT_TK_VERIFIED")
        check(
            lib.Esys_VerifySignature(
                self.context, key, NONE, NONE, NONE, tpm2b("TPM2B_DIGEST", digest), signature, ticket
            )
        )
        return owned(ticket[0])

    def policy_authorize(self, session: int, approved: bytes, reference: bytes, key_name: bytes, ticket: Any) -> None:
        check(
            lib.Esys_PolicyAuthorize(
                self.context, session, NONE, NONE, NONE, tpm2b("TPM2B_DIGEST", approved),
                tpm2b("TPM2B_NONCE", reference), tpm2b("TPM2B_NAME", key_name), ticket,
            )
        )  # fmt: skip

    def sign(self, key: int, digest: bytes, scheme: Any) -> bytes:
        """TPM2_Sign of a digest with an unrestricted key (a NULL hash-check ticket): the marshalled
        TPMT_SIGNATURE."""
        validation = ffi.new("TPMT_TK_HASHCHECK *")
        validation.tag, validation.hierarchy = lib.TPM2_ST_HASHCHECK, lib.TPM2_RH_NULL
        signature = self._out("TPMT_SIGNATURE")
        check(
            lib.Esys_Sign(
                self.context, key, PASSWORD, NONE, NONE, tpm2b("TPM2B_DIGEST", digest), scheme, validation, signature
            )
        )
        return marshal("TPMT_SIGNATURE", owned(signature[0]))
