"""One calibration run: resolve the settings, sweep every table's points (resumably), write the tables.

``run(cfg)`` is what ``python -m calibrate`` calls with the composed Hydra config
(``conf/calibrate.yaml``); tests call it in-process with :func:`load_config`. The sweep is a flat list
of (table, point) pairs; each point is either skipped (its memory estimate exceeds
``max_memory_bytes``, or it ran out of memory) or measured, and recorded in ``.progress.jsonl`` at
once. Only when every point has a record are the tables and ``metadata.json`` written.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from calibrate import memory
from calibrate.context import Context
from calibrate.engine_run import calibrate_in_engine, KERNEL_DIR, settings as engine_settings
from calibrate.grids import select_grids, table_grid
from calibrate.measure_interference import describe_method, InterferenceMeasurer
from calibrate.measure_learning_curve import LearningCurveMeasurer
from calibrate.measure_serving import DecodeMeasurer, PrefillMeasurer
from calibrate.measure_train import LoraStepMeasurer, TrainStageMeasurer
from calibrate.measure_transfer import TransferMeasurer
from calibrate.progress import point_key, ProgressLog, progress_bar
from calibrate.timing import CallTimer
from calibrate.write import complete_grid, environment, GRID_TABLES, now_iso, write_calibration
from simcolo.config.compose import load_config as load_simcolo_config
from simcolo.config.read import read_seed
from simcolo.costs.schema import table_dir_name
from simcolo.costs.tables import read_metadata
from simcolo.errors import ConfigError
from simcolo.specs import gpu_spec_from_mapping, GPUSpec, load_gpu_spec, model_spec_from_mapping

MEASURERS = {"prefill": PrefillMeasurer, "decode": DecodeMeasurer, "train_stage": TrainStageMeasurer,
             "lora_step": LoraStepMeasurer, "transfer": TransferMeasurer, "interference": InterferenceMeasurer,
             "learning_curve": LearningCurveMeasurer}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Substrings of torch.cuda.get_device_name -> conf/gpu spec (first match wins).
GPU_NAMES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"))


@dataclass
class Result:
    out_dir: Path
    complete: bool                  # False when stopped early (stop_after); no tables written then
    measured: int = 0               # points measured in this run
    resumed: int = 0                # points found in .progress.jsonl
    skipped: list[dict] = field(default_factory=list)
    rechecked: int = 0              # points measured again because they broke monotonicity
    metadata: dict[str, Any] | None = None
    wall_s: float = 0.0


# --------------------------------------------------------------------------------- settings

def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``python -m calibrate <overrides>`` would run, without starting a Hydra job."""
    return load_simcolo_config(overrides, config_name="calibrate")


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or str(name).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}, but torch {torch.__version__} sees no CUDA device "
                              f"(built with CUDA {torch.version.cuda}); use device=cpu")
        dev = torch.device(name)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(f"device={name!r}; expected cpu or cuda")


def resolve_gpu(cfg: DictConfig, device: torch.device) -> GPUSpec:
    given = cfg.get("gpu")
    if given is not None:
        spec = gpu_spec_from_mapping(OmegaConf.to_container(given), "gpu")
        if device.type == "cpu" and spec.name != "cpu":
            raise ConfigError(f"gpu={spec.name} with device=cpu would label CPU measurements as "
                              f"{spec.name}; use gpu=cpu (or leave gpu unset)")
        return spec
    if device.type == "cpu":
        return load_gpu_spec("cpu")
    name = torch.cuda.get_device_name(device)
    for part, spec_name in GPU_NAMES:
        if part in name:
            return load_gpu_spec(spec_name)
    raise ConfigError(f"cannot tell which conf/gpu spec the device {name!r} is; name it with gpu=<spec> "
                      "(a file in conf/gpu, add one for a new GPU)")


def resolve_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    name = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r}; expected one of {sorted(DTYPES)} (or null)")
    return DTYPES[name]


def _check_int(cfg: DictConfig, key: str, low: int, allow_null: bool = False) -> int | None:
    v = cfg.get(key)
    if v is None and allow_null:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{key}={v!r}; expected an integer >= {low}" + (" or null" if allow_null else ""))
    return v


# --------------------------------------------------------------------------------- the run

