"""Upper bounds of the tools' numeric parameters, used in their `Meta(ge=, le=)`.

msgspec refuses a value beyond them while decoding the arguments, with an error naming the parameter
(`Expected `int` <= 4611686018427387904 - at `$.offset``), before anything reaches a backend: an
unbounded Python int used to travel on until SQLite refused it ("Python int too large to convert to
SQLite INTEGER", with a logged traceback).
"""

from __future__ import annotations

MAX_OFFSET = 2**62  # paging offsets and byte offsets: room for offset + limit in a 64-bit integer
MAX_BYTES = 2**63 - 1  # byte counts (max_layer_bytes, max_bytes)
MAX_SECONDS = 2**31 - 1  # timeouts of runs and imports (the backend applies its own, lower maximum)
MAX_WAIT_SECONDS = 86400.0  # how long one wait_operations call may block
MAX_ID = 2**32 - 2  # uid / gid: Linux's largest (the embedded engine allows 0..65535)
MAX_STATE_ID = 2**53  # directory_state_id: rsync draws them below 2**53 (exact in JSON doubles)
