"""Parse the ptxas ``-v`` log shipped with the package (registers, spills, shared memory per kernel)."""

from __future__ import annotations

import re

_ENTRY = re.compile(r"Compiling entry function '(.+?)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(path: str) -> list[dict]:
    """One dict per (kernel, arch): name, arch, registers, spill_stores, spill_loads, stack, smem."""
    out, cur = [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _ENTRY.search(line)
            if m:
                cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack": 0, "smem": 0}
                out.append(cur)
                continue
            if cur is None:
                continue
            m = _SPILL.search(line)
            if m:
                cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
                continue
            m = _USED.search(line)
            if m:
                cur["registers"] = int(m.group(1))
                cur["smem"] = int(m.group(2) or 0)
    return out