def run(cfg: DictConfig) -> Result:
    t0 = time.perf_counter()
    seed = read_seed(cfg)
    device = resolve_device(str(cfg.device))
    spec = model_spec_from_mapping(OmegaConf.to_container(cfg.model), "model")
    gpu = resolve_gpu(cfg, device)
    dtype = resolve_dtype(cfg, device)
    if cfg.tp != 1:
        raise ConfigError(f"tp={cfg.tp}: calibrate measures one GPU; tensor-parallel calibration is not "
                          "implemented (use the roofline tables for tp > 1)")
    repeats, warmup = _check_int(cfg, "repeats", 1), _check_int(cfg, "warmup", 0)
    stop_after = _check_int(cfg, "stop_after", 1, allow_null=True)
    if cfg.threads is not None:
        torch.set_num_threads(_check_int(cfg, "threads", 1))
    unknown = [m for m in cfg.measure if m not in MEASURERS]
    if unknown:
        raise ConfigError(f"measure: unknown table(s) {unknown}; known: {list(MEASURERS)}")
    missing = [t for t in GRID_TABLES if t not in cfg.measure]
    if missing:
        raise ConfigError(f"measure: {list(cfg.measure)} lacks {missing}; the format requires them")
    out = Path(cfg.out) if cfg.out else Path("outputs/calibrate") / table_dir_name(gpu.name, spec.name, 1)
    limit = cfg.max_memory_bytes
    if limit is None:
        limit = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                 else gpu.memory_bytes)
    memory.ATTENTION_SCORES = device.type != "cuda"

    ctx = Context(spec, device, dtype, CallTimer(str(device), repeats, warmup, float(cfg.cpu_min_block_s)),
                  seed)
    profile, grids = select_grids(cfg, device.type)
    engine = engine_settings(cfg, profile)     # checked before the sweep, run after it
    measurers = [MEASURERS[t](ctx, table_grid(grids, profile, t), f"grids.{profile}.{t}")
                 for t in MEASURERS if t in cfg.measure]
    header = {"model_config": asdict(spec), "gpu": gpu.name, "device": device.type, "dtype": str(dtype),
              "tp": 1, "seed": seed}
    log = ProgressLog(out, header, fresh=bool(cfg.fresh))
    plan = [(m, p) for m in measurers for p in m.points()]
    todo = [(m, p) for m, p in plan if not log.done(m.table, p)]
    result = Result(out, complete=False, resumed=len(plan) - len(todo))
    print(f"calibrate: {spec.name} on {gpu.name} ({device}, {str(dtype).removeprefix('torch.')}), "
          f"{len(plan)} points in {len(measurers)} tables, {result.resumed} already in {log.path}", flush=True)

    try:
        _sweep(todo, log, limit, ctx, device, stop_after, cfg.progress_bar, result)
        if result.complete:
            result.rechecked = _recheck_all(measurers, log, cfg.recheck_tolerance, ctx, device)
    finally:
        log.close()
    if not result.complete:
        print(f"calibrate: stopped after {result.measured} new points (stop_after={stop_after}); run the "
              f"same command again to continue from {log.path}", flush=True)
        result.wall_s = time.perf_counter() - t0
        return result

    tables, skipped = _collect(plan, log)
    if "interference" in cfg.measure:
        method, note, _ = describe_method(device)
    else:
        method, note = "unavailable: not measured (interference not in `measure`)", ""
    meta = {
        "gpu": gpu.name, "model": spec.name, "tp": 1, "dtype": str(dtype).removeprefix("torch."),
        "created": now_iso(), "model_config": asdict(spec), "gpu_spec": asdict(gpu),
        "method": _method_text(device, repeats, warmup, float(cfg.cpu_min_block_s)),
        "memory_method": ("torch.cuda.max_memory_allocated over the timed calls (absolute: weights, "
                          "state and activations)" if device.type == "cuda" else
                          "estimate (calibrate/memory.py): no allocator statistics on the CPU"),
        "interference_method": method, "interference_notes": note,
        "profile": profile, "grids": grids, "max_memory_bytes": int(limit), "repeats": repeats,
        "warmup": warmup, "seed": seed, "skipped": skipped, "generator": "calibrate",
        "recheck_tolerance": cfg.recheck_tolerance, "rechecked_points": result.rechecked,
        **environment(device),
    }
    if engine is None:
        result.metadata = write_calibration(out, tables, meta)
    else:   # the sweep's tables, then fitted to the engine's own iterations (calibrate/engine_run.py)
        write_calibration(out / KERNEL_DIR, tables, meta)
        calibrate_in_engine(out, engine, spec.name, gpu.name, str(cfg.device), cfg.threads, seed)
        result.metadata = read_metadata(out)
    result.skipped = skipped
    result.wall_s = time.perf_counter() - t0
    print(f"calibrate: wrote {out} ({', '.join(result.metadata['tables'])}); {result.measured} points "
          f"measured now, {result.resumed} resumed, {len(skipped)} skipped, {result.rechecked} re-measured; "
          f"{result.wall_s:.1f} s", flush=True)
    return result


def _sweep(todo, log: ProgressLog, limit: float, ctx: Context, device: torch.device, stop_after: int | None,
           bar: bool | None, result: Result) -> None:
    """Measure the points not yet in the log; ``result.complete`` unless stopped by ``stop_after``."""
    current = None
    try:
        for m, p in progress_bar(todo, len(todo), bar):
            if stop_after is not None and result.measured >= stop_after:
                return
            if m is not current:
                if current is not None:
                    current.close()
                ctx.drop_model()
                memory.release(device)
                current = m
            _one_point(m, p, log, limit, device, result)
        result.complete = True
    finally:
        if current is not None:
            current.close()
        ctx.drop_model()
        memory.release(device)


