"""The one exception type that reaches users: its message is a single line naming the problem and what to
do about it. The CLI prints it as `edgediff: error: ...` and exits 2; library users catch it (it is a
ValueError, so code written for diffusers' argument errors keeps working)."""


class EdgediffError(ValueError):
    pass
