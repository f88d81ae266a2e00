"""The error hierarchy. Only `quantcli.cli` turns these into a red line, a hint and an exit code.

Exit codes (documented in the README):
    2  usage: bad option, bad value, unknown type or preset
    3  unreadable or invalid input: missing, corrupt, truncated, unsupported file
    4  I/O: cannot write the output, disk full, output exists
    5  bad numbers: NaN/Inf weights, values a format cannot represent
    6  verification failed
    7  infeasible target: no mix of the candidate types reaches the size, bpw or KLD asked for
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations


class QuantcliError(Exception):
    """A user-facing error: one line of message, an optional hint, an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QuantcliError):
    """A bad option, value, type name or preset."""

    exit_code = 2


class InputError(QuantcliError):
    """An input file that is missing, unreadable, corrupt or unsupported."""

    exit_code = 3


class OutputError(QuantcliError):
    """The output cannot be written (exists, same file as input, disk full, permissions)."""

    exit_code = 4


class NumericError(QuantcliError):
    """Numbers a codec cannot take: NaN/Inf weights, scales that overflow fp16."""

    exit_code = 5


class VerificationError(QuantcliError):
    """`verify` found a failed check."""

    exit_code = 6


class InfeasibleTarget(QuantcliError):
    """An automatic mix's target that no choice of types reaches."""

    exit_code = 7


class Interrupted(QuantcliError):
    exit_code = 130
