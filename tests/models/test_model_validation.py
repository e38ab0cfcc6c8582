"""Construction and input checks of CopilotConfig and TransformerCopilot: bad values are ValueErrors naming the
argument (DESIGN.md section 5), not a ZeroDivisionError, a crash inside torch, or a model that silently misbehaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcopilot import Copilot, CopilotConfig, MistakeLog, TransformerCopilot
from tcopilot.testing import left_padded_prompts, tiny_pair

_SMALL = dict(vocab_size=10, hidden_size=8, num_attention_heads=2)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_attention_heads", 0),  # was a ZeroDivisionError
        ("num_attention_heads", -2),
        ("num_attention_heads", 2.0),
        ("hidden_size", 0),
        ("hidden_size", 8.0),  # was a TypeError inside nn.Linear
        ("vocab_size", 0),
        ("vocab_size", True),
        ("num_hidden_layers", -1),
        ("num_hidden_layers", 0),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", -1),
        ("intermediate_size", 0),
        ("intermediate_size", -8),
        ("pilot_hidden_size", 0),
        ("rms_norm_eps", float("nan")),
        ("rms_norm_eps", 0.0),
        ("rms_norm_eps", "1e-6"),
        ("rope_theta", float("inf")),
        ("rope_theta", -1.0),
        ("initializer_range", -0.1),
        ("initializer_range", float("nan")),
        ("attention_impl", "bogus"),
        ("use_rope", "yes"),
        ("attention_bias", 1),
    ],
)
def test_config_rejects_bad_fields_naming_them(field, value):
    kw = {**_SMALL, field: value}
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        CopilotConfig(**kw)


def test_config_rejects_an_odd_head_dim_with_rope():
    # head_dim 3: the rotary embedding returned 4 columns, a silently wrong attention
    with pytest.raises(ValueError, match="use_rope: .*even head dimension"):
        CopilotConfig(vocab_size=10, hidden_size=6, num_attention_heads=2, use_rope=True)
    CopilotConfig(vocab_size=10, hidden_size=6, num_attention_heads=2)  # no rope: fine


def test_config_takes_numpy_scalars_as_python_numbers(tmp_path):
    cfg = CopilotConfig(vocab_size=np.int64(10), hidden_size=np.int32(8), num_attention_heads=np.int64(2),
                        num_hidden_layers=np.int16(2), num_key_value_heads=np.int64(1), use_rope=np.True_,
                        rms_norm_eps=np.float32(1e-5))
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads"):
        assert type(getattr(cfg, name)) is int, name
    assert type(cfg.use_rope) is bool and type(cfg.rms_norm_eps) is float
    cfg.save_pretrained(tmp_path)  # JSON: numpy scalars would not serialise
    again = CopilotConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def test_config_defaults_and_round_trip_still_work(tmp_path):
    default = CopilotConfig()  # transformers builds configs without arguments
    assert default.num_key_value_heads == default.num_attention_heads and default.intermediate_size > 0
    assert default.to_diff_dict()["model_type"] == "tcopilot"
    cfg = CopilotConfig(vocab_size=40, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                        pilot_hidden_size=24, use_rope=True, attention_impl="torch")
    model = Copilot(cfg)
    model.save_pretrained(tmp_path)
    loaded = Copilot.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(cfg.to_dict())


# ---------------------------------------------------------------------------------------------- TransformerCopilot
def test_transformer_copilot_checks_impl_at_construction_and_assignment():
    model = tiny_pair("llama")
    with pytest.raises(ValueError, match="^impl: expected one of"):
        TransformerCopilot(model.pilot, model.copilot, impl="bogus")
    with pytest.raises(ValueError, match="^impl: expected one of"):
        model.impl = "bogus"
    model.impl = "torch"  # benchmarks and tests switch it afterwards
    assert model.impl == "torch"


def test_transformer_copilot_checks_log_mode_and_mistake_log():
    model = tiny_pair("llama")
    with pytest.raises(ValueError, match="^log_mode: expected one of"):
        TransformerCopilot(model.pilot, model.copilot, log_mode="offline")
    with pytest.raises(ValueError, match="^mistake_log: expected a tcopilot.MistakeLog or None, got int"):
        TransformerCopilot(model.pilot, model.copilot, mistake_log=123)  # was an AttributeError at forward
    with pytest.raises(ValueError, match="^mistake_log: expected"):
        model.mistake_log = {"topk": 4}
    replay = TransformerCopilot(model.pilot, model.copilot, log_mode="replay")
    assert isinstance(replay.mistake_log, MistakeLog)
    model.mistake_log, model.log_mode = MistakeLog(topk=4), "online"  # as the Trainer and benchmarks do
    model.mistake_log = None
    assert model.mistake_log is None


def test_forward_checks_input_shapes_dtypes_and_devices():
    model = tiny_pair("llama")
    ids, mask = left_padded_prompts(3, 6, model.pilot.config.vocab_size, 0, low=2)
    with pytest.raises(ValueError, match=r"^attention_mask: expected shape \(3, 6\) \(like input_ids\), got \(3, 5\)"):
        model(ids, mask[:, 1:])  # was a RuntimeError inside positions_from_mask
    with pytest.raises(ValueError, match="^input_ids: expected token ids of dtype int64 or int32, got float32"):
        model(ids.float(), mask)  # was a RuntimeError inside torch.embedding
    with pytest.raises(ValueError, match="^input_ids: expected token ids of dtype int64 or int32, got bool"):
        model(ids > 0, mask)
    with pytest.raises(ValueError, match="^input_ids: expected a torch.Tensor"):
        model(ids.tolist(), mask)
    with pytest.raises(ValueError, match="^labels: expected token ids of dtype int64 or int32, got float32"):
        model(ids, mask, labels=ids.float())
    with pytest.raises(ValueError, match="^attention_mask: expected a torch.Tensor"):
        model(ids, mask.tolist())
    with pytest.raises(ValueError, match="^attention_mask: expected a tensor on cpu"):
        model(ids, torch.ones(3, 6, device="meta"))
    out = model(ids.int(), mask.int())  # int32 ids (what the Mistake Log stores) are token ids too
    ref = model(ids, mask)
    torch.testing.assert_close(out.loss, ref.loss)
    labels = ids.masked_fill(mask == 0, -100)
    torch.testing.assert_close(model(ids, mask, labels=labels.int()).loss, ref.loss)


def test_forward_checks_the_id_range_of_cpu_inputs():
    model = tiny_pair("llama")
    vocab = model.pilot.config.vocab_size
    ids, mask = left_padded_prompts(3, 6, vocab, 0, low=2)
    with pytest.raises(ValueError, match=rf"^input_ids: expected token ids in \[0, {vocab}\).*got {vocab}"):
        model(ids.masked_fill(ids == ids[0, 0], vocab), mask)  # was an IndexError inside torch.embedding
    with pytest.raises(ValueError, match=r"^input_ids: expected token ids in .*got -1"):
        model(ids.masked_fill(ids == ids[0, 0], -1), mask)


def test_forward_checks_the_label_range_before_running_the_pilot():
    """The labels that count (all but each row's first: the shift drops it) are checked with the ids, before the
    Pilot runs, with the message of the fused ops; ``ignore_index`` is checked as they check it."""
    model = tiny_pair("llama")
    vocab = model.pilot.get_output_embeddings().weight.shape[0]
    ids, mask = left_padded_prompts(3, 6, vocab, 0, low=2)
    labels = ids.masked_fill(mask == 0, -100)
    runs = []
    model.pilot.get_input_embeddings().register_forward_hook(lambda *_: runs.append(1))
    for bad, got in ((vocab, vocab), (-5, -5), (10**12, 10**12)):
        with pytest.raises(ValueError, match=rf"^labels: expected values in \[0, {vocab}\) or ignore_index=-100, "
                                             rf"got {got}$"):
            model(ids, mask, labels=labels.masked_fill(labels == labels[0, 3], bad))
    assert runs == []
    first_col = labels.clone()
    first_col[:, 0] = vocab + 5  # predicted by no position
    torch.testing.assert_close(model(ids, mask, labels=first_col).loss, model(ids, mask, labels=labels).loss)
    other = labels.masked_fill(mask == 0, -1)
    torch.testing.assert_close(model(ids, mask, labels=other, ignore_index=-1).loss,
                               model(ids, mask, labels=labels).loss)
    for bad_index in (1.5, None, np.float64(-100)):
        with pytest.raises(ValueError, match="^ignore_index: expected an int"):
            model(ids, mask, ignore_index=bad_index)
