"""The engine's runners (simcolo/engine/runner.py) on the tiny model, CPU float32: the serving engine
(prefill, chunked prefill, decode, mixed iterations, moving a sequence between instances) against a
no-cache forward of the whole sequence, its errors; full-parameter, LoRA and pipeline-stage training."""
import pytest
import torch

from simcolo.engine.kv_cache import KVCache
from simcolo.engine.lora import LoRALinear
from simcolo.engine.model import build_model, stage_layers
from simcolo.engine.runner import LoraTrainingRunner, ServingRunner, StageTrainingRunner, TrainingRunner
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
    logits = runner.prefill_logits([(k, torch.tensor(s)) for k, s in list(seqs.items())[:3]])
    logits = torch.cat([logits, runner.prefill_logits([("r3", torch.tensor(seqs["r3"]))])])
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
        out = runner.decode_logits(step, ids)
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
    out = runner.decode_logits(["b"], torch.tensor([7]))
    torch.testing.assert_close(out[0], reference_logits(model, b.tolist() + [7]), atol=ATOL, rtol=0)


def test_serving_errors_name_the_key_and_limit(spec, model):
    runner = ServingRunner(model, max_seqs=2, max_len=8)
    runner.prefill([("x", prompt(spec, 7, 0))])
    with pytest.raises(ValueError, match="'x'.*7 cached \\+ 3 new = 10 tokens > max_len=8"):
        runner.prefill([("x", prompt(spec, 3, 1))])  # a key held continues: here beyond the cache
    with pytest.raises(ValueError, match="'y'.*9 tokens.*max_len=8"):
        runner.prefill([("y", prompt(spec, 9, 1))])
    with pytest.raises(ValueError, match="no free slot.*max_seqs 2"):
        runner.prefill([("y", prompt(spec, 3, 1)), ("z", prompt(spec, 3, 2))])
    assert runner.keys() == ["x"]  # a refused prefill leaves the cache as it was
    runner.decode(["x"], torch.tensor([1]))  # position 7: the last one
    with pytest.raises(ValueError, match="'x'.*overflow.*max_len=8"):
        runner.decode(["x"], torch.tensor([1]))
    with pytest.raises(ValueError, match="duplicate"):
        runner.decode(["x", "x"], torch.tensor([1, 2]))
    with pytest.raises(KeyError, match="'nope'"):
        runner.decode(["nope"], torch.tensor([1]))
    with pytest.raises(ValueError, match="prefill of no sequences"):
        runner.prefill([])
    with pytest.raises(ValueError, match="'w': no new tokens"):
        runner.prefill([("w", torch.tensor([], dtype=torch.long))])
    with pytest.raises(ValueError, match="2 keys but 1 token ids"):
        runner.decode(["x", "y"], torch.tensor([1]))
    cache = KVCache(spec, 1, 4, num_layers=1, device="cpu", dtype=torch.float32)
    cache.allocate("k", 2)
    with pytest.raises(ValueError, match="'k' already holds slot 0"):
        cache.allocate("k", 1)
    with pytest.raises(ValueError, match="no free slot for sequence 'j'.*1 slots"):
        cache.allocate("j", 1)
    with pytest.raises(ValueError, match="whole model"):
        ServingRunner(build_model(spec, head=False), 1, 8)
    with pytest.raises(ValueError, match="max_context_len 512"):
        ServingRunner(model, 1, 513)
    with pytest.raises(ValueError, match="not both"):
        ServingRunner(model, 1, 8, cache=runner.cache)
    with pytest.raises(ValueError, match="holds 1 layers; the model has 2"):
        ServingRunner(model, cache=cache)


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


# --- chunked prefill, moving sequences, mixed iterations ------------------------------------------------

