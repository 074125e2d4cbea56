"""Trainer test fixtures: the CPU attention paths packed rows take, for the packed == unpacked
tests of every method (services.trainer.packing); one torch thread for a module of tiny models."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from services.trainer import packing

VARLEN_REFERENCE = "tuneforge_varlen_reference"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models step fastest on one thread on this shared 2-core machine (two threads with
    other processes busy ran ~5x slower); a module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attn's semantics in plain torch, for CPU, as transformers calls it: with varlen
    lengths, causal attention within each segment of the flattened batch that `cu_seq_lens_q`
    delimits; else causal attention over each row's real tokens (the 2-D padding mask; zeros
    on padding). Packed rows whose lengths do not arrive attend across their samples, and the
    packed == unpacked tests fail. query: [batch, heads, seq, dim]; returns [batch, seq, heads, dim]."""
    batch, heads, length, dim = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    if "cu_seq_lens_q" in kwargs:
        assert attention_mask is None
        bounds = kwargs["cu_seq_lens_q"].tolist()
        assert bounds == kwargs["cu_seq_lens_k"].tolist() and bounds[0] == 0 and bounds[-1] == batch * length
        segments = list(zip(bounds[:-1], bounds[1:]))
    else:
        real = [length] * batch if attention_mask is None else attention_mask.sum(-1).tolist()
        segments = [(b * length, b * length + int(n)) for b, n in enumerate(real)]
    out = torch.zeros_like(q)
    parts = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                            is_causal=True, scale=scaling, enable_gqa=True).transpose(0, 1)
             for a, b in segments]  # each [segment, heads, dim]
    index = torch.cat([torch.arange(a, b) for a, b in segments])
    out = out.index_put((index,), torch.cat(parts))
    return out.reshape(batch, length, heads, dim), None


@pytest.fixture
def varlen_reference_attention(monkeypatch):
    """The name of an attention implementation that runs packed rows through the varlen path
    on CPU (with the varlen_reference kernel above in place of flash-attn's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_REFERENCE, varlen_reference)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_REFERENCE, flash_attention_mask)
    monkeypatch.setattr(packing, "VARLEN", packing.VARLEN | {VARLEN_REFERENCE})
    return VARLEN_REFERENCE


# The CPU paths every packed == unpacked test runs: (attention implementation, path); "prebuilt"
# is the dense mask built at collation (TUNEFORGE_PACKING_MASK=prebuilt), as before.
CPU_PATHS = [("sdpa", "dense"), ("eager", "dense"), ("sdpa", "prebuilt"), ("varlen", "varlen")]


@dataclass(frozen=True)
class AttentionCase:
    implementation: str  # what the model is switched to
    path: str  # the packing path its packed rows must take

    def use(self, model) -> None:
        """Switches `model` (PEFT-wrapped or not) to the implementation and checks the path
        packed rows will take through it."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(self.implementation)
        assert packing.attention_path(model) == ("dense" if self.path == "prebuilt" else self.path)


@pytest.fixture(params=CPU_PATHS, ids=["-".join(p) for p in CPU_PATHS])
def attention(request, monkeypatch) -> AttentionCase:
    """One CPU path (parametrized): the implementation to switch a model to and its path."""
    implementation, path = request.param
    if path == "prebuilt":
        monkeypatch.setenv("TUNEFORGE_PACKING_MASK", packing.PREBUILT)
    else:
        monkeypatch.delenv("TUNEFORGE_PACKING_MASK", raising=False)
    if implementation == "varlen":
        implementation = request.getfixturevalue("varlen_reference_attention")
    return AttentionCase(implementation, path)
