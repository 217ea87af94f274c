"""Secrets for people and devices: generation, password hashes and bearer-token digests.

Passwords are hashed with scrypt because managers choose how they are used (typed into a login
form, possibly reused); a hash file that leaks must not be cheap to brute-force. Bearer tokens are
long random values we generate ourselves, so a plain SHA-256 digest is as strong as any salted
slow hash would be, and it keeps per-request verification cheap.

Device passwords live in the brokers' password file, hashed by `mosquitto_passwd` (`$7$`:
PBKDF2-HMAC-SHA512; `$6$`: one salted SHA-512, what Mosquitto 1.x wrote): the device gateway
checks HTTP logins against that same file, so one `teamtrack provision rotate|revoke` cuts a
device off everywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

SCRYPT_SCHEME: Final = "scrypt"
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
# Upper bounds on the cost parameters accepted from an encoded hash, so that a tampered auth file
# cannot make one login attempt allocate gigabytes or spin for minutes.
_MAX_N: Final = 2**20
_MAX_R: Final = 32
_MAX_P: Final = 16
# Mosquitto's hashes: `$7$<iterations>$<salt b64>$<hash b64>` and `$6$<salt b64>$<hash b64>`.
MOSQUITTO_ITERATIONS: Final = 101  # mosquitto_passwd's own default
MOSQUITTO_SALT_BYTES: Final = 12
# Bound on the iterations accepted from a password file (a check then costs at most ~1 s).
_MAX_PBKDF2_ITERATIONS: Final = 1_000_000


def generate_secret(nbytes: int = 18) -> str:
    """A URL-safe random secret (18 bytes -> 24 characters, no ':' so it fits a passwd line)."""
    return secrets.token_urlsafe(nbytes)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # scrypt needs 128 * n * r bytes; OpenSSL refuses above `maxmem`, whose default is too small
    # for the larger accepted parameters.
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r + 1024 * 1024,
        dklen=HASH_BYTES,
    )


def hash_password(password: str) -> str:
    """`scrypt$16384$8$1$<salt base64>$<hash base64>` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    encoded_salt = base64.b64encode(salt).decode("ascii")
    encoded_digest = base64.b64encode(digest).decode("ascii")
    return f"{SCRYPT_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${encoded_salt}${encoded_digest}"


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches the encoded hash; False for a wrong password or a bad hash."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCRYPT_SCHEME:
        return False
    _, n_text, r_text, p_text, salt_text, digest_text = parts
    try:
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt = base64.b64decode(salt_text, validate=True)
        expected = base64.b64decode(digest_text, validate=True)
    except (ValueError, binascii.Error):
        return False
    power_of_two = n > 1 and n & (n - 1) == 0
    if not (power_of_two and n <= _MAX_N and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        return False
    if not salt or len(expected) != HASH_BYTES:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def token_digest(token: str) -> str:
    """Hex SHA-256 of a bearer token, the form in which tokens are stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify_token(token: str, digest: str) -> bool:
    """Constant-time check of a presented bearer token against its stored digest."""
    # Compared as bytes: compare_digest rejects non-ASCII str, and a digest read from a file or
    # a header is not guaranteed to be ASCII.
    return hmac.compare_digest(token_digest(token).encode("ascii"), digest.lower().encode("utf-8"))


def hash_mosquitto_password(password: str, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """A `$7$` hash as `mosquitto_passwd` writes it (for tests and tools; provisioning runs
    mosquitto_passwd itself)."""
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    encoded_salt = base64.b64encode(salt).decode("ascii")
    return f"$7${iterations}${encoded_salt}${base64.b64encode(digest).decode('ascii')}"


def verify_mosquitto_password(password: str, encoded: str) -> bool:
    """True if `password` matches a hash of Mosquitto's password file (`$7$` or `$6$`);
    False for a wrong password, an unknown format or cost parameters out of bounds."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[:2] == ["", "7"]:
            iterations = int(parts[2])
            if not 0 < iterations <= _MAX_PBKDF2_ITERATIONS:
                return False
            salt = base64.b64decode(parts[3], validate=True)
            expected = base64.b64decode(parts[4], validate=True)
            actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
        elif len(parts) == 4 and parts[:2] == ["", "6"]:
            salt = base64.b64decode(parts[2], validate=True)
            expected = base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except (ValueError, binascii.Error):
        return False
    if not salt or len(expected) != len(actual):
        return False
    return hmac.compare_digest(actual, expected)