def test_chunked_prefill_matches_whole_prefill_and_full_forward(spec, model):
    """A prompt run in 2 or 3 chunks (the key holding the first ones) ends at the logits of the whole
    prompt in one prefill and of a no-cache forward; chunks of several sequences, new and continuing,
    at different positions, share one batch; decoding afterwards continues every sequence correctly."""
    a, b, c = prompt(spec, 13, 1), prompt(spec, 20, 2), prompt(spec, 6, 3)
    whole = ServingRunner(model, max_seqs=3, max_len=32)
    want = whole.prefill_logits([("a", a), ("b", b), ("c", c)])
    for key, ids, row in zip("abc", (a, b, c), want):
        torch.testing.assert_close(row, reference_logits(model, ids.tolist()), atol=ATOL, rtol=0)

    chunked = ServingRunner(model, max_seqs=3, max_len=32)
    chunked.prefill([("a", a[:5]), ("b", b[:8])])                       # two new sequences
    assert [chunked.length(k) for k in "ab"] == [5, 8]
    mid = chunked.prefill_logits([("b", b[8:9]), ("a", a[5:11]), ("c", c)])  # continuing + new, ragged
    torch.testing.assert_close(mid[0], reference_logits(model, b[:9].tolist()), atol=ATOL, rtol=0)
    torch.testing.assert_close(mid[1], reference_logits(model, a[:11].tolist()), atol=ATOL, rtol=0)
    last = chunked.prefill_logits([("a", a[11:]), ("b", b[9:])])      # the last chunks
    torch.testing.assert_close(last, want[:2], atol=ATOL, rtol=0)
    torch.testing.assert_close(mid[2], want[2], atol=ATOL, rtol=0)
    assert [chunked.length(k) for k in "abc"] == [13, 20, 6]

    seqs = {k: ids.tolist() + [int(row.argmax())] for k, ids, row in zip("abc", (a, b, c), want)}
    for _ in range(3):
        keys = ["c", "a", "b"]
        out = chunked.decode_logits(keys, torch.tensor([seqs[k][-1] for k in keys]))
        for key, row in zip(keys, out):
            torch.testing.assert_close(row, reference_logits(model, seqs[key]), atol=ATOL, rtol=0)
            seqs[key].append(int(row.argmax()))


def test_chunk_padding_past_max_len_is_harmless(spec, model):
    """A short chunk at the end of a full slot, batched with a long new prompt: its padding would run
    past max_len (positions are clamped, padding is never written)."""
    runner = ServingRunner(model, max_seqs=2, max_len=16)
    a, b = prompt(spec, 16, 4), prompt(spec, 12, 5)
    runner.prefill([("a", a[:14])])
    out = runner.prefill_logits([("a", a[14:]), ("b", b)])
    torch.testing.assert_close(out[0], reference_logits(model, a.tolist()), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], reference_logits(model, b.tolist()), atol=ATOL, rtol=0)


def test_export_import_then_decode_matches_decoding_in_place(spec, model):
    """Prefill on one instance, move the sequence's KV to another (disaggregation), decode there: the
    same tokens as decoding where it was prefilled; the receiving cache may hold other sequences."""
    p, q = prompt(spec, 9, 6), prompt(spec, 5, 7)
    prefill_side = ServingRunner(model, max_seqs=2, max_len=24)
    first = prefill_side.prefill([("p", p)])
    k, v = prefill_side.export("p")
    assert k.shape == (spec.num_layers, spec.num_kv_heads, 9, spec.head_dim) and v.shape == k.shape

    decode_side = ServingRunner(model, max_seqs=3, max_len=24)
    decode_side.prefill([("q", q)])
    decode_side.import_sequence("p", k, v)
    prefill_side.release("p")  # the exported copies outlive the slot
    prefill_side.prefill([("p", p)])
    assert decode_side.keys() == ["q", "p"] and decode_side.length("p") == 9

    here, there = [int(first)], [int(first)]
    for _ in range(5):
        here.append(int(prefill_side.decode(["p"], torch.tensor(here[-1:]))))
        there.append(int(decode_side.decode(["p"], torch.tensor(there[-1:]))))
    assert here == there
    torch.testing.assert_close(decode_side.decode_logits(["p"], torch.tensor(there[-1:]))[0],
                               reference_logits(model, p.tolist() + there), atol=ATOL, rtol=0)

    with pytest.raises(ValueError, match="already holds slot"):
        decode_side.import_sequence("q", k, v)
    with pytest.raises(ValueError, match="do not fit"):
        decode_side.import_sequence("r", k[:1], v[:1])


def test_mixed_iteration_equals_prefill_then_decode(spec, model):
    chunks = [("n", prompt(spec, 7, 8)), ("m", prompt(spec, 4, 9))]

    def running():
        runner = ServingRunner(model, max_seqs=5, max_len=32)
        runner.prefill([("r0", prompt(spec, 6, 10)), ("r1", prompt(spec, 11, 11)), ("m", prompt(spec, 3, 12))])
        return runner

    mixed, separate = running(), running()
    decode_keys, decode_ids = ["r1", "r0"], torch.tensor([3, 4])
    got = mixed.mixed(chunks, decode_keys, decode_ids)
    want = separate.prefill(chunks), separate.decode(decode_keys, decode_ids)
    assert [t.tolist() for t in got] == [t.tolist() for t in want]
    assert {k: mixed.length(k) for k in mixed.keys()} == {k: separate.length(k) for k in separate.keys()}
    assert mixed.mixed([], ["n"], torch.tensor([1]))[0].numel() == 0
    with pytest.raises(KeyError, match="'zz'"):  # refused before the prefill part runs
        mixed.mixed([("new", prompt(spec, 3, 1))], ["zz"], torch.tensor([1]))
    assert "new" not in mixed.keys()


