import pytest
import torch

from tcopilot import Copilot, CopilotConfig
from tcopilot.testing import tiny_pilot


def test_layer_pattern_and_zero_head():
    cfg = CopilotConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2)
    m = Copilot(cfg)
    assert [layer.is_log_layer for layer in m.layers] == [False, True, False, True]
    assert torch.count_nonzero(m.error_out.weight) == 0 and torch.count_nonzero(m.error_out.bias) == 0
    assert isinstance(m.pilot_proj, torch.nn.Identity)


def test_from_pilot_sizes_and_error_in_init():
    pilot = tiny_pilot("llama")
    m = Copilot.from_pilot(pilot)
    assert m.config.vocab_size == pilot.config.vocab_size
    assert m.config.pilot_hidden_size == pilot.config.hidden_size
    torch.testing.assert_close(m.error_in.weight, pilot.get_input_embeddings().weight.t())
    narrow = Copilot.from_pilot(pilot, hidden_size=16)
    assert isinstance(narrow.pilot_proj, torch.nn.Linear) and narrow.pilot_proj.in_features == 32


def test_from_pilot_layers_copies_pretrained_weights():
    pilot = tiny_pilot("qwen2")
    m = Copilot.from_pilot_layers(pilot, layers=[2, 0])
    src = pilot.model.layers
    torch.testing.assert_close(m.layers[0].self_attn.q_proj.weight, src[2].self_attn.q_proj.weight)
    torch.testing.assert_close(m.layers[0].self_attn.q_proj.bias, src[2].self_attn.q_proj.bias)
    torch.testing.assert_close(m.layers[1].mlp.down_proj.weight, src[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="layers"):
        Copilot.from_pilot_layers(pilot, layers=[7])


def test_save_load_roundtrip(tmp_path):
    cfg = CopilotConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, pilot_hidden_size=24, use_rope=True
    )
    torch.manual_seed(0)
    m = Copilot(cfg)
    with torch.no_grad():
        m.error_out.weight.normal_()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m2 = Copilot.from_pretrained(tmp_path)
    assert m2.config.use_rope and m2.config.pilot_hidden_size == 24
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def test_feedback_matrices_equal_two_vocab_products():
    torch.manual_seed(0)
    m = Copilot(CopilotConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2))
    with torch.no_grad():
        m.error_out.weight.normal_()
        m.error_out.bias.normal_()
    g = torch.randn(5, 8)
    mm, mv = m.feedback_matrices()
    torch.testing.assert_close(g @ mm + mv, m.error_in(m.error_out(g)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, impl", [("autograd", "torch"), ("grow", "torch"), ("reserved", "torch"),
                                        ("static", "torch"), ("grow", "triton"), ("static", "triton")])
def test_forward_shapes_padding_rows_and_cache_equivalence(mode, impl):
    # autograd: the cache concatenates (parameters require grad); grow / reserved: no_grad decoding appends
    # in place into buffers that double from the first append's size, or that new_cache sized up front;
    # static: fixed buffers written at a device-side count, attended over whole (CUDA-graph decoding).
    # The Triton attention (interpreted without CUDA: conftest) reads the cache through strided views.
    if impl == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the model runs on CPU tensors here: the interpreter's variant")
    torch.manual_seed(0)
    cfg = CopilotConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pilot_hidden_size=12,
        attention_impl=impl,
    )
    m = Copilot(cfg).eval()
    B, L = 2, 7
    x = torch.randn(B, L, 16)
    log = torch.randn(B, 2 * L, 12)
    pos = torch.arange(L).expand(B, L).clone()
    pos[1, :2] = -1  # left padding in row 1
    pos[1, 2:] -= 2
    lpos = torch.cat([pos, pos], 1)
    full = m(x, log, pos, lpos)
    assert full.shape == (B, L, 16) and torch.isfinite(full).all()
    # Incremental decoding with the cache gives the same states as the full forward.
    cache = m.new_cache(max_positions=L if mode in ("reserved", "static") else 0, static=mode == "static")
    with torch.enable_grad() if mode == "autograd" else torch.no_grad():
        outs = [m(x[:, :3], torch.cat([log[:, :3], log[:, L : L + 3]], 1), pos[:, :3],
                  torch.cat([pos[:, :3], pos[:, :3]], 1), cache=cache)]
        buffers = [kv.k.data_ptr() for kv in cache.layers]
        for t in range(3, L):
            step_pos = pos[:, t : t + 1]
            outs.append(m(x[:, t : t + 1], torch.cat([log[:, t : t + 1], log[:, L + t : L + t + 1]], 1), step_pos,
                          torch.cat([step_pos, step_pos], 1), cache=cache))
    inc = torch.cat(outs, 1)
    real = pos >= 0
    torch.testing.assert_close(inc[real], full[real], rtol=1e-4, atol=1e-5)
    entries = [kv.n for kv in cache.layers]
    assert entries == [L, 2 * L, L, 2 * L]
    capacity = [kv.k.shape[2] for kv in cache.layers]
    if mode == "autograd":
        assert capacity == entries and inc.requires_grad
    elif mode in ("reserved", "static"):  # sized once: never regrown, every step wrote into the same buffers
        assert capacity == entries and [kv.k.data_ptr() for kv in cache.layers] == buffers
        if mode == "static":
            assert [int(kv.fill) for kv in cache.layers] == entries
    else:  # 3 -> 6 -> 12 entries (log layers 6 -> 12 -> 24): doubled, unused slots are padding
        assert capacity == [12, 24, 12, 24]
        assert all(bool((kv.pos[:, kv.n :] == -1).all()) for kv in cache.layers)


def test_reordering_a_reserved_cache_copies_its_filled_rows():
    # Beam search reorders at every step: only the filled entries are copied, unused slots stay padding.
    torch.manual_seed(0)
    m = Copilot(CopilotConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2)).eval()
    cache = m.new_cache(max_positions=6)
    x, log, pos = torch.randn(3, 2, 8), torch.randn(3, 4, 8), torch.arange(2).expand(3, 2)
    with torch.no_grad():
        m(x, log, pos, torch.cat([pos, pos], 1), cache=cache)
    before = [(kv.k.clone(), kv.v.clone(), kv.pos.clone(), kv.n) for kv in cache.layers]
    index = torch.tensor([2, 2, 0, 1])  # a different row count too
    cache.reorder(index)
    for kv, (k, v, p, n) in zip(cache.layers, before):
        assert kv.k.shape == (4, *k.shape[1:]) and kv.n == n
        assert torch.equal(kv.k[:, :, :n], k[index, :, :n]) and torch.equal(kv.v[:, :, :n], v[index, :, :n])
        assert torch.equal(kv.pos[:, :n], p[index, :n]) and bool((kv.pos[:, n:] == -1).all())


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_new_cache_rejects_bad_sizes(bad):
    m = Copilot(CopilotConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(ValueError, match="^max_positions"):
        m.new_cache(max_positions=bad)


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        CopilotConfig(vocab_size=10, hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        CopilotConfig(vocab_size=10, hidden_size=12, num_attention_heads=4, num_key_value_heads=3)
