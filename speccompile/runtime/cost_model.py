"""What a pass costs on this machine: the target's verify pass by rows and committed length, and each drafter's
pass, measured by a short calibration of the loaded bundle (runtime/calibration.py) and cached outside it.

The adaptive drafting (runtime/adaptive.py) weighs expected committed tokens against these times, so the costs
are measured, never assumed: a quantized target pays far more for a verify row relative to a one-row step than
a float32 one, and a busy or a different machine shifts everything. The cache is a JSON file in the user's cache
directory keyed by the bundle's manifest hash, the machine and the thread count (runtime/cost_cache.py: never
inside the hashed bundle, never pickled); `recalibrate` (CLI `--recalibrate`) measures again. While decoding, the
Generator times each target pass (`observe`): the prices follow what passes take now, wherever the calibration was
off.
"""
from __future__ import annotations

import bisect
import dataclasses
import os
import platform

import numpy as np

from speccompile.runtime.machine_id import cpu_identity
from speccompile.runtime.pass_overhead import PassOverhead

# 2: drafter passes timed after a target pass; 3: three rows measured; 4: pad rows (row_parity); 5: over text the
# target finds likely (runtime/calibration.py); 6: that text in the cache as it runs, each length's points after
# one-row steps there
CACHE_VERSION = 6
# verify rows measured (interpolated between); 3 of its own: a 4-bit target's product kernel takes another path
# from three rows on, and a 3-row pass timed while decoding would otherwise correct the 2-row price
ROWS = (1, 2, 3, 4, 8, 16, 25)
HEAD_ROWS = (1, 2, 4)  # a drafter pass: the catch-up of the accepted tokens, a tree expansion of `branching` rows
MEMO_ROWS = 64  # verify() remembers one length's prices up to this many rows
OBSERVED_PRIOR, OBSERVED_DECAY = 4.0, 0.9  # the calibration weighs as much as this many timed passes; their decay
DRAFT_RATIO_LIMITS = (0.5, 4.0)  # a drafting timed this far off its price: a stall elsewhere, not the drafter
MAX_MS = 3.6e6  # no pass takes an hour: a cached time beyond it is an edited file, whose sums would overflow


