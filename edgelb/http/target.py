"""The request target's path, normalised before routing, access control and forwarding.

A path-based rule (a service on `/admin` with `auth`) is only as strong as the proxy's idea of
the path: if `//admin`, `/x/../admin` or `/%61dmin` is routed as something else but read by the
backend as `/admin`, the rule is bypassed. So the proxy decides on the path the backend will
read, and forwards that path (as Envoy's `normalize_path` + `merge_slashes` and nginx's location
matching do). In order:

1. Percent-encoding: every `%XX` must be two hex digits. Unreserved characters (RFC 3986 2.3:
   letters, digits, `-._~`) are decoded; every other escape is kept, its hex upper-cased.
   `%00`, an encoded slash or backslash (`%2F`, `%5C`, unless kept: then they stay encoded and
   are never separators) and an overlong UTF-8 form (`%C0%AE`, the old IIS `..` trick) are
   refused. A raw backslash is refused (some servers read it as `/`).
2. Repeated slashes are merged (`merge_slashes`, on by default).
3. Dot segments are removed (RFC 3986 5.2.4); a `..` above the root is refused, and so is a dot
   segment carrying `;` parameters (`/..;/admin`: Tomcat reads it as `..`, others do not).

The query is left as it is. Everything here is a pure function on bytes that never raises.
"""

from __future__ import annotations

import re

# A target that needs none of the steps above: the common case, checked with one search.
SUSPECT = re.compile(rb"%|//|/\.|\\")

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
# lead and continuation byte of an overlong (never valid) UTF-8 form of an ASCII character
_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")
_SLASHES = re.compile(rb"//+")


def needs_normalising(target: bytes) -> bool:
    """Whether `normalise` could change or refuse this origin-form target."""
    return SUSPECT.search(target) is not None


def normalise(target: bytes, merge_slashes: bool = True,
              keep_encoded_slashes: bool = False) -> bytes | str:
    """The normalised origin-form `target` (path and query), or why it is refused (a str,
    answered with 400). `target` starts with `/`."""
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    if b"\\" in path:
        return "a backslash in the path"
    if b"%" in path:
        decoded = _decode_unreserved(path, keep_encoded_slashes)
        if isinstance(decoded, str):
            return decoded
        path = decoded
    if merge_slashes and b"//" in path:
        path = _SLASHES.sub(b"/", path)
    if b"/." in path:
        resolved = _remove_dot_segments(path)
        if isinstance(resolved, str):
            return resolved
        path = resolved
    return path + query


def _decode_unreserved(path: bytes, keep_encoded_slashes: bool) -> bytes | str:
    out = bytearray()
    raw = bytearray()  # every escape decoded: looked at for overlong UTF-8 only
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != 37:  # "%"
            out.append(c)
            raw.append(c)
            i += 1
            continue
        if i + 2 >= n:
            return "an incomplete percent-encoding in the path"
        hi, lo = path[i + 1], path[i + 2]
        if hi not in _HEX or lo not in _HEX:
            return "an invalid percent-encoding in the path"
        b = int(path[i + 1 : i + 3], 16)
        raw.append(b)
        if b == 0:
            return "an encoded NUL (%00) in the path"
        if b in _UNRESERVED:
            out.append(b)
        elif b == 0x2F or b == 0x5C:
            if not keep_encoded_slashes:
                return ("an encoded slash or backslash (%2F, %5C) in the path; set "
                        "encoded_slashes: keep on the listener to pass it on")
            out += b"%2F" if b == 0x2F else b"%5C"
        else:
            out += b"%%%02X" % b
        i += 3
    if _OVERLONG.search(raw) is not None:
        return "an overlong UTF-8 sequence in the path"
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes | str:
    segments = path.split(b"/")
    out: list[bytes] = []
    directory = False  # the path ends with a dot segment: it names a directory
    for seg in segments[1:]:
        directory = False
        if seg == b".":
            directory = True
        elif seg == b"..":
            if not out:
                return "a dot segment (..) that climbs above the root"
            out.pop()
            directory = True
        elif seg[:1] == b"." and seg.split(b";", 1)[0] in (b".", b".."):
            return "a dot segment with ;parameters in the path"
        else:
            out.append(seg)
    result = b"/" + b"/".join(out)
    if directory and not result.endswith(b"/"):
        result += b"/"
    return result