# --- LoRA and pipeline-stage training ---------------------------------------------------------------------

def test_lora_training_leaves_what_serving_computes_bit_identical(spec, model):
    """LoRA on q_proj and v_proj trains on the very model being served: the adapters change and the
    loss falls, while the served logits and every base weight stay exactly as they were."""
    server = ServingRunner(model, max_seqs=2, max_len=32)
    probe = prompt(spec, 10, 20)
    served_before = server.prefill_logits([("probe", probe)])
    server.release("probe")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    lora = LoraTrainingRunner(model, rank=4, alpha=8.0, lr=1e-2, generator=torch.Generator().manual_seed(0))
    assert isinstance(lora.adapted.layers[0].attn.q_proj, LoRALinear)
    assert isinstance(lora.adapted.layers[0].attn.v_proj, LoRALinear)
    assert type(model.layers[0].attn.q_proj) is torch.nn.Linear  # the served modules are untouched
    assert len(lora.adapter_params) == 2 * 2 * spec.num_layers
    assert not any(p.requires_grad for p in model.parameters())
    b_before = [p.detach().clone() for p in lora.adapter_params]

    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(21))
    losses = []
    for _ in range(6):
        losses.append(lora.forward_backward(ids))
        assert all(p.grad is None for p in model.parameters())
        lora.optimizer_step()
        # serving between fine-tuning steps, on the same module
        assert server.prefill([("probe", probe)]).tolist() == [int(served_before.argmax())]
        server.release("probe")
    assert losses[-1] < losses[0] - 0.1
    assert not any(torch.equal(p, q) for p, q in zip(lora.adapter_params, b_before))
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert torch.equal(server.prefill_logits([("probe", probe)]), served_before)
    with torch.no_grad():
        assert not torch.equal(lora.adapted(ids), model(ids))


def stage_grads(stage_model):
    """Gradients by their name in the whole model."""
    return {f"layers.{stage_model.layers[int(n.split('.')[1])].index}.{n.split('.', 2)[2]}"
            if n.startswith("layers.") else n: p.grad for n, p in stage_model.named_parameters()}


def test_two_pipeline_stages_match_whole_model_training(spec):
    """S=2 stage runners (built separately, same seed) give the loss, the gradients and, after an AdamW
    step, the weights of TrainingRunner on the whole model; two micro-batches in flight (GPipe order)."""
    whole = TrainingRunner(build_model(spec, seed=7), lr=1e-3)
    stages = [StageTrainingRunner(build_model(spec, seed=7, layers=stage_layers(spec, 2, s), embed=s == 0,
                                              head=s == 1), lr=1e-3) for s in range(2)]
    gen = torch.Generator().manual_seed(30)
    batches = [torch.randint(0, spec.vocab_size, (2, 12), generator=gen) for _ in range(2)]
    targets = [ids.roll(-1, dims=1) for ids in batches]

    whole_losses = [whole.forward_backward(ids) for ids in batches]
    stage_losses = [stages[1].forward(stages[0].forward(ids), tgt) for ids, tgt in zip(batches, targets)]
    assert stages[0].in_flight == stages[1].in_flight == 2
    for _ in batches:
        grad = stages[1].backward()
        assert grad.shape == (2, 12, spec.hidden_size)
        assert stages[0].backward(grad) is None  # the first stage has no input gradient
    torch.testing.assert_close(torch.stack(stage_losses), torch.tensor(whole_losses), atol=1e-5, rtol=0)

    want = {n: p.grad for n, p in whole.model.named_parameters()}
    got = {**stage_grads(stages[0].model), **stage_grads(stages[1].model)}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)

    whole.optimizer_step()
    for s in stages:
        s.optimizer_step()
    weights = {n: p for s in stages for n, p in zip(stage_grads(s.model), s.model.parameters())}
    for name, p in whole.model.named_parameters():
        torch.testing.assert_close(weights[name], p, atol=1e-5, rtol=0, msg=name)

    with pytest.raises(ValueError, match="needs targets"):
        stages[1].forward(torch.zeros(1, 4, spec.hidden_size))
    with pytest.raises(ValueError, match="no micro-batch in flight|without a micro-batch"):
        stages[0].backward(torch.zeros(1, 4, spec.hidden_size))
    stages[0].forward(batches[0])
    with pytest.raises(ValueError, match="gradient of its output"):
        stages[0].backward()
