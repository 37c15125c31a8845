"""Which of the target's features a head reads: its hidden states before the final norm (the MTP heads trained
here), or columns of the target graph's aux_hidden_states that the head's manifest entry names in
`target_features` (EAGLE-1: the output after the final norm; EAGLE-3: three layers; DeepSeek-V3's own MTP layer:
the output after the final norm, as its checkpoint's modeling code hands it)."""
from __future__ import annotations

import numpy as np

from speccompile.errors import BundleError


def aux_columns(name: str, head: dict, target: dict) -> np.ndarray | None:
    """The columns of the target's aux_hidden_states the head reads, or None where it reads the hidden states.
    Each feature it names must be among those the target graph outputs."""
    wanted = head.get("target_features")
    if not wanted:
        return None
    have = target.get("aux_hidden_layers", [])
    if any(t not in have for t in wanted):
        raise BundleError(f"drafter {name!r} reads target features {wanted} that the target graph does not output "
                          f"({have})")
    H = target["config"]["hidden_size"]
    return np.concatenate([np.arange(H) + H * have.index(t) for t in wanted])
