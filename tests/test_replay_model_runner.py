"""Live-replay kernels (simcolo/replay/model_runner.py) on the tiny model, CPU float32: the slot-cache
serving engine against a no-cache forward of the whole sequence, its errors, and training."""
import pytest
import torch

from calibrate.model import build_model
from simcolo.replay.model_runner import ServingRunner, SlotKVCache, TrainingRunner
from simcolo.specs import load_model_spec

torch.set_num_threads(1)
ATOL = 1e-4


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("tiny")


@pytest.fixture
def model(spec):
    return build_model(spec, device="cpu", dtype=torch.float32, seed=0)


def prompt(spec, t, seed):
    return torch.randint(0, spec.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, seq):
    """Last-position logits of a no-cache forward of the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor(seq)[None])[0, -1]


def test_prefill_and_decode_match_full_forward_with_release_and_shuffled_keys(spec, model):
    runner = ServingRunner(model, max_seqs=6, max_len=64)
    seqs = {f"r{i}": prompt(spec, t, seed=i).tolist() for i, t in enumerate([5, 11, 3, 8])}
    logits = runner._prefill_logits([(k, torch.tensor(s)) for k, s in list(seqs.items())[:3]])
    logits = torch.cat([logits, runner._prefill_logits([("r3", torch.tensor(seqs["r3"]))])])
    assert runner.keys() == ["r0", "r1", "r2", "r3"]
    for key, row in zip(seqs, logits):
        torch.testing.assert_close(row, reference_logits(model, seqs[key]), atol=ATOL, rtol=0)
        seqs[key].append(int(row.argmax()))
    assert [runner.length(k) for k in seqs] == [5, 11, 3, 8]

    steps = [["r0", "r1", "r2", "r3"],  # all slots, slot order: views
             ["r3", "r1", "r0", "r2"],  # all slots, shuffled: views + permutation
             ["r2", "r0"],              # a non-contiguous subset: gather
             "release r1",              # r3 moves into r1's slot
             ["r3", "r2", "r0"],
             ["r0", "r2"],
             ["r2", "r3", "r0"]]
    for step in steps:
        if isinstance(step, str):
            runner.release(step.split()[1])
            del seqs["r1"]
            assert runner.keys() == ["r0", "r3", "r2"] and runner.num_active == 3
            continue
        before = {k: runner.length(k) for k in step}
        ids = torch.tensor([seqs[k][-1] for k in step])
        out = runner._decode_logits(step, ids)
        for key, row in zip(step, out):
            torch.testing.assert_close(row, reference_logits(model, seqs[key]), atol=ATOL, rtol=0)
            seqs[key].append(int(row.argmax()))
            assert runner.length(key) == before[key] + 1
    for key in seqs:
        assert runner.length(key) == len(seqs[key]) - 1  # the last sampled token is not fed yet

    # the public API returns the greedy tokens on CPU, in the caller's order
    keys = ["r2", "r0", "r3"]
    nxt = runner.decode(keys, torch.tensor([seqs[k][-1] for k in keys]))
    assert nxt.device.type == "cpu" and nxt.dtype == torch.long
    for key, tok in zip(keys, nxt.tolist()):
        assert tok == int(reference_logits(model, seqs[key]).argmax())


def test_prefill_returns_greedy_tokens_and_reuses_freed_slots(spec, model):
    runner = ServingRunner(model, max_seqs=2, max_len=16)
    a, b = prompt(spec, 4, 1), prompt(spec, 9, 2)
    nxt = runner.prefill([("a", a), ("b", b)])
    assert nxt.tolist() == [int(reference_logits(model, s.tolist()).argmax()) for s in (a, b)]
    runner.release("a")
    assert runner.keys() == ["b"] and runner.length("b") == 9
    c = prompt(spec, 16, 3)
    assert runner.prefill([("c", c)]).tolist() == [int(reference_logits(model, c.tolist()).argmax())]
    out = runner._decode_logits(["b"], torch.tensor([7]))
    torch.testing.assert_close(out[0], reference_logits(model, b.tolist() + [7]), atol=ATOL, rtol=0)


def test_serving_errors_name_the_key_and_limit(spec, model):
    runner = ServingRunner(model, max_seqs=2, max_len=8)
    runner.prefill([("x", prompt(spec, 7, 0))])
    with pytest.raises(ValueError, match="'x' already holds slot 0"):
        runner.prefill([("x", prompt(spec, 3, 1))])
    with pytest.raises(ValueError, match="'y'.*9 tokens.*max_len=8"):
        runner.prefill([("y", prompt(spec, 9, 1))])
    with pytest.raises(ValueError, match="no free slot.*max_seqs 2"):
        runner.prefill([("y", prompt(spec, 3, 1)), ("z", prompt(spec, 3, 2))])
    assert runner.keys() == ["x"]  # a refused prefill leaves the cache as it was
    runner.decode(["x"], torch.tensor([1]))  # position 7: the last one
    with pytest.raises(ValueError, match="'x'.*full at max_len 8"):
        runner.decode(["x"], torch.tensor([1]))
    with pytest.raises(ValueError, match="duplicate"):
        runner.decode(["x", "x"], torch.tensor([1, 2]))
    with pytest.raises(KeyError, match="'nope'"):
        runner.decode(["nope"], torch.tensor([1]))
    cache = SlotKVCache(1, 1, 1, 4, 2, device="cpu", dtype=torch.float32)
    cache.allocate("k", 2)
    with pytest.raises(ValueError, match="no free slot for sequence 'j'.*1 slots"):
        cache.allocate("j", 1)
    with pytest.raises(ValueError, match="whole model"):
        ServingRunner(build_model(spec, head=False), 1, 8)
    with pytest.raises(ValueError, match="max_context_len 512"):
        ServingRunner(model, 1, 513)


def test_training_lowers_loss_and_syncs_weights_into_a_serving_replica(spec, model):
    trainer = TrainingRunner(model, lr=1e-2)
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    first = trainer.forward_backward(ids)
    trainer.optimizer_step()
    assert all(p.grad is None for p in model.parameters())
    for _ in range(4):
        loss = trainer.forward(ids)
        trainer.backward(loss)
        trainer.optimizer_step()
    assert trainer.forward_backward(ids) < first - 0.5

    # serving on the very module being trained (co-located replica): inference mode, no grads
    runner = ServingRunner(model, max_seqs=1, max_len=16)
    assert runner.prefill([("s", ids[0])]).tolist() == [int(reference_logits(model, ids[0].tolist()).argmax())]
    assert trainer.copy_weights_to(model) == 0

    replica = build_model(spec, device="cpu", dtype=torch.float32, seed=1)
    with torch.no_grad():
        assert not torch.allclose(replica(ids), model(ids))
        assert trainer.copy_weights_to(replica) == spec.num_params * 4
        assert torch.equal(replica(ids), model(ids))
