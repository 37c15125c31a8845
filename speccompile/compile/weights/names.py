"""Graph weight names: l{i}.* for decoder layer i, mtp.l0.* for a draft head's block, other names shared."""
from __future__ import annotations

import re


def layer_of(weight_name: str) -> int | None:
    """The layer a graph weight belongs to (l3.qkv, mtp.l0.o), or None for the model's shared tensors."""
    m = re.match(r"(?:mtp\.)?l(\d+)\.", weight_name)
    return int(m.group(1)) if m else None
