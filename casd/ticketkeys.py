# -*- test-case-name: tests.test_tls,tests.integration.test_tls_tickets -*-
"""
TLS session-ticket keys shared by every casd process: a key file read at start, installed in each
server context through OpenSSL's ticket key callback.

Why this module reaches past pyOpenSSL: neither pyOpenSSL nor the C{cryptography} bindings it
sits on expose C{SSL_CTX_set_tlsext_ticket_key_evp_cb} (or the older
C{SSL_CTX_set_tlsext_ticket_keys} control, which takes one key only and so cannot rotate), and
the OpenSSL they use is linked statically into C{cryptography}'s extension module, so the
system's libssl cannot be called on its contexts.  The functions are in that module all the
same, as local symbols.  L{_Symbols} finds them in the module file's ELF symbol table and checks
that table against the loaded image (an exported symbol's real address must equal the load
base plus its table value) before anything is called.  When the check fails (a stripped or
unusual build, a platform without ELF), L{installable} says why and casd runs without shared
keys: resumption then works within one process only, and the start-up log says so.

Key file: one key a line, 160 hexadecimal digits (80 random bytes, C{openssl rand -hex 80}):
bytes 0-15 the key name, 16-47 the HMAC-SHA256 key, 48-79 the AES-256 key (OpenSSL's and
nginx's 80-byte layout).  Blank lines and lines starting with C{#} are ignored.  The first key
encrypts new tickets; every key decrypts; a ticket under a key other than the first is replaced
by a new one.  Keys never reach a log.
"""

from __future__ import annotations

from casd.keyfiles import keyLines

import ctypes
import os
import struct

from attrs import frozen

#: Bytes of a key: name, HMAC key, AES key.
KEY_SIZE = 80
_IV_SIZE = 16
_NEEDED = (
    "SSL_CTX_set_tlsext_ticket_key_evp_cb",
    "EVP_EncryptInit_ex",
    "EVP_DecryptInit_ex",
    "EVP_aes_256_cbc",
    "EVP_MAC_CTX_set_params",
)
#: OpenSSL's OSSL_PARAM data types.
_UTF8_STRING = 4
_OCTET_STRING = 5


class TicketKeyError(Exception):
    """
    The key file is unusable; C{str()} says why without quoting any key material.
    """


@frozen(repr=False)
class TicketKey:
    name: bytes
    hmac: bytes
    aes: bytes

    def __repr__(self) -> str:
        return f"<TicketKey name={self.name[:4].hex()}...>"


def readKeyFile(path: str) -> tuple[TicketKey, ...]:
    """
    @return: the keys of the file at C{path}, the encrypting one first.
    @raise TicketKeyError: when the file cannot be read or a line is not a key.
    """
    keys = []
    for number, line in keyLines(path, TicketKeyError):
        try:
            raw = bytes.fromhex(line)
        except ValueError:
            raw = b""
        if len(raw) != KEY_SIZE:
            raise TicketKeyError(
                f"line {number}: expected {KEY_SIZE * 2} hexadecimal digits (openssl rand -hex {KEY_SIZE})"
            )
        keys.append(TicketKey(raw[:16], raw[16:48], raw[48:]))
    if not keys:
        raise TicketKeyError("expected at least one key (openssl rand -hex 80)")
    if len({k.name for k in keys}) != len(keys):
        raise TicketKeyError("two keys have the same name (their first 16 bytes)")
    return tuple(keys)


