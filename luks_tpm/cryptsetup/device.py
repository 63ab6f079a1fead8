"""A loaded LUKS2 header (`Device`): keyslots, tokens, metadata, verification and activation. Key
material arrives as a `Secret` and goes to C as a pointer into its locked buffer, nothing else."""

from __future__ import annotations

import ctypes
import errno
import json
from typing import Any

from ..errors import ExitCode, die
from ..secret import Secret
from ..settings import Pbkdf
from .binding import (
    ANY_SLOT,
    ANY_TOKEN,
    LUKS2,
    MAX_TOKENS,
    SLOT_ACTIVE,
    SLOT_ACTIVE_LAST,
    CryptsetupError,
    ParamsLuks2,
    TokenInfo,
    call,
    function,
    has_function,
    pbkdf_struct,
    size_t,
    text,
)

# --- devices ------------------------------------------------------------------------------------


def _buffer(secret: Secret) -> ctypes.Array[ctypes.c_char]:
    if secret.closed:
        raise ValueError("secret already closed")
    return secret.as_ctypes()


class Device:
    """An initialised crypt_device handle; valid only inside its `open_device` block."""

    def __init__(self, path: str, handle: ctypes.c_void_p) -> None:
        self.path = path
        self._handle: ctypes.c_void_p | None = handle

    @property
    def cd(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError(f"device {self.path} is closed")
        return self._handle

    def close(self) -> None:
        """crypt_free: the handle is invalid afterwards."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            function("crypt_free")(handle)

    def _string(self, name: str) -> str | None:
        return text(function(name)(self.cd))

    def __repr__(self) -> str:
        return f"<Device {self.path}>"

    # header creation and keyslots

    def format_luks2(
        self,
        *,
        cipher: str,
        cipher_mode: str,
        uuid: str,
        volume_key: Secret,
        sector_size: int = 512,
        pbkdf: Pbkdf | None = None,
        label: str | None = None,
    ) -> None:
        """Write a new LUKS2 header using `volume_key`; adds no keyslot."""
        pbkdf_params = pbkdf_struct(pbkdf) if pbkdf is not None else None
        params = ParamsLuks2(
            pbkdf=ctypes.pointer(pbkdf_params) if pbkdf_params is not None else None,
            sector_size=sector_size,
            label=label.encode() if label is not None else None,
        )
        call(
            "crypt_format",
            self.cd,
            LUKS2,
            cipher.encode(),
            cipher_mode.encode(),
            uuid.encode(),
            _buffer(volume_key),
            len(volume_key),
            ctypes.byref(params),
        )

    def set_pbkdf(self, pbkdf: Pbkdf) -> None:
        """PBKDF for the keyslots added after this call."""
        call("crypt_set_pbkdf_type", self.cd, ctypes.byref(pbkdf_struct(pbkdf)))

    def volume_key_verify(self, key: Secret) -> bool:
        """Whether `key` matches the header's digest (False on -EPERM)."""
        try:
            call("crypt_volume_key_verify", self.cd, _buffer(key), len(key))
        except CryptsetupError as error:
            if error.errno == errno.EPERM:
                return False
            raise
        return True

    def volume_key_get(
        self, passphrase: Secret, *, keyslot: int = ANY_SLOT, key_size: int | None = None
    ) -> tuple[int, Secret]:
        """Unlock a keyslot with `passphrase`: (keyslot used, volume key). Wrong passphrase: EPERM."""
        capacity = key_size or self.volume_key_size or 512
        key = Secret(capacity)
        size = size_t(capacity)
        try:
            slot = call(
                "crypt_volume_key_get",
                self.cd,
                keyslot,
                key.as_ctypes(),
                ctypes.byref(size),
                _buffer(passphrase),
                len(passphrase),
            )
            if size.value != capacity:
                exact = Secret.copy_of(key.view()[: size.value])
                key.close()
                key = exact
        except BaseException:
            key.close()
            raise
        return slot, key

    def keyslot_add_by_volume_key(self, key: Secret, passphrase: Secret, *, keyslot: int = ANY_SLOT) -> int:
        """Add a passphrase keyslot for the volume key `key`; returns its id."""
        return call(
            "crypt_keyslot_add_by_volume_key",
            self.cd,
            keyslot,
            _buffer(key),
            len(key),
            _buffer(passphrase),
            len(passphrase),
        )

    def keyslots(self) -> list[int]:
        """Ids of the keyslots that open the volume (ACTIVE or ACTIVE_LAST; unbound ones are not listed)."""
        count = call("crypt_keyslot_max", LUKS2)
        return [
            slot
            for slot in range(count)
            if function("crypt_keyslot_status")(self.cd, slot) in (SLOT_ACTIVE, SLOT_ACTIVE_LAST)
        ]

    def keyslots_in_header(self) -> list[int]:
        """Every keyslot the header holds, whatever its state (unbound and reencryption keyslots too)."""
        return sorted(int(slot) for slot in self.metadata().get("keyslots", {}))

    def keyslot_destroy(self, keyslot: int) -> None:
        """Overwrite the keyslot's key material area, then write the header without the keyslot."""
        call("crypt_keyslot_destroy", self.cd, keyslot)

    # tokens

    def token_json_get(self, token_id: int) -> str | None:
        """The token's JSON text, or None when there is no such token."""
        if self.token_status(token_id)[0] == TokenInfo.INACTIVE:
            return None  # 2.6 returns -EINVAL, not -ENOENT, for a free token id
        value = ctypes.c_char_p()
        try:
            call("crypt_token_json_get", self.cd, token_id, ctypes.byref(value))
        except CryptsetupError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return text(value.value)

    def token_json_set(self, json_text: str, token_id: int = ANY_TOKEN) -> int:
        """Write a token (a new one with ANY_TOKEN); returns its id. Bytes that are not UTF-8, read as
        surrogate escapes (binding.text), go back as the bytes they were."""
        return call("crypt_token_json_set", self.cd, token_id, json_text.encode("utf-8", "surrogateescape"))

    def token_remove(self, token_id: int) -> None:
        call("crypt_token_json_set", self.cd, token_id, None)

    def token_status(self, token_id: int) -> tuple[TokenInfo, str | None]:
        kind = ctypes.c_char_p()
        info = TokenInfo(function("crypt_token_status")(self.cd, token_id, ctypes.byref(kind)))
        if info in (TokenInfo.INVALID, TokenInfo.INACTIVE):
            return info, None
        return info, text(kind.value)

    def tokens(self) -> list[tuple[int, str]]:
        """(id, type) of every token present."""
        count = call("crypt_token_max", LUKS2) if has_function("crypt_token_max") else MAX_TOKENS
        found = []
        for token_id in range(count):
            _info, kind = self.token_status(token_id)
            if kind is not None:
                found.append((token_id, kind))
        return found

    def metadata(self) -> dict[str, Any]:
        """The LUKS2 JSON metadata (keyslots, tokens, segments, digests, config); needs 2.4+."""
        dump = ctypes.c_char_p()
        call("crypt_dump_json", self.cd, ctypes.byref(dump), 0)
        # a token may hold bytes that are not UTF-8 (json-c keeps them): decoded as surrogate escapes
        parsed: dict[str, Any] = json.loads(text(dump.value) or "{}")
        return parsed

    def digest_ids(self) -> set[int]:
        return {int(digest_id) for digest_id in self.metadata().get("digests", {})}

    def default_digest(self) -> int:
        """The digest that verifies the key of segment 0, the one dm-crypt uses."""
        for digest_id, digest in self.metadata().get("digests", {}).items():
            if "0" in digest.get("segments", []):
                return int(digest_id)
        die(
            f"{self.path} has no digest for its data segment",
            hint="check it with `cryptsetup luksDump`",
            code=ExitCode.DEVICE,
        )

    def is_detached_header(self) -> bool:
        meta = self.metadata()
        segment = meta.get("segments", {}).get("0")
        config = meta.get("config", {})
        if segment is None or "json_size" not in config:
            return False
        header_area = 2 * (int(config["json_size"]) + 4096) + int(config.get("keyslots_size", 0))
        return int(segment["offset"]) < header_area

    # header properties

    @property
    def type(self) -> str | None:
        return self._string("crypt_get_type")

    @property
    def uuid(self) -> str:
        return self._string("crypt_get_uuid") or ""

    @property
    def volume_key_size(self) -> int:
        """Volume key length in bytes; 0 on a LUKS2 header without keyslots (it is not recorded)."""
        return call("crypt_get_volume_key_size", self.cd)

    # device-mapper

    def activate_by_volume_key(self, name: str | None, key: Secret, flags: int = 0) -> None:
        """Create /dev/mapper/`name`; with `name` None only check that `key` is right."""
        call(
            "crypt_activate_by_volume_key",
            self.cd,
            name.encode() if name is not None else None,
            _buffer(key),
            len(key),
            flags,
        )

    def deactivate(self, name: str) -> None:
        """Remove /dev/mapper/`name`."""
        call("crypt_deactivate", self.cd, name.encode())
