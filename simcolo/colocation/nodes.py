"""Co-located nodes, for both backends: a node as a policy sees it (the serving instance and the training
pipeline on its GPUs), how training tasks are offered to the policy and deferred, and LeMix's memory gate."""
from __future__ import annotations

import math


class RunningStats:
    """Count, mean and standard deviation, updated one value at a time (Welford)."""

    __slots__ = ("n", "mean", "_m2")

    def __init__(self):
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self._m2 += d * (x - self.mean)

    def add_repeated(self, x: float, count: int) -> None:
        """``count`` values equal to ``x`` at once (Chan et al.'s merge of two groups; exact when ``x`` is
        the mean already, as a backlog's equal tasks are)."""
        if count <= 0:
            return
        n = self.n + count
        d = x - self.mean
        self.mean += d * count / n
        self._m2 += d * d * self.n * count / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0


class NoPipeline:
    """The training side of a node that trains nothing (``training=none``): no backlog."""

    def __init__(self, num_stages: int):
        self.S = num_stages

    def stage_backlogs_s(self) -> list[float]:
        return [0.0] * self.S


def memory_gate(system, cluster, threshold: float, now):
    """LeMix's gate: a stage starts a forward only if the GPU's memory in use (weights, training
    state, serving activations, KV blocks *in use*, training activations held) plus the new
    activations stays under ``threshold`` of capacity. ``now()`` is the backend's clock."""
    inst_of = {g: inst for inst in system.instances for g in inst.gpus}
    block_bytes = system.kv_budget.block_bytes

    def gate(g: int, nbytes: float) -> bool:
        pool = cluster.gpus[g].memory
        inst = inst_of[g]
        kv_unused = (inst.num_blocks - inst.kv_blocks_used(now())) * block_bytes
        return pool.used - kv_unused + nbytes <= threshold * pool.capacity
    return gate


class Node:
    """Implements ``policies.base.NodeView`` over a serving instance and a pipeline (either backend's)."""

    def __init__(self, index: int, instance, pipeline, prefill_s_per_token: float):
        self.index = index
        self.instance, self.pipeline = instance, pipeline
        self.role = instance.role
        self.num_blocks = instance.num_blocks
        self.num_stages = pipeline.S
        self.last_arrival_s = -math.inf
        self._stats = (RunningStats(), RunningStats())   # requests, training
        self._per_token = prefill_s_per_token

    # InstanceView
    def outstanding_tokens(self, now: float) -> int:
        return self.instance.outstanding_tokens(now)

    def kv_blocks_used(self, now: float) -> int:
        return self.instance.kv_blocks_used(now)

    # NodeView
    def stage_backlogs_s(self) -> list[float]:
        return self.pipeline.stage_backlogs_s()

    def serving_wait_s(self, now: float) -> float:
        """Queued prompt tokens times the prefill cost per token (past 64 queued requests, the rest of
        the queue is counted at the first 64's mean length, to keep this O(1) in long queues)."""
        waiting = self.instance.waiting
        n = len(waiting)
        if n <= 64:
            tokens = sum(r.prompt_tokens for r in waiting)
        else:
            head = sum(waiting[i].prompt_tokens for i in range(64))
            tokens = head * n / 64
        return tokens * self._per_token

    def serving_rate(self) -> float:
        return self.instance.rate

    def queue_blocked(self) -> bool:
        return self.instance.queue_blocked()

    def serves_nothing(self) -> bool:
        """No request waiting, prefilling or decoding on the node's serving instance."""
        return self.instance.sequences() == 0

    def decode_load(self) -> tuple[int, int]:
        """(sequences decoding or admitted, their KV tokens) on the node's serving instance."""
        inst = self.instance
        return len(inst.running) + len(inst.prefilling) + len(inst.waiting), inst.kv_total

    def length_stats(self, training: bool) -> tuple[int, float, float]:
        s = self._stats[1 if training else 0]
        return s.n, s.mean, s.std

    def placed(self, now: float, length: float, training: bool) -> None:
        self.last_arrival_s = now
        self._stats[1 if training else 0].add(length)

    def placed_repeatedly(self, last_s: float, length: float, count: int) -> None:
        """``count`` training tasks of ``length`` placed here, the last at ``last_s`` (cycles of a closed
        loop advanced at once)."""
        self.last_arrival_s = last_s
        self._stats[1].add_repeated(length, count)


class TrainingPlacement:
    """Offers training tasks to a pipeline policy over co-located nodes (both backends use this): a task
    the policy defers waits in ``deferred`` and is offered again, oldest first, by ``retry`` (called
    whenever a training task finishes, and as requests arrive for a policy that asks). ``clock.now`` is
    the backend's time.

    One rule is the layout's, not the policy's: while no node serves anything, the placement stands. A
    backlog task that replaces one finished on a node goes to that node (``TrainTask.home``) without
    asking the policy, and a finished task does not offer the deferred ones again: they wait for the next
    request. With nothing to serve there is nothing for a placement to trade training against, and each
    node's pipeline then runs a closed loop that repeats itself, which the simulator advances a cycle at
    a time (``training.node_pipeline``). The policy places every other task, and all tasks once a request
    is in the system."""

    def __init__(self, policy, nodes: list, clock):
        self.policy, self.nodes, self.clock = policy, nodes, clock
        self.deferred: list = []

    def counters(self) -> dict:
        return {"train_deferred_tasks": len(self.deferred)}

    def serving_nothing(self) -> bool:
        """No node serves anything: the placement stands, and each node's training is a closed loop."""
        return all(n.serves_nothing() for n in self.nodes)

    def task_finished(self) -> None:
        """A training task finished: offer the deferred tasks again, unless the placement stands."""
        if not self.serving_nothing():
            self.retry()

    def place(self, task) -> None:
        if task.home >= 0 and self.serving_nothing():
            self._put(task, task.home)
            return
        i = self._choose(task)
        if i is None:
            self.deferred.append(task)
        else:
            self._put(task, i)

    def retry(self) -> None:
        while self.deferred:
            i = self._choose(self.deferred[0])
            if i is None:
                return
            self._put(self.deferred.pop(0), i)   # popped first: placing may finish tasks (and retry)

    def _choose(self, task) -> int | None:
        return self.policy.place_training(task, self.nodes, self.policy.predictor, self.clock.now)

    def _put(self, task, i: int) -> None:
        node = self.nodes[i]
        node.placed(self.clock.now, task.tokens, True)
        node.pipeline.place(task)
