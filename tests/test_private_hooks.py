"""The private hooks of other libraries that tunelab still relies on, each named, so that a
release that removes or changes one fails here, loudly, rather than somewhere in training.

- accelerate: `AcceleratorState._reset_state()` (device.make_accelerator). accelerate 1.15 has
  no public way to let a second Accelerator in the same process take another precision.
- transformers: `config._attn_implementation` (device.use_packed_attention, device.runs_packed),
  read to keep FlashAttention or SDPA and to tell which models cannot switch.
- torch: `torch.ops.mkldnn._is_mkldnn_bf16_supported` (device.native_bf16), the only probe of
  native bf16 matmuls on a CPU.
"""

from __future__ import annotations

import torch

from tunelab import device


def test_accelerate_reset_state_lets_a_second_accelerator_change_precision():
    from accelerate.state import AcceleratorState

    assert callable(getattr(AcceleratorState, "_reset_state", None)), \
        "accelerate removed AcceleratorState._reset_state, used by tunelab.device.make_accelerator"
    first = device.make_accelerator(1, "bf16")
    assert first.mixed_precision == "bf16"
    second = device.make_accelerator(1, "fp32")  # without the reset accelerate refuses or keeps bf16
    assert second.mixed_precision == "no"


def test_accelerate_public_sync_gradients_setter():
    accelerator = device.make_accelerator(2, "fp32")
    accelerator.sync_gradients = False
    assert accelerator.gradient_state.sync_gradients is False
    accelerator.sync_gradients = True
    assert accelerator.sync_gradients is True


def test_transformers_attention_hooks(tiny_model_dir):
    from tunelab.models import load_model

    model = load_model(tiny_model_dir)
    assert hasattr(model.config, "_attn_implementation"), \
        "transformers removed config._attn_implementation, read by device.use_packed_attention and device.runs_packed"
    assert model.config._attn_implementation == "sdpa"
    assert device.use_packed_attention(model)
    assert model.config._attn_implementation == device.PACKED_ATTENTION  # it follows set_attn_implementation


def test_torch_mkldnn_bf16_probe():
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    assert probe is not None, "torch removed torch.ops.mkldnn._is_mkldnn_bf16_supported, used by device.native_bf16"
    assert probe() in (True, False)
    assert device.native_bf16() in (True, False)
