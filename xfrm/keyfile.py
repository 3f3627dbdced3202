"""Load SAs with keys from a file whose format we detect: Wireshark's esp_sa (8 or 10 columns)
or saved `ip [-s] xfrm state` output. Users have one or the other, and `decrypt --keys` and
`keys --from-text` should not make them say which.
"""

from __future__ import annotations

import os

from ipsec_capture.errors import UserError

from .esp_sa import looks_like_esp_sa, read_esp_sa
from .sa import SA
from .text import looks_like_states, parse_states


def _empty(text: str) -> bool:
    """Blank and `#` lines only: a table with no SA yet (a capture that saw none)."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def parse_keys(text: str, name: str = "keys") -> list[SA]:
    """SAs from the text of a key file, format detected."""
    if looks_like_esp_sa(text):
        return read_esp_sa(text)
    if looks_like_states(text):
        return parse_states(text)
    if _empty(text):
        return []
    raise UserError(f"{name}: neither a Wireshark esp_sa table nor `ip xfrm state` output "
                    "(save keys with `ipsec-capture keys -w FILE` or `ip xfrm state > FILE`)")


def load_sas(path: str | os.PathLike[str]) -> list[SA]:
    """SAs with keys from `path` (esp_sa or `ip xfrm state` text)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as err:
        raise UserError(f"cannot read key file {os.fspath(path)}: {err.strerror}") from None
    return parse_keys(text, os.fspath(path))
