"""The runtime model (simcolo/engine/model.py), its KV cache (engine/kv_cache.py) and LoRA adapters
(engine/lora.py), on CPU in float32; and that calibrate/ and the replay share this one engine."""
import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from simcolo.costs import schema
from simcolo.engine.kv_cache import KVCache
from simcolo.engine.lora import LoRALinear, apply_lora, lora_param_count
from simcolo.engine.model import Llama, build_model, stage_layers, weight_sharing_copy
from simcolo.paths import PROJECT_ROOT
from simcolo.specs import load_model_spec

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("tiny")


def ids(spec, b, t, seed=1):
    return torch.randint(0, spec.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def rows(n, t, first=0):
    """``extend`` rows: sequences first..first+n-1, ``t`` new tokens each."""
    return [(first + i, t) for i in range(n)]


def test_tiny_parameter_count_matches_spec(spec):
    model = build_model(spec)
    assert n_params(model) == spec.num_params
    assert next(model.parameters()).dtype == torch.float32


def test_tied_embeddings_count_once(spec):
    tied = dataclasses.replace(spec, tie_embeddings=True)
    model = build_model(tied)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert n_params(model) == tied.num_params


@pytest.mark.parametrize("name", ["llama3-8b", "qwen2.5-7b"])
def test_large_models_on_meta_match_spec(name):
    big = load_model_spec(name)
    model = build_model(big, device="meta")
    assert n_params(model) == big.num_params
    assert all(p.is_meta for p in model.parameters())
    assert (model.layers[0].attn.q_proj.bias is not None) == big.qkv_bias


def test_same_seed_same_weights_other_seed_differs(spec):
    a, b, c = build_model(spec, seed=3), build_model(spec, seed=3), build_model(spec, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_module_names_read_like_hugging_face(spec):
    names = {n for n, _ in build_model(spec).named_parameters()}
    for n in ("embed_tokens.weight", "layers.1.attn.q_proj.weight", "layers.1.attn.o_proj.weight",
              "layers.0.mlp.gate_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.input_norm.weight",
              "layers.0.post_attn_norm.weight", "norm.weight", "lm_head.weight"):
        assert n in names


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_decoding_matches_full_forward(spec, batch):
    """Prefill 5 tokens, decode 3 one at a time == one forward over all 8 (GQA: 4 heads, 2 KV heads)."""
    assert spec.num_kv_heads < spec.num_attention_heads
    model = build_model(spec).eval()
    x = ids(spec, batch, 8)
    with torch.inference_mode():
        full = model(x)
        cache = KVCache(spec, batch, 8, device="cpu", dtype=torch.float32)
        steps = [model(x[:, :5], cache.extend(rows(batch, 5)))]
        assert cache.lengths == [5] * batch
        for t in range(5, 8):
            steps.append(model(x[:, t:t + 1], cache.extend(rows(batch, 1))))
        assert cache.lengths == [8] * batch
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert full.shape == (batch, 8, spec.vocab_size)


def test_chunked_prefill_after_cached_tokens_matches_full_forward(spec):
    """A chunk of several tokens after cached ones needs the bottom-right causal mask."""
    model = build_model(spec).eval()
    x = ids(spec, 2, 9)
    with torch.inference_mode():
        full = model(x)
        cache = KVCache(spec, 2, 12, device="cpu", dtype=torch.float32)
        out = torch.cat([model(x[:, a:b], cache.extend(rows(2, b - a))) for a, b in ((0, 3), (3, 7), (7, 9))],
                        dim=1)
    torch.testing.assert_close(out, full, atol=ATOL, rtol=0)


def test_last_token_logits_only(spec):
    model = build_model(spec).eval()
    x = ids(spec, 2, 6)
    with torch.inference_mode():
        full = model(x)
        last = model(x, last_token_logits_only=True)
    assert last.shape == (2, 1, spec.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


def test_stage_layers_split_evenly_and_contiguously():
    big = load_model_spec("llama3-8b")  # 32 layers
    for n in (1, 2, 3, 5, 32):
        stages = [stage_layers(big, n, s) for s in range(n)]
        assert [i for r in stages for i in r] == list(range(big.num_layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1
    with pytest.raises(ValueError):
        stage_layers(big, 33, 0)
    with pytest.raises(ValueError):
        stage_layers(big, 2, 2)


def test_two_stage_pipeline_matches_whole_model(spec):
    """Stages built separately hold the whole model's weights (same seed), so chaining them is exact,
    with and without a per-stage KV cache."""
    whole = build_model(spec, seed=7).eval()
    first = build_model(spec, seed=7, layers=stage_layers(spec, 2, 0), head=False).eval()
    last = build_model(spec, seed=7, layers=stage_layers(spec, 2, 1), embed=False).eval()
    assert (first.lm_head, last.embed_tokens) == (None, None)
    assert n_params(first) + n_params(last) == spec.num_params
    x = ids(spec, 2, 6)
    with torch.inference_mode():
        want = whole(x)
        hidden = first(x)
        assert hidden.shape == (2, 6, spec.hidden_size)
        torch.testing.assert_close(last(hidden), want, atol=ATOL, rtol=0)
        caches = [KVCache(spec, 2, 6, num_layers=len(m.layers), device="cpu", dtype=torch.float32)
                  for m in (first, last)]

        def both(chunk):
            return last(first(chunk, caches[0].extend(rows(2, chunk.shape[1]))),
                        caches[1].extend(rows(2, chunk.shape[1])))
        out = [both(x[:, :4])] + [both(x[:, t:t + 1]) for t in (4, 5)]
        one_layer = KVCache(spec, 1, 6, num_layers=1, device="cpu", dtype=torch.float32)
        with pytest.raises(ValueError, match="holds 1 layers; this model has 2"):
            whole(x[:1, :1], one_layer.extend([(0, 1)]))
    torch.testing.assert_close(torch.cat(out, dim=1), want, atol=ATOL, rtol=0)


def test_kv_cache_bytes_and_filled(spec):
    cache = KVCache(spec, 3, 10, device="cpu", dtype=torch.float32)
    assert cache.k.shape == (spec.num_layers, 3, spec.num_kv_heads, 10, spec.head_dim)
    assert cache.nbytes == 3 * 10 * spec.kv_bytes_per_token * 4 // spec.dtype_bytes
    half = KVCache(spec, 3, 10, device="cpu", dtype=torch.bfloat16)
    assert half.nbytes == 3 * 10 * spec.kv_bytes_per_token  # tiny's dtype_bytes is 2
    g = torch.Generator().manual_seed(0)
    filled = KVCache.filled(spec, [7, 7], 8, device="cpu", dtype=torch.float32, generator=g)
    assert filled.lengths == [7, 7] and filled.k[..., :7, :].std() > 0.5
    model = build_model(spec).eval()
    with torch.inference_mode():
        out = model(ids(spec, 2, 1), filled.extend(rows(2, 1)), last_token_logits_only=True)
        assert out.shape == (2, 1, spec.vocab_size) and torch.isfinite(out).all()
        assert filled.lengths == [8, 8]
        with pytest.raises(ValueError, match="overflow"):
            model(ids(spec, 2, 1), filled.extend(rows(2, 1)))
        with pytest.raises(ValueError, match="made for 2 rows of 1 new tokens; got 1 x 1"):
            model(ids(spec, 1, 1), KVCache(spec, 2, 8, device="cpu", dtype=torch.float32).extend(rows(2, 1)))
    # the same generator draws give the same cache; ragged lengths are held as given
    again = KVCache.filled(spec, [7, 3], 8, device="cpu", dtype=torch.float32,
                           generator=torch.Generator().manual_seed(0), max_seqs=4)
    assert again.keys() == [0, 1] and again.lengths == [7, 3] and again.max_seqs == 4
    assert torch.equal(again.k[:, :2, :, :7], filled.k[:, :, :, :7])


def test_lora_trains_only_adapters(spec):
    torch.manual_seed(0)
    model = build_model(spec)
    x, y = ids(spec, 4, 8, seed=2), ids(spec, 4, 8, seed=3)
    with torch.no_grad():
        before = model(x)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = ("q_proj", "v_proj", "down_proj")
    params = apply_lora(model, rank=4, alpha=8.0, targets=targets)
    assert isinstance(model.layers[0].attn.q_proj, LoRALinear)
    assert [p for p in model.parameters() if p.requires_grad] == params
    assert sum(p.numel() for p in params) == lora_param_count(spec, 4, targets)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0

    def loss():
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    opt = torch.optim.SGD(params, lr=0.5)
    start = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < start
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        n = n.replace(".base.", ".")
        assert torch.equal(p, base[n]), n
    assert not torch.equal(model.layers[0].attn.q_proj.lora_B.weight, torch.zeros_like(params[1]))


def test_lora_init_is_deterministic(spec):
    def adapters(gen):
        return apply_lora(build_model(spec), 2, 4.0, generator=gen)

    a = adapters(torch.Generator().manual_seed(5))
    b = adapters(torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    torch.manual_seed(1)
    c = adapters(None)
    torch.manual_seed(1)
    d = adapters(None)
    assert all(torch.equal(p, q) for p, q in zip(c, d))


def test_lora_param_count_of_a_large_model():
    big = load_model_spec("llama3-8b")  # q: 4096 -> 4096, v: 4096 -> 1024
    assert lora_param_count(big, 16, ("q_proj", "v_proj")) == 32 * 16 * ((4096 + 4096) + (4096 + 1024))


def test_lora_unknown_target_is_an_error(spec):
    model = build_model(spec)
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_lora(model, 4, 8.0, targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="embed_tokens"):  # an embedding is not a linear layer
        apply_lora(model, 4, 8.0, targets=("embed_tokens",))
    with pytest.raises(ValueError, match="qkv_proj"):
        lora_param_count(spec, 4, ("qkv_proj",))
    assert all(p.requires_grad for p in model.parameters())  # a refused call changes nothing


def test_llama_constructed_directly_runs(spec):
    """Without build_model: torch's default init, rotary tables computed in __init__."""
    with torch.inference_mode():
        out = Llama(spec)(ids(spec, 1, 4))
    assert out.shape == (1, 4, spec.vocab_size) and torch.isfinite(out).all()


def test_stage_layers_is_the_cost_tables_split():
    big = load_model_spec("llama3-8b")
    for n in (1, 3, 7):
        assert [stage_layers(big, n, s) for s in range(n)] == [schema.stage_layers(32, n, s) for s in range(n)]
    with pytest.raises(ValueError, match="model 'llama3-8b'"):
        stage_layers(big, 33, 0)


def test_weight_sharing_copy_shares_tensors_not_modules(spec):
    model = build_model(spec, seed=2).eval()
    twin = weight_sharing_copy(model)
    assert not twin.training
    for (name, p), (twin_name, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert name == twin_name and p is q
    assert twin.rope_cos is model.rope_cos and twin.layers[0] is not model.layers[0]
    x = ids(spec, 2, 5)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(twin(x), before, atol=0, rtol=0)
        twin.layers[0].attn.q_proj = torch.nn.Identity()  # only the copy changes
        assert torch.equal(model(x), before) and not torch.equal(twin(x), before)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_one_engine_for_calibration_and_replay():
    """The model, LoRA, KV cache and runners exist once, in simcolo/engine; calibrate/ uses them and
    simcolo/ never imports calibrate/ (no import cycle between the two packages)."""
    assert importlib.util.find_spec("simcolo.replay.model_runner") is None
    assert not (PROJECT_ROOT / "calibrate" / "model.py").exists()
    assert not (PROJECT_ROOT / "calibrate" / "lora.py").exists()
    for path in (PROJECT_ROOT / "simcolo").rglob("*.py"):
        assert not any(n == "calibrate" or n.startswith("calibrate.") for n in _imports(path)), path
    calibrate_imports = set().union(*map(_imports, (PROJECT_ROOT / "calibrate").glob("*.py")))
    assert {"simcolo.engine.model", "simcolo.engine.lora", "simcolo.engine.runner"} <= calibrate_imports
    assert not any(n.startswith("simcolo.replay") for n in calibrate_imports)
