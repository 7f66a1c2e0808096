"""`lstm_encoder.bidirectional_states` against the oracle it replaces: `nn.LSTM` on a PackedSequence.

Same final states and the same gradients for the token vectors and every LSTM weight, for one and two layers,
documents of very different lengths (several length buckets), empty documents and a single document.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from trainer.lstm_encoder import bidirectional_states, length_buckets

TOL = dict(rtol=1e-5, atol=1e-6)


def _packed_states(lstm: nn.LSTM, x: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """The oracle: pad (an empty document is one zero token), pack, run, take h_n of the top layer."""
    lengths = seq_lengths.clamp(min=1)
    padded = x.new_zeros(len(lengths), int(lengths.max()), x.shape[1])
    pos = 0
    for b, n in enumerate(seq_lengths.tolist()):
        padded[b, :n] = x[pos : pos + n]
        pos += n
    _, (h_n, _) = lstm(pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False))
    return torch.cat([h_n[-2], h_n[-1]], dim=1)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("lengths", [[5, 0, 17, 1, 40, 3, 9, 9, 2], [7], [0, 0, 3], [1, 1, 1, 1]])
def test_states_and_gradients_equal_the_packed_lstm(layers, lengths) -> None:
    torch.manual_seed(len(lengths) * 10 + layers)
    lstm = nn.LSTM(6, 5, num_layers=layers, bidirectional=True, batch_first=True)
    seq_lengths = torch.tensor(lengths)
    x0 = torch.randn(int(seq_lengths.sum()), 6)
    head = torch.randn(len(lengths), 10)  # a loss that weighs every state differently

    results = []
    for fn in (bidirectional_states, _packed_states):
        lstm.zero_grad()
        x = x0.clone().requires_grad_(True)
        out = fn(lstm, x, seq_lengths)
        (out * head).sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in lstm.named_parameters()}))
    (ours, ours_x, ours_w), (ref, ref_x, ref_w) = results
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(ours_x, ref_x, **TOL)
    for name in ref_w:
        torch.testing.assert_close(ours_w[name], ref_w[name], **TOL, msg=name)


def test_no_documents_still_depends_on_the_tokens() -> None:
    """The trainer's rank without documents runs one empty document: the graph must reach x and the weights."""
    lstm = nn.LSTM(4, 3, bidirectional=True, batch_first=True)
    x = torch.zeros(0, 4, requires_grad=True)
    out = bidirectional_states(lstm, x, torch.zeros(1, dtype=torch.long))
    out[:0].sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 4)
    assert all(p.grad is not None for p in lstm.parameters())


def test_length_buckets_keep_padding_under_half() -> None:
    lengths = [100, 3, 51, 49, 1, 0, 26, 25, 100]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        assert min(lengths[i] for i in b) * 2 >= max(lengths[i] for i in b)
    assert [[lengths[i] for i in b] for b in buckets] == [[100, 100, 51], [49, 26, 25], [3], [1], [0]]


def test_refuses_a_unidirectional_lstm() -> None:
    with pytest.raises(ValueError, match="bidirectional"):
        bidirectional_states(nn.LSTM(4, 3, batch_first=True), torch.zeros(2, 4), torch.tensor([2]))


def test_recurrence_stays_float32_under_bf16_autocast(monkeypatch) -> None:
    """train.bf16 autocasts the dense part; the LSTM's recurrence must not follow (on CUDA autocast would run it
    through cuDNN in float16 with no loss scaling). CPU autocast lowers torch.lstm to bf16 too, so this shows it."""
    from trainer import model as model_module
    from trainer.config import ModelConfig

    seen = []

    def spy(lstm, x, seq_lengths):
        states = bidirectional_states(lstm, x, seq_lengths)
        seen.append((x.dtype, states.dtype))
        return states

    monkeypatch.setattr(model_module, "bidirectional_states", spy)
    dense = model_module.DenseNet(ModelConfig(encoder="lstm"), dim=6, num_classes=3)
    x = torch.randn(12, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = dense(x, torch.tensor([5, 7]))
    assert seen == [(torch.float32, torch.float32)]
    assert logits.shape == (2, 3)


def test_bf16_setting() -> None:
    from trainer.trainer import use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not any(use_bf16(s, cpu) for s in ("auto", "on", "off"))
    assert use_bf16("on", cuda) and not use_bf16("off", cuda)