@dataclasses.dataclass
class CostModel:
    """Times in milliseconds. verify_ms[mode][i][j]: a target pass of rows[i] rows at lengths[j] committed tokens
    (mode "greedy" or "sampled": a sampled pass computes the full logits); drafter_ms[name][k]: one pass of that
    drafter's engine over HEAD_ROWS[k] rows (0 for drafters without a graph); lookup_ms: prompt lookup's host time."""
    rows: list[int]
    lengths: list[int]
    verify_ms: dict[str, list[list[float]]]
    drafter_ms: dict[str, list[float]]
    lookup_ms: float = 0.0
    key: dict = dataclasses.field(default_factory=dict)
    # this process's timed passes: (mode, length index j) -> {row index i: decayed sums of observed / measured time}
    observed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _factors: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # mode -> the length indices whose factors wait for the passes timed there (observe leaves them to the next price)
    _stale: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _memo: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # mode -> (length, ms by rows)
    # mode -> verify_ms as an array; (mode, factored) -> its prices by length and rows (_table)
    _grids: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # per drafter: decayed sums of its timed drafting over the calibrated price (`observe_draft`)
    drafted: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _interp_weights: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # _by_rows
    # what passes took beyond these prices lately, timed by every request's planner (runtime/pass_overhead.py)
    overhead: PassOverhead = dataclasses.field(default_factory=PassOverhead, repr=False, compare=False)
    _noisy: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # for_noise()

    def for_noise(self, typical: bool = False) -> CostModel:
        """The prices of passes sampled by noise (runtime/noise.py): greedy passes with a noise row a position drawn
        on the host, copied in and added in the graph, so a row costs more than a plain greedy pass's. The same
        calibration, its own timed corrections and pass overhead (kept with this model); typical acceptance's
        passes (their rows read back and judged on the host) apart from exact ones."""
        if typical not in self._noisy:
            self._noisy[typical] = CostModel(self.rows, self.lengths, self.verify_ms, self.drafter_ms, self.lookup_ms,
                                             self.key)
        return self._noisy[typical]

    def verify(self, rows: int, length: int, greedy: bool = True) -> float:
        """Interpolated time of a target pass over `rows` rows after `length` committed tokens, as the passes
        timed lately (`observe`) correct the calibration."""
        if not 1 <= rows <= MEMO_ROWS:
            mode = "greedy" if greedy else "sampled"
            if self._stale:
                self._refresh(mode)
            return float(self._prices(length, mode, self._factors.get(mode), rows)[-1])
        return float(self.row_prices(length, greedy)[rows - 1])

    def row_prices(self, length: int, greedy: bool = True) -> np.ndarray:
        """verify(r, length, greedy) for r = 1 .. MEMO_ROWS (kept: read-only)."""
        mode = "greedy" if greedy else "sampled"
        if self._stale:
            self._refresh(mode)
        memo = self._memo.get(mode)
        if memo is None or memo[0] != length:  # the planner asks dozens of times a pass, at one length
            memo = (length, self._at_length(self._table(mode), length))
            memo[1].setflags(write=False)
            self._memo[mode] = memo
        return memo[1]

    def _between(self, length: int) -> tuple[int, float]:
        """(j, w): `length` is w of the way from lengths[j] to lengths[j + 1]; constant beyond the ends."""
        lengths = self.lengths
        if length <= lengths[0]:
            return 0, 0.0
        if length >= lengths[-1]:
            return len(lengths) - 1, 0.0
        j = bisect.bisect_right(lengths, length) - 1
        return j, (length - lengths[j]) / (lengths[j + 1] - lengths[j])

    def _table(self, mode: str, factored: bool = True) -> np.ndarray:
        """[rows - 1, length index]: the times of 1 .. MEMO_ROWS rows at each measured length, corrected by the
        observed factors (factored) or as calibrated. Interpolating along rows and then along lengths is what
        _prices does in the other order (both are linear), so a price takes one step at a new length."""
        key = (mode, factored)
        table = self._grids.get(key)
        if table is None:
            grid = self._grid(mode)
            factors = self._factors.get(mode) if factored else None
            table = np.stack([self._column(grid, factors, j) for j in range(len(self.lengths))], axis=1)
            self._grids[key] = table
        return table

    def _column(self, grid: np.ndarray, factors: np.ndarray | None, j: int) -> np.ndarray:
        col = grid[:, j] if factors is None else np.maximum.accumulate(grid[:, j] * factors[:, j])
        return self._by_rows(col, MEMO_ROWS)

    def _by_rows(self, by_row: np.ndarray, up_to: int) -> np.ndarray:
        """Times of 1 .. up_to rows from those at the measured row counts: linear between, and beyond the last."""
        weights = self._interp_weights.get(up_to)
        if weights is None:  # the interpolation is a fixed linear map of the measured times: built once
            eye = np.eye(len(self.rows))
            weights = self._interp_weights[up_to] = np.stack([self._interpolated(e, up_to) for e in eye], axis=1)
        return weights @ by_row

    def _interpolated(self, by_row: np.ndarray, up_to: int) -> np.ndarray:
        rows = np.arange(1, up_to + 1)
        slope = (by_row[-1] - by_row[-2]) / (self.rows[-1] - self.rows[-2])
        return np.where(rows <= self.rows[-1], np.interp(rows, self.rows, by_row),
                        by_row[-1] + slope * (rows - self.rows[-1]))

    def _prices(self, length: int, mode: str, factors: np.ndarray | None = None, up_to: int = MEMO_ROWS):
        """The times of passes of 1 .. up_to rows at `length` committed tokens."""
        grid = self._grid(mode)
        if factors is not None:  # still never cheaper with more rows
            grid = np.maximum.accumulate(grid * factors, axis=0)
        return self._by_rows(self._at_length(grid, length), up_to)

    def _grid(self, mode: str) -> np.ndarray:
        grid = self._grids.get(mode)
        if grid is None:  # the measured grid as an array, once (the planner prices a pass many times)
            grid = self._grids[mode] = np.asarray(self.verify_ms[mode], np.float64)
        return grid

    def _at_length(self, grid: np.ndarray, length: int) -> np.ndarray:
        """Each row count's time at `length` from `grid` [rows, lengths]: linear between the measured lengths,
        constant beyond them (as np.interp, for every row at once)."""
        j, w = self._between(length)
        return grid[:, j] if w == 0.0 else grid[:, j] + w * (grid[:, j + 1] - grid[:, j])

    def observe(self, rows: int, length: int, greedy: bool, ms: float) -> None:
        """A target pass timed while decoding. A calibration taken at a busier or quieter moment (or cached from
        one) misprices the rows, and a mispriced row count is seldom drafted, so never measured again: each
        point of the grid (the nearest row count and length) keeps a decayed ratio of the times observed to the
        times predicted, starting at 1 with the weight of OBSERVED_PRIOR passes; a point never observed takes
        the ratio of the nearest observed row count at its length (else 1)."""
        mode = "greedy" if greedy else "sampled"
        i = min(range(len(self.rows)), key=lambda k: abs(self.rows[k] - rows))  # the first of a tie, as argmin
        j = min(range(len(self.lengths)), key=lambda k: abs(self.lengths[k] - length))
        if rows <= MEMO_ROWS:  # _at_length on one row, in scalars (this runs after every pass)
            row, (jj, w) = self._table(mode, factored=False)[rows - 1], self._between(length)
            predicted = row[jj] if w == 0.0 else row[jj] + w * (row[jj + 1] - row[jj])
        else:
            predicted = self._prices(length, mode, None, rows)[-1]
        ratio = min(max(ms / predicted, 0.5), 2.0)  # a pass stalled by something else
        seen = self.observed.setdefault((mode, j), {})  # only this length's column of factors changes
        num, den = seen.get(i, (OBSERVED_PRIOR, OBSERVED_PRIOR))
        seen[i] = (num * OBSERVED_DECAY + ratio, den * OBSERVED_DECAY + 1.0)
        # the factors and the kept prices follow when next asked for: a plain step, which prices nothing, pays
        # only for the sums above
        self._stale.setdefault(mode, set()).add(j)
        self._memo.pop(mode, None)

    def _refresh(self, mode: str) -> None:
        """The factors of the lengths timed since the last price, and the kept prices' columns there (`observe`)."""
        stale = self._stale.pop(mode, None)
        if not stale:
            return
        factors = self._factors.get(mode)
        if factors is None:
            factors = self._factors[mode] = np.ones((len(self.rows), len(self.lengths)))
        table = self._grids.get((mode, True))
        for j in stale:
            seen = self.observed[(mode, j)]
            nearest = lambda ii: seen[min(seen, key=lambda k: abs(k - ii))]  # noqa: E731
            factors[:, j] = [n / d for n, d in (seen.get(ii) or nearest(ii) for ii in range(len(self.rows)))]
            if table is not None:
                table[:, j] = self._column(self._grid(mode), factors, j)

    def draft(self, name: str | None, rows: int, observed: bool = True) -> float:
        """One pass of drafter `name`'s engine over `rows` rows (0 for a drafter without one), as its timed
        drafting lately corrects the calibration (observed=False: the calibration alone)."""
        ms = self.drafter_ms.get(name or "", [])
        if not ms:
            return 0.0
        num, den = self.drafted.get(name, (1.0, 1.0)) if observed else (1.0, 1.0)
        return _rows_price(rows, ms) * num / den

    def observe_draft(self, name: str | None, predicted: float, ms: float) -> None:
        """A drafting timed while decoding, against its calibrated price `predicted` (draft(..., observed=False)
        summed over its passes). The calibration times the drafter's graph alone, its weights still in the CPU's
        caches; while decoding, each target pass in between evicts them. Kept as observe() keeps the target's."""
        if predicted <= 0:
            return
        ratio = min(max(ms / predicted, DRAFT_RATIO_LIMITS[0]), DRAFT_RATIO_LIMITS[1])
        num, den = self.drafted.get(name, (OBSERVED_PRIOR, OBSERVED_PRIOR))
        self.drafted[name] = (num * OBSERVED_DECAY + ratio, den * OBSERVED_DECAY + 1.0)

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "rows": self.rows, "lengths": self.lengths, "verify_ms": self.verify_ms,
                "drafter_ms": self.drafter_ms, "lookup_ms": self.lookup_ms, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """A cached model; anything but a sound measurement of this version is a ValueError (measure again)."""
        if not isinstance(d, dict) or d.get("version") != CACHE_VERSION:
            raise ValueError("another cache version")
        rows, lengths, verify, drafters = d.get("rows"), d.get("lengths"), d.get("verify_ms"), d.get("drafter_ms")
        # two row counts at least: the prices beyond the last measured one follow the slope of the last two
        if not _ascending(rows, ROWS) or len(rows) < 2 or not _ascending(lengths) or not isinstance(verify, dict) \
                or set(verify) != {"greedy", "sampled"} or not isinstance(drafters, dict):
            raise ValueError("not a cost model")
        grids = [_times(v) for v in verify.values()]
        heads = [_times(v) for v in drafters.values()]
        lookup = d.get("lookup_ms", 0.0)
        # calibrate() never writes a pass cheaper with more rows or a longer context: beyond the last row count,
        # such a grid's prices fall on to zero and below, and the planner would keep every node
        if any(g.shape != (len(rows), len(lengths)) or not np.all((g > 0) & (g < MAX_MS)) or not _monotone(g)
               for g in grids) \
                or any(h.shape not in ((0,), (len(HEAD_ROWS),)) or not np.all((h >= 0) & (h < MAX_MS))
                       for h in heads) \
                or not isinstance(lookup, (int, float)) or not 0 <= lookup < MAX_MS:
            raise ValueError("not a measurement")
        return cls(rows, lengths, verify, drafters, float(lookup), d.get("key") if isinstance(d.get("key"), dict)
                   else {})

    def describe(self, here: bool | None = None) -> list[str]:
        """Readable lines (for `inspect`); here: whether it prices this machine's passes (None: not said)."""
        mid = self.lengths[len(self.lengths) // 2]
        where = {True: "; this machine's", False: "; another machine's or onnxruntime's, not used here"}.get(here, "")
        out = [f"cost model  measured {self.key.get('measured', '?')}, {self.key.get('threads')} threads, "
               f"{self.key.get('machine', '?')}{where}"]
        if self.key.get("one_row_pad"):
            out.append("            one-token steps run with a pad row here (this CPU's one-row product kernel "
                       "sums differently: runtime/row_parity.py)")
        for mode in self.verify_ms:
            times = ", ".join(f"{r}: {self.verify(r, mid, mode == 'greedy'):.1f}" for r in self.rows)
            out.append(f"            {mode} verify pass at {mid} tokens, ms by rows: {times}")
        for name, ms in self.drafter_ms.items():
            if ms:
                out.append(f"            drafter {name} pass, ms by rows: "
                           + ", ".join(f"{r}: {t:.1f}" for r, t in zip(HEAD_ROWS, ms)))
        out.append(f"            prompt lookup {self.lookup_ms:.2f} ms")
        return out


def _times(values) -> np.ndarray:
    """Cached times as floats; anything but numbers (text numpy would parse, ints beyond floats) is a ValueError."""
    times = np.asarray(values)  # ragged lists: a ValueError too
    if times.dtype.kind not in "iuf":
        raise ValueError("not a measurement")
    return times.astype(float)


def _monotone(grid: np.ndarray) -> bool:
    """Times [rows, lengths] that never fall with more rows or a longer context."""
    return bool(np.all(np.diff(grid, axis=0) >= 0) and np.all(np.diff(grid, axis=1) >= 0))


def _ascending(values, allowed=None) -> bool:
    """A non-empty list of increasing positive whole numbers (from `allowed`, if given) of bounded length."""
    return (isinstance(values, list) and 0 < len(values) <= 64 and values == sorted(set(values))
            and all(type(v) is int and v > 0 and (allowed is None or v in allowed) for v in values))


def machine_key(threads: int | None, device: str = "cpu") -> dict:
    """What the prices depend on besides the bundle: the CPU (its model and the instruction sets that pick the
    kernels), the device, onnxruntime, speccompile's kernels (their build: another release's kernels time
    otherwise) and the threads."""
    import onnxruntime

    from speccompile.plugins import q4_matmul
    cpu = cpu_identity()
    return {"machine": f"{platform.machine()} {cpu['model']} ({' '.join(cpu['kernel_flags']) or 'baseline'}), "
                       f"{os.cpu_count()} cpus, {device}, onnxruntime {onnxruntime.__version__}, "
                       f"kernels {q4_matmul.build_key()}",
            "threads": threads or os.cpu_count() or 1}


def _rows_price(rows: int, ms: list[float]) -> float:
    """A drafter pass of `rows` rows from its calibrated passes of HEAD_ROWS rows: interpolated between them, and
    past the last one (a catch-up over a long accepted run) on the last two's slope, never below the last."""
    if rows <= HEAD_ROWS[-1]:
        return float(np.interp(rows, HEAD_ROWS, ms))
    slope = max(ms[-1] - ms[-2], 0.0) / (HEAD_ROWS[-1] - HEAD_ROWS[-2])
    return float(ms[-1] + (rows - HEAD_ROWS[-1]) * slope)
