"""An isolated trainer's kernels in a child process (the replay's CPU mode).

Isolated training runs on GPUs of its own. On the CPU the replay's "GPUs" are threads of one Python
process, and a training thread would slow serving through the GIL, which separate GPUs never do; so
there the trainer computes in a child process (its own interpreter, its own core) and the serving
replicas' weights live in shared memory, into which the child copies each weight sync. The parent's
trainer thread keeps the bookkeeping (tasks, records, versions) and times each step around the call.
"""
from __future__ import annotations

import traceback
from dataclasses import asdict

import torch
import torch.multiprocessing as mp


def _task_ids(index: int, task_id: int, vocab: int, micro_batch: int, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000_003 * (index + 1) + task_id)
    return torch.randint(vocab, (micro_batch, seq_len), generator=gen)


def _child(conn, spec_fields: dict, seed: int, threads: int, serving_params: list[list[torch.Tensor]]) -> None:
    try:
        from simcolo.engine.model import build_model
        from simcolo.engine.runner import TrainingRunner
        from simcolo.specs import ModelSpec

        torch.set_num_threads(threads)
        spec = ModelSpec(**spec_fields)
        runner = TrainingRunner(build_model(spec, device="cpu", seed=seed))
        params = list(runner.model.parameters())
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "step":   # (step, trainer index, [(task id, micro_batch, seq_len)], optimizer?)
                _, index, tasks, optimizer = msg
                for task_id, mb, seq in tasks:
                    runner.forward_backward(_task_ids(index, task_id, spec.vocab_size, mb, seq))
                if optimizer:
                    runner.optimizer_step()
            elif msg[0] == "sync":
                with torch.no_grad():
                    for dst in serving_params:
                        for d, s in zip(dst, params):
                            d.copy_(s)
            conn.send(("ok",))
    except BaseException:  # noqa: BLE001 - the parent raises it in the replay
        conn.send(("error", traceback.format_exc()))


class ProcessTrainingWorker:
    """Same calls as the in-thread worker (``step``, ``sync``), run by a child process."""

    def __init__(self, spec, seed: int, threads: int, serving_models: list[torch.nn.Module]):
        for m in serving_models:
            m.share_memory()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="simcolo-trainer", daemon=True,
                                 args=(child, asdict(spec), seed, threads,
                                       [[p.data for p in m.parameters()] for m in serving_models]))
        self._proc.start()
        self._call(None)   # wait for "ready"

    def _call(self, msg) -> None:
        if msg is not None:
            self._conn.send(msg)
        reply = self._conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"training process failed:\n{reply[1]}")

    def step(self, index: int, tasks, optimizer: bool) -> None:
        self._call(("step", index, [(t.id, t.micro_batch, t.seq_len) for t in tasks], optimizer))

    def sync(self) -> None:
        self._call(("sync",))

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()


class ThreadTrainingWorker:
    """The trainer's kernels in the trainer thread itself (CUDA: a GPU kernel holds no GIL)."""

    def __init__(self, runner, device, live, serving_models: list[torch.nn.Module], vocab: int):
        self.runner, self.device, self.live, self.serving_models, self.vocab = runner, device, live, serving_models, vocab

    def step(self, index: int, tasks, optimizer: bool) -> None:
        for t in tasks:
            ids = _task_ids(index, t.id, self.vocab, t.micro_batch, t.seq_len).to(self.device)
            self.runner.forward_backward(ids)
        if optimizer:
            self.runner.optimizer_step()
        self.live.synchronize(self.device)

    def sync(self) -> None:
        for m in self.serving_models:
            self.runner.copy_weights_to(m)
        self.live.synchronize(self.device)

    def close(self) -> None:
        pass
