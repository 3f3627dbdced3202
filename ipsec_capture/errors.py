"""Errors a user can act on.

Anything raised as `UserError` reaches the user as one line (what failed, why, what to do) and a
non-zero exit; every other exception is a bug and shows its traceback only under --debug.
"""


class UserError(Exception):
    """A failure the user can fix; `str(err)` is the whole message."""

    exit_code = 2


class NotRootError(UserError):
    exit_code = 77


def require_root(what: str) -> None:
    """Fail early with the remedy instead of an EPERM deep inside netlink."""
    import os

    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root (CAP_NET_ADMIN): run it with sudo")
