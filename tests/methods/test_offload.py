"""The slow tier (scbench/kv/offload.py): bit-exact round trips through host memory and safetensors files, and
the TieredLayer the loading methods decode from (appends, crops, snapshots, row loads and their byte counts)."""
import pytest
import torch

from scbench.kv.offload import Tier, TieredLayer, attend_loaded, take_counters


def odd_tensors() -> dict[str, torch.Tensor]:
    """Random tensors of several dtypes with NaN, infinities, -0.0 and subnormals among them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g)
    x[0, 0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    x[1, 1, 0] = 1e-40  # subnormal in float32
    return {
        "f32": x, "bf16": x.to(torch.bfloat16), "f16": x.to(torch.float16),
        "i8": torch.randint(-128, 127, (4, 9), generator=g, dtype=torch.int8),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=g), "empty": torch.empty(0, 3),
        "view": x[:, 1:3].transpose(0, 1),  # non-contiguous
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a.contiguous().view(torch.uint8) == b.contiguous().view(torch.uint8)).all())


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_tier_round_trip_is_bit_exact(kind, tmp_path):
    tier = Tier(kind, tmp_path / "tier" if kind == "disk" else None)
    src = odd_tensors()
    stored = tier.put("layer.0", src)
    assert stored == tier.held_bytes() == sum(t.numel() * t.element_size() for t in src.values())
    if kind == "disk":
        assert (tmp_path / "tier" / "layer.0.safetensors").is_file()
    src["f32"].zero_()  # the tier owns a copy
    back = tier.get("layer.0")
    want = odd_tensors()
    assert set(back) == set(want)
    for name, t in want.items():
        assert same_bits(back[name], t), name
    assert tier.loaded_bytes == stored and tier.load_s > 0
    tier.put("layer.0", {"x": torch.ones(2)})  # replaces
    assert same_bits(tier.get("layer.0")["x"], torch.ones(2))
    tier.close()
    assert tier.held_bytes() == 0
    if kind == "disk":
        assert not (tmp_path / "tier").exists()


def test_tier_bad_input(tmp_path):
    with pytest.raises(ValueError, match="one of"):
        Tier("gpu")
    with pytest.raises(ValueError, match="root folder"):
        Tier("disk")
    tier = Tier("cpu")
    with pytest.raises(ValueError, match="name"):
        tier.put("../escape", {"x": torch.ones(1)})
    with pytest.raises(KeyError, match="nothing stored under 'missing'"):
        tier.get("missing")


def kv(n: int, heads: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g)


def test_tiered_layer_tracks_a_plain_cache():
    k, v = kv(40)
    layer = TieredLayer(k, v, storage="cpu")
    ref_k, ref_v = k.clone(), v.clone()
    for step in range(150):  # appends grow the buffers several times
        nk, nv = kv(1 if step % 7 else 3, seed=step + 1)
        out_k, _ = layer.update(nk, nv)
        ref_k, ref_v = torch.cat([ref_k, nk], -2), torch.cat([ref_v, nv], -2)
        assert torch.equal(out_k, ref_k)
    assert layer.get_seq_length() == ref_k.shape[-2]
    snap = layer.scbench_snapshot()
    assert layer.crop_floor == 40  # nothing cropped since the method state was made
    layer.crop_floor = layer.n  # as a method does after refreshing its state
    layer.scbench_crop(50)
    assert torch.equal(layer.keys, ref_k[..., :50, :]) and layer.crop_floor == 50
    layer.update(*kv(5, seed=99))
    assert torch.equal(layer.keys[..., :50, :], ref_k[..., :50, :]) and layer.get_seq_length() == 55
    layer.scbench_restore(snap)
    assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v) and layer.crop_floor == 0


def test_load_gathers_per_head_rows_and_counts_bytes():
    k, v = kv(64, heads=2)
    layer = TieredLayer(k, v, storage="cpu")
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (1, 4, 10), generator=g)  # 4 query heads over 2 KV heads
    lk, lv = layer.load(idx)
    for h in range(4):
        assert torch.equal(lk[0, h], k[0, h // 2, idx[0, h]]) and torch.equal(lv[0, h], v[0, h // 2, idx[0, h]])
    assert layer.loaded_bytes == 2 * 4 * 10 * 8 * 4
    with pytest.raises(ValueError, match="multiple"):
        layer.load(torch.zeros(1, 3, 2, dtype=torch.long))


def test_attend_loaded_equals_attention_over_the_rows_and_recall():
    k, v = kv(64, heads=2)
    layer = TieredLayer(k, v, storage="cpu")
    q = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(2))
    idx = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(h))[:20] for h in range(4)])[None]
    out = attend_loaded(layer, q, idx, 0.3, recall=True)
    for h in range(4):
        kh, vh = k[0, h // 2, idx[0, h]].double(), v[0, h // 2, idx[0, h]].double()
        ref = ((q[0, h].double() @ kh.T) * 0.3).softmax(-1) @ vh
        torch.testing.assert_close(out[0, h].double(), ref, atol=1e-5, rtol=1e-5)
    probs = [((q[0, h].double() @ k[0, h // 2].double().T) * 0.3).softmax(-1)[0] for h in range(4)]
    want = sum(float(p[idx[0, h]].sum()) for h, p in enumerate(probs)) / 4
    dense = attend_loaded(layer, q, None, 0.3, recall=True)
    torch.testing.assert_close(dense, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True))

    class Cache:
        layers = [layer]

    counters = take_counters(Cache())
    assert counters["attn_recall"] == pytest.approx((want + 1.0) / 2, abs=1e-6)
    assert counters["loaded_bytes"] == 2 * 4 * 20 * 8 * 4 + 2 * 2 * 64 * 8 * 4
    assert counters["slow_tier_bytes"] == 0  # CPU compute: host memory is the device
    assert take_counters(Cache())["loaded_bytes"] == 0 and take_counters(Cache())["attn_recall"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_host_tier_on_gpu_counts_slow_bytes():
    k, v = (t.cuda() for t in kv(64))
    layer = TieredLayer(k, v, storage="cpu")
    assert layer.keys.device.type == "cpu" and layer.scbench_nbytes() == 0
    assert layer.scbench_slow_nbytes() == 2 * 2 * 64 * 8 * 4
    lk, _ = layer.load(torch.zeros(1, 2, 3, dtype=torch.long, device="cuda"))
    assert lk.is_cuda and layer.load_s > 0


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "kivi", "bits": 2, "group": 16, "residual": 16},
                                    {"name": "quest", "budget": 32, "page_size": 8, "dense_layers": 1}])
def test_multi_request_offload_keeps_outputs_and_counts_loads(smol_tokenizer, tmp_path, method):
    """Parking the context KV in host memory or on disk between requests changes no output; every request after
    the first loads it back, and the disk tier's files live under offload_dir only while the session does."""
    from support import make_tiny_engine

    from scbench.run import build_method
    from scbench.records import Example, RunSpec, Turn
    from scbench.registry import TASKS
    from scbench.runner import Replay

    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(60))
    example = Example(id="tiny", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (3, 17, 40)))
    spec = RunSpec(model={}, method=method, task="scbench_kv", mode="multi_request", max_turns=3, max_new_tokens=6)
    runs = {}
    for kind in ("none", "cpu", "disk"):
        engine = make_tiny_engine(smol_tokenizer, layers=2)
        engine.offload = None if kind == "none" else kind
        engine.offload_dir = str(tmp_path / "offload")
        replay = Replay(engine, build_method(method), TASKS.get("scbench_kv"), example, spec)
        runs[kind] = list(replay)
        if kind == "disk":
            assert len(list((tmp_path / "offload").rglob("*.safetensors"))) == 1
            replay.session = None
            import gc

            gc.collect()
            assert not list((tmp_path / "offload").rglob("*.safetensors"))
    for kind in ("cpu", "disk"):
        assert [r.prediction for r in runs[kind]] == [r.prediction for r in runs["none"]]
        loads = [r.stats.loaded_bytes for r in runs[kind]]
        base = [r.stats.loaded_bytes for r in runs["none"]]
        assert loads[0] == base[0] and all(a > b for a, b in zip(loads[1:], base[1:]))
        assert all(r.stats.slow_tier_bytes > 0 for r in runs[kind])