def _one_point(m, p: dict, log: ProgressLog, limit: float, device: torch.device, result: Result) -> None:
    need = m.estimate_bytes(p)
    if need > limit:
        reason = (f"estimated {memory.fmt_bytes(need)} exceeds max_memory_bytes "
                  f"{memory.fmt_bytes(limit)}")
        old = log.get(m.table, p)
        if old is None or old.get("reason") != reason:
            log.add(m.table, p, reason=reason, final=False)
        return
    oom = None
    try:
        rows = m.measure(p)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a skip; anything else is a bug
        if not memory.is_oom(exc):
            raise
        oom = f"out of memory ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"
    if oom is not None:
        memory.release(device)  # out here, the exception's frames (and their tensors) are gone
        log.add(m.table, p, reason=oom)
        return
    log.add(m.table, p, rows=rows)
    result.measured += 1


#: Axes along which a table's latency cannot fall: more prompt tokens (same sequences), a larger decode
#: batch, a longer KV cache all mean more work.
MONOTONE_AXES = {"prefill": ("batch_tokens",), "decode": ("batch_size", "kv_tokens_per_seq")}


def _recheck_all(measurers, log: ProgressLog, tolerance, ctx: Context, device: torch.device) -> int:
    """Measure again the points that are slower than a neighbour with more work (by > ``tolerance``):
    on a shared machine a burst of other work can slow every sample of one point. Up to two more
    measurements each; the fastest is kept (a co-running load only ever adds time)."""
    if tolerance is None:
        return 0
    count = 0
    for m in measurers:
        if m.table not in MONOTONE_AXES:
            continue
        points = m.points()
        lat = {}
        for p in points:
            rec = log.get(m.table, p)
            if rec is not None and rec["status"] == "ok":
                lat[point_key(m.table, p)] = (rec["rows"], rec["rows"][0]["latency_s"])
        axes = {a: sorted({p[a] for p in points}) for a in MONOTONE_AXES[m.table]}
        for p in points:
            here = lat.get(point_key(m.table, p))
            if here is None:
                continue
            for a, values in axes.items():
                i = values.index(p[a])
                nxt = lat.get(point_key(m.table, {**p, a: values[i + 1]})) if i + 1 < len(values) else None
                if nxt is None or here[1] <= tolerance * nxt[1]:
                    continue
                best = here
                for _ in range(2):
                    rows = m.measure(p)
                    if rows[0]["latency_s"] < best[1]:
                        best = (rows, rows[0]["latency_s"])
                    if best[1] <= tolerance * nxt[1]:
                        break
                log.add(m.table, p, rows=best[0])
                lat[point_key(m.table, p)] = here = best
                count += 1
                break
        m.close()
        ctx.drop_model()
        memory.release(device)
    return count


def _collect(plan, log: ProgressLog) -> tuple[dict[str, list[dict]], list[dict]]:
    """Rows per table for the points of this run's grids, and every skip (with grid lines dropped)."""
    tables: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    requested: dict[str, list[dict]] = {}
    for m, p in plan:
        rec = log.get(m.table, p)
        requested.setdefault(m.table, []).append(p)
        tables.setdefault(m.table, [])
        if rec is not None and rec["status"] == "ok":
            tables[m.table].extend(rec["rows"])
        elif rec is not None:
            skipped.append({"table": m.table, "point": p, "reason": rec["reason"]})
    for name in GRID_TABLES:
        tables[name], dropped = complete_grid(name, requested[name], tables[name])
        skipped.extend(dropped)
    return tables, skipped


def _method_text(device: torch.device, repeats: int, warmup: int, block_s: float) -> str:
    timing = (f"CUDA events around each call, {warmup} warm-up calls, median of {repeats} calls"
              if device.type == "cuda" else
              f"torch.utils.benchmark.Timer on the CPU ({torch.get_num_threads()} threads), {warmup} "
              f"warm-up calls, median of {repeats} samples, each the mean of a block of calls >= "
              f"{block_s} s (one call per sample where a setup precedes it)")
    return (f"Measured by calibrate/ (python -m calibrate) with torch {torch.__version__}: {timing}. "
            "Model: simcolo/engine/model.py (Llama-family, random weights, SDPA attention, KV cache). "
            "prefill: equal-length random prompts, forward writing a fresh KV cache, last-token logits; "
            "decode: one token per sequence over a filled KV cache of fixed length; train_stage / "
            "lora_step: forward, backward, AdamW step (see calibrate/measure_train.py); transfer, "
            "interference, learning_curve: see the modules calibrate/measure_*.py.")
