"""Regular expressions written by users (an adapter's rank_pattern, alpha_pattern and target_modules;
a topology file's /regex/ keys): compiled by RE2, which matches in time linear in the text and
never backtracks, so a pattern like `(a+)+b` cannot stall a thread (Python's `re` takes
exponential time on it). Every user-written pattern goes through `compile_user_regex`; levante's
own patterns stay with `re`.

RE2 has no backreferences and no lookaround: a pattern that needs them is refused with a message
that says so, as is one longer than MAX_PATTERN characters or one whose automaton would take more
than MAX_MEMORY bytes.
"""
from __future__ import annotations

import re2

from levante.errors import LevanteError

MAX_PATTERN = 1024
MAX_MEMORY = 8 << 20


def compile_user_regex(pattern, where: str, error: type[LevanteError] = LevanteError):
    """`pattern` compiled by RE2 (`.search`, `.match`, `.fullmatch` as `re`'s); `error` (a LevanteError
    type, raised with a message that starts with `where`) if it is not a string, too long, or not
    valid RE2 syntax."""
    if not isinstance(pattern, str):
        raise error(f"{where}: a pattern must be a string, not {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN:
        raise error(f"{where}: a pattern of {len(pattern)} characters (at most {MAX_PATTERN})")
    options = re2.Options()
    options.max_mem = MAX_MEMORY
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        shown = pattern if len(pattern) <= 60 else pattern[:60] + "..."
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise error(f"{where}: invalid regular expression {shown!r} (RE2 syntax: no lookaround or "
                    f"backreferences): {' '.join(reason.split())[:100]}") from None
