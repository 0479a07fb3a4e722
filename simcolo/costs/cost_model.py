"""The cost model: iteration latencies of a serving engine, interpolated from a cost-table directory.

Tables are grids (see FORMAT.md); lookups are bilinear inside the grid and linear extrapolations of
the edge cell outside it (see interp.py for the conventions). ``prefill_s``, ``decode_s`` and
``decode_s_many`` sit on the simulator's hot path, so they are written for speed: the scalar ones are
pure Python over lists (no numpy per call), the vectorized one is a fixed handful of elementwise numpy
calls over a per-batch-size row that is built once and cached.
"""
from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import numpy as np

from simcolo.costs.interp import MIN_LATENCY_S, KvRow, OffGrid, cell
from simcolo.costs.schema import METADATA_FILE, parse_table_dir_name, table_dir_name
from simcolo.costs.tables import Grid, read_metadata, read_required_grids
from simcolo.errors import TableError
from simcolo.paths import TABLES_DIR, resolve_path


class CostModel:
    """Latency of one serving iteration on one GPU (or one tensor-parallel group), in seconds.

    Build it with :meth:`CostModel.load` (a directory) or :func:`cost_model_for` (a run's
    gpu/model/tp plus the ``conf/costs`` settings). ``metadata`` is the directory's metadata.json;
    ``off_grid[table][axis]`` counts queries that needed extrapolation.
    """

    def __init__(self, directory: Path, metadata: dict, grids: dict[str, Grid]):
        self.directory = Path(directory)
        self.metadata = metadata
        self._off = OffGrid(grids, str(self.directory))
        self.off_grid = self._off.counts

        prefill = grids["prefill"]
        self._p_x: list[float] = prefill.rows.tolist()      # batch_tokens
        self._p_y: list[float] = prefill.cols.tolist()      # num_seqs
        self._p_z: list[list[float]] = prefill.values.tolist()

        decode = grids["decode"]
        self._d_b: list[float] = decode.rows.tolist()       # batch_size
        self._d_z = decode.values
        self._kv = decode.cols                              # kv_tokens_per_seq
        self._kv_lo, self._kv_hi = float(self._kv[0]), float(self._kv[-1])
        self._rows: dict[float, KvRow] = {}
        self._steps = np.arange(1024, dtype=np.float64)   # 0, 1, 2, ... for decode_run_s

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        """Read and validate a cost-table directory; raises :class:`TableError` on any defect."""
        path = Path(path)
        metadata = read_metadata(path)
        return cls(path, metadata, read_required_grids(path, metadata))

    @staticmethod
    def resolve(gpu: str, model: str, tp: int, tables_root: str | Path = TABLES_DIR) -> Path:
        """The directory ``<tables_root>/<gpu>__<model>__tp<N>``; :class:`TableError` listing what
        exists for that gpu and model (or at all) when it is missing."""
        root = Path(tables_root)
        directory = root / table_dir_name(gpu, model, tp)
        if directory.is_dir():
            return directory
        found = [p for p in (parse_table_dir_name(d.name) for d in sorted(root.iterdir()) if d.is_dir())
                 if p is not None] if root.is_dir() else []
        same = sorted(t for g, m, t in found if (g, m) == (gpu, model))
        if same:
            hint = f"for {gpu} / {model} there are tables for tp {', '.join(map(str, same))}"
        elif found:
            hint = (f"there are no tables for {gpu} / {model}; gpus with tables: "
                    f"{', '.join(sorted({g for g, _, _ in found}))}; models with tables: "
                    f"{', '.join(sorted({m for _, m, _ in found}))}")
        else:
            hint = f"{root} holds no cost-table directories"
        raise TableError(f"no cost tables {directory.name} under {root}: {hint}. Generate them with "
                         f"`python -m simcolo.costs.roofline --gpu {gpu} --model {model} --tp {tp} "
                         f"--out DIR` or measure them with calibrate/")

    # ------------------------------------------------------------------------------ lookups

    def prefill_s(self, batch_tokens: int, num_seqs: int) -> float:
        """Latency of a prefill iteration over ``batch_tokens`` prompt tokens from ``num_seqs`` sequences."""
        xs, ys = self._p_x, self._p_y
        off = False
        if batch_tokens < xs[0] or batch_tokens > xs[-1]:
            self._off.note("prefill", "batch_tokens", batch_tokens, xs[0], xs[-1])
            off = True
        if num_seqs < ys[0] or num_seqs > ys[-1]:
            self._off.note("prefill", "num_seqs", num_seqs, ys[0], ys[-1])
            off = True
        i, t = cell(xs, batch_tokens)
        j, u = cell(ys, num_seqs)
        r0, r1 = self._p_z[i], self._p_z[i + 1]
        w = 1.0 - u
        value = (1.0 - t) * (w * r0[j] + u * r0[j + 1]) + t * (w * r1[j] + u * r1[j + 1])
        if off and value < MIN_LATENCY_S:
            value = MIN_LATENCY_S
        return value

    def decode_s_many(self, batch_size: int, kv_tokens_total: np.ndarray) -> np.ndarray:
        """Latencies of decode iterations of ``batch_size`` sequences whose KV-cache tokens sum, per
        iteration, to ``kv_tokens_total[k]`` (each sequence is costed at the mean, total / batch).

        Purely elementwise: element k depends only on ``kv_tokens_total[k]``, and is bitwise the same
        in an array of any length (no reductions feed into values).
        """
        row = self._rows.get(batch_size)
        if row is None:
            row = self._decode_row(batch_size)
        total = np.asarray(kv_tokens_total, dtype=np.float64)
        idx = row.a_tail.searchsorted(total, "right")
        out = total - row.a.take(idx)
        out *= row.s.take(idx)
        out += row.z0.take(idx)
        if row.batch_off_grid or (total.size and (total.min() < row.lo or total.max() > row.hi)):
            self._decode_many_off_grid(batch_size, row, total, out)
        return out

    def decode_run_s(self, batch_size: int, kv_total_start: int, out: np.ndarray) -> np.ndarray:
        """Latencies of ``len(out)`` consecutive decode iterations of one fixed batch, written into ``out``.

        Iteration k holds ``kv_total_start + k * batch_size`` KV tokens (every sequence gains one per
        iteration). Element k is bitwise equal to ``decode_s(batch_size, kv_total_start + k * batch_size)``:
        ``k * B + (T0 - a)`` is the same exact integer as ``(T0 + k * B) - a``, and the rest runs the same
        operations. The simulator's fast advance calls this once per batch change, so the common case
        (the whole run inside one cell of the grid) is three in-place numpy operations.
        """
        n = len(out)
        if n > len(self._steps):
            self._steps = np.arange(max(n, 2 * len(self._steps)), dtype=np.float64)
        row = self._rows.get(batch_size)
        if row is None:
            row = self._decode_row(batch_size)
        last = kv_total_start + (n - 1) * batch_size
        i = bisect_right(row.a_tail_list, kv_total_start)
        if (not row.batch_off_grid and kv_total_start >= row.lo and last <= row.hi
                and i == bisect_right(row.a_tail_list, last)):
            np.multiply(self._steps[:n], float(batch_size), out=out)
            out += kv_total_start - row.a_list[i]
            out *= row.s_list[i]
            out += row.z0_list[i]
            return out
        out[:] = self.decode_s_many(batch_size, self._steps[:n] * float(batch_size) + kv_total_start)
        return out

    def decode_s(self, batch_size: int, kv_tokens_total: int) -> float:
        """Scalar :meth:`decode_s_many`; bitwise equal to ``decode_s_many(b, np.array([kv]))[0]``
        (same operations in the same order, in Python floats)."""
        row = self._rows.get(batch_size)
        if row is None:
            row = self._decode_row(batch_size)
        total = float(kv_tokens_total)
        i = bisect_right(row.a_tail_list, total)
        value = (total - row.a_list[i]) * row.s_list[i] + row.z0_list[i]
        if row.batch_off_grid or total < row.lo or total > row.hi:
            if row.batch_off_grid:
                self._off.note("decode", "batch_size", batch_size, self._d_b[0], self._d_b[-1])
            if total < row.lo or total > row.hi:
                self._off.note("decode", "kv_tokens_per_seq", total / batch_size, self._kv_lo, self._kv_hi)
            if value < MIN_LATENCY_S:
                value = MIN_LATENCY_S
        return float(value)

    def mixed_s(self, prefill_tokens: int, num_prefill_seqs: int, decode_batch: int,
                decode_kv_total: int) -> float:
        """Latency of a chunked-prefill iteration that runs ``prefill_tokens`` prompt tokens of
        ``num_prefill_seqs`` sequences together with ``decode_batch`` decodes holding
        ``decode_kv_total`` KV tokens in all.

        Decision (no table measures mixed batches): the linear layers of a mixed iteration process
        every token once, prompt and decode alike, so the iteration is costed as a prefill of
        ``P + d`` tokens in ``n_p + d`` sequences (each decode is a one-token sequence), plus the
        attention the decodes do over their KV cache, taken from the decode table as the increment
        over the smallest KV it was measured at::

            prefill_s(P + d, n_p + d) + max(0, decode_s(d, kv) - decode_s(d, d * kv_grid_min))

        With ``d == 0`` this is ``prefill_s(P, n_p)``; with ``P == 0`` it is ``decode_s(d, kv)`` (a
        pure decode iteration is costed by the decode table alone). Both zero is an error.
        """
        if decode_batch == 0:
            if prefill_tokens == 0:
                raise ValueError("mixed_s: an iteration with no prefill tokens and no decodes has no cost")
            return self.prefill_s(prefill_tokens, num_prefill_seqs)
        if prefill_tokens == 0:
            return self.decode_s(decode_batch, decode_kv_total)
        d = decode_batch
        row = self._rows.get(d)
        if row is None:
            row = self._decode_row(d)
        extra = self.decode_s(d, decode_kv_total) - row.z0_list[0]  # z0[0] == decode_s(d, d * kv_min)
        return self.prefill_s(prefill_tokens + d, num_prefill_seqs + d) + (extra if extra > 0.0 else 0.0)

    # ------------------------------------------------------------------------------ internals

    def _decode_row(self, batch_size) -> KvRow:
        """Interpolate (or extrapolate) the decode grid to ``batch_size`` and cache the result."""
        if not batch_size >= 1:
            raise ValueError(f"decode batch_size must be >= 1, got {batch_size!r}")
        bs = self._d_b
        i, t = cell(bs, batch_size)
        z = (1.0 - t) * self._d_z[i] + t * self._d_z[i + 1]
        off = batch_size < bs[0] or batch_size > bs[-1]
        if off:
            z = np.maximum(z, MIN_LATENCY_S)
        row = self._rows[batch_size] = KvRow(self._kv, z, batch_size, off)
        return row

    def _decode_many_off_grid(self, batch_size, row: KvRow, total: np.ndarray, out: np.ndarray) -> None:
        """Slow path of :meth:`decode_s_many`: count, warn, floor (elementwise, in place)."""
        if row.batch_off_grid:
            self._off.note("decode", "batch_size", batch_size, self._d_b[0], self._d_b[-1], n=total.size,
                           stacklevel=4)
        below, above = total < row.lo, total > row.hi
        if n := int(np.count_nonzero(below)):
            self._off.note("decode", "kv_tokens_per_seq", float(total.min()) / batch_size, self._kv_lo,
                           self._kv_hi, n=n, stacklevel=4)
        if n := int(np.count_nonzero(above)):
            self._off.note("decode", "kv_tokens_per_seq", float(total.max()) / batch_size, self._kv_lo,
                           self._kv_hi, n=n, stacklevel=4)
        # floor exactly the elements decode_s would floor, so both stay bitwise equal
        mask = True if row.batch_off_grid else (below | above)
        np.maximum(out, MIN_LATENCY_S, out=out, where=mask)

    def __repr__(self) -> str:
        m = self.metadata
        return f"CostModel({m['gpu']}, {m['model']}, tp{m['tp']}, source={m['source']}, {self.directory})"


def cost_model_for(gpu: str, model: str, tp: int, path: str | Path | None = None,
                   tables_root: str | Path | None = None) -> CostModel:
    """The cost model of a run, from the ``conf/costs`` keys ``path`` and ``tables_root``.

    ``path`` set: that directory (relative paths as in :func:`simcolo.paths.resolve_path`). Otherwise
    the directory for ``gpu``/``model``/``tp`` under ``tables_root`` (default: the shipped tables).
    Either way the table's metadata must name the run's gpu, model and tp -- a table of another
    model silently used would make every result wrong.
    """
    if path is not None:
        directory = resolve_path(path)
    else:
        root = resolve_path(tables_root) if tables_root is not None else TABLES_DIR
        directory = CostModel.resolve(gpu, model, tp, root)
    cm = CostModel.load(directory)
    found = (cm.metadata["gpu"], cm.metadata["model"], cm.metadata["tp"])
    if found != (gpu, model, tp):
        raise TableError(f"{directory / METADATA_FILE}: tables are for gpu={found[0]}, model={found[1]}, "
                         f"tp={found[2]}, but the run uses gpu={gpu}, model={model}, tp={tp}")
    return cm
