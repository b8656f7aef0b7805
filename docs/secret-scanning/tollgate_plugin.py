"""detect-secrets plugin for Tollgate API keys (SPEC §2).

    detect-secrets scan --plugin docs/secret-scanning/tollgate_plugin.py PATH...

Reports `tg_sk_<id>_<secret>` / `tg_pk_<id>_<secret>` strings whose secret
ends in a valid checksum: the 6-character base62 (0-9A-Za-z, left-padded
with '0') CRC-32 of everything before those 6 characters, GitHub's token
scheme. Look-alikes (and keys from before checksums) are not reported, so
the scan stays quiet on test fixtures and documentation examples.
Standard library only.
"""
import re
import zlib

from detect_secrets.plugins.base import RegexBasedDetector

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHECKSUM_LEN = 6
KEY_RE = re.compile(r"\b(tg_(?:sk|pk)_[a-z0-9]{12}_[A-Za-z0-9]{32,256})\b")


def checksum(rest: str) -> str:
    """The base62 CRC-32 of `rest`, 6 characters."""
    n = zlib.crc32(rest.encode("utf-8")) & 0xFFFFFFFF
    out = ""
    for _ in range(CHECKSUM_LEN):
        n, d = divmod(n, 62)
        out = BASE62[d] + out
    return out


def has_valid_checksum(key: str) -> bool:
    """True if `key` ends in the checksum of the rest of it."""
    rest, tail = key[:-CHECKSUM_LEN], key[-CHECKSUM_LEN:]
    return checksum(rest) == tail


class TollgateKeyDetector(RegexBasedDetector):
    """Scans for Tollgate API keys with a valid checksum."""

    secret_type = "Tollgate API key"

    denylist = [KEY_RE]

    def analyze_string(self, string: str, **kwargs):
        for match in super().analyze_string(string):
            if has_valid_checksum(match):
                yield match