def _elfSymbols(path: str, names) -> dict[str, int]:
    """
    @return: name -> value of C{names} found in the ELF64 symbol tables (C{.symtab} and
        C{.dynsym}) of the file at C{path}.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise TicketKeyError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    wanted = {name.encode("ascii") for name in names}
    found: dict[str, int] = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11) or entsize != 24:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strOffset = sections[link][4]
        for nameAt, _, _, shndx, value, _ in struct.iter_unpack("<IBBHQQ", data[offset : offset + size]):
            if shndx == 0 or value == 0:
                continue
            end = data.index(b"\0", strOffset + nameAt)
            name = data[strOffset + nameAt : end]
            if name in wanted:
                found[name.decode("ascii")] = value
    return found


class _Symbols:
    """
    The OpenSSL functions inside C{cryptography}'s extension module, called through C{cffi}.
    """

    def __init__(self) -> None:
        import cffi
        from cryptography.hazmat.bindings import _rust

        path = _rust.__file__
        values = _elfSymbols(path, _NEEDED + ("PyInit__rust",))
        missing = [n for n in _NEEDED + ("PyInit__rust",) if n not in values]
        if missing:
            raise TicketKeyError(f"{os.path.basename(path)} has no symbol {missing[0]} (a stripped build?)")
        exported = ctypes.cast(ctypes.CDLL(path).PyInit__rust, ctypes.c_void_p).value
        base = exported - values["PyInit__rust"]
        if base <= 0 or base % 4096:
            raise TicketKeyError("its symbol table does not match the loaded module")
        self.ffi = ffi = cffi.FFI()
        ffi.cdef(
            """
            typedef struct { const char *key; unsigned int data_type; void *data;
                             size_t data_size; size_t return_size; } OSSL_PARAM;
            typedef int (*ticket_cb)(void *, unsigned char *, unsigned char *, void *, void *, int);
            """
        )
        signatures = {
            "SSL_CTX_set_tlsext_ticket_key_evp_cb": "int (*)(void *, ticket_cb)",
            "EVP_EncryptInit_ex": "int (*)(void *, const void *, void *, const unsigned char *, const unsigned char *)",
            "EVP_DecryptInit_ex": "int (*)(void *, const void *, void *, const unsigned char *, const unsigned char *)",
            "EVP_aes_256_cbc": "const void *(*)(void)",
            "EVP_MAC_CTX_set_params": "int (*)(void *, const OSSL_PARAM *)",
        }
        for name, signature in signatures.items():
            setattr(self, name, ffi.cast(signature, base + values[name]))


_symbols: _Symbols | None = None
_symbolsError: str | None = None


def installable() -> str | None:
    """
    @return: C{None} when shared ticket keys can be installed in this process, or why not.
    """
    global _symbols, _symbolsError
    if _symbols is None and _symbolsError is None:
        try:
            _symbols = _Symbols()
        except (TicketKeyError, OSError, ImportError, AttributeError, ValueError) as e:
            _symbolsError = f"OpenSSL's ticket key callback cannot be reached ({e})"
    return _symbolsError


class TicketKeyring:
    """
    The keys of one key file, installable in any number of server contexts.
    """

    def __init__(self, keys: tuple[TicketKey, ...]) -> None:
        problem = installable()
        if problem is not None:
            raise TicketKeyError(problem)
        self.keys = keys
        s = self._s = _symbols
        ffi = s.ffi
        # Everything OpenSSL is handed must outlive the contexts: kept on self.
        self._digest = ffi.new("char[]", b"SHA256")
        self._params = {}
        for key in keys:
            hmac = ffi.new("unsigned char[]", key.hmac)
            params = ffi.new("OSSL_PARAM[3]")
            names = (ffi.new("char[]", b"key"), ffi.new("char[]", b"digest"))
            params[0] = (names[0], _OCTET_STRING, hmac, len(key.hmac), ffi.cast("size_t", -1))
            params[1] = (names[1], _UTF8_STRING, self._digest, 6, ffi.cast("size_t", -1))
            params[2] = (ffi.NULL, 0, ffi.NULL, 0, 0)
            self._params[key.name] = (params, hmac, names, ffi.new("unsigned char[]", key.aes))
        self._callback = ffi.callback("ticket_cb", self._ticket, error=0)
        self._cipher = s.EVP_aes_256_cbc()

    def _ticket(self, ssl, keyName, iv, cipherContext, macContext, encrypt) -> int:
        s, ffi = self._s, self._s.ffi
        if encrypt:
            key = self.keys[0]
            ffi.memmove(keyName, key.name, 16)
            ffi.memmove(iv, os.urandom(_IV_SIZE), _IV_SIZE)
            params, _, _, aes = self._params[key.name]
            if s.EVP_EncryptInit_ex(cipherContext, self._cipher, ffi.NULL, aes, iv) != 1:
                return -1
            return 1 if s.EVP_MAC_CTX_set_params(macContext, params) == 1 else -1
        name = bytes(ffi.buffer(keyName, 16))
        entry = self._params.get(name)
        if entry is None:
            return 0  # an unknown (retired) key: a full handshake, and a new ticket
        params, _, _, aes = entry
        if s.EVP_MAC_CTX_set_params(macContext, params) != 1:
            return -1
        if s.EVP_DecryptInit_ex(cipherContext, self._cipher, ffi.NULL, aes, iv) != 1:
            return -1
        # Under an older key: accepted, and replaced by a ticket under the first.
        return 1 if name == self.keys[0].name else 2

    def install(self, context) -> None:
        """
        Make C{context} (an L{OpenSSL.SSL.Context}) encrypt and decrypt tickets with these keys.
        """
        from OpenSSL._util import ffi as pyopensslFFI

        address = int(pyopensslFFI.cast("uintptr_t", context._context))
        ffi = self._s.ffi
        if self._s.SSL_CTX_set_tlsext_ticket_key_evp_cb(ffi.cast("void *", address), self._callback) != 1:
            raise TicketKeyError("OpenSSL refused the ticket key callback")
