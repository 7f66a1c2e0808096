"""The LSTM encoder's document states without PackedSequence: length buckets of padded documents.

Why: `nn.LSTM` on a PackedSequence is exact, but its CPU backward grows with (longest document x tokens in the
batch): each time step's slice of the packed input gets a gradient the size of the whole input (measured, 64
documents of 60 tokens plus one longer, bidirectional, hidden 128, 2 threads: backward 0.59 / 0.85 / 1.88 s for
a longest document of 250 / 500 / 1000 tokens, against 0.06-0.18 s forward; demo batches took 2 to 22 s a step).
A padded batch has no such term, but runs every document for the longest one's length, and the reverse
direction would start in the padding.

So documents are sorted by length and cut into buckets whose shortest is at least half their longest (at most
2x padding); each bucket runs padded, one direction at a time, with `torch.lstm` on the module's own weights
(the state dict keeps `nn.LSTM`'s names). The reverse direction reads each document flipped within its length,
so padding always comes after the real tokens and never reaches a state that is read. Every layer's outputs are
flipped back and concatenated, as `nn.LSTM` feeds the next layer. Same result as the packed module (the tests
compare outputs and gradients).
"""

from __future__ import annotations

import torch
from torch import nn


def length_buckets(lengths: list[int], ratio: float = 2.0) -> list[list[int]]:
    """Document indices by decreasing length, cut where a length falls below longest-in-bucket / ratio."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if not buckets or lengths[i] * ratio < lengths[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(i)
    return buckets


def _flip_index(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) positions that reverse each row's first lengths[b] steps and leave its padding in place."""
    pos = torch.arange(steps).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(pos < n, n - 1 - pos, pos)


def _gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))


def _direction(lstm: nn.LSTM, layer: int, suffix: str, x: torch.Tensor) -> torch.Tensor:
    """One direction of one layer over a padded batch (B, T, D) -> outputs (B, T, H)."""
    names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
    if lstm.bias:
        names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
    h0 = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    # the op nn.LSTM itself calls, here for a single direction and layer
    out, _, _ = torch.lstm(x, (h0, h0), [getattr(lstm, n) for n in names], lstm.bias, 1, 0.0, lstm.training,
                           False, True)
    return out


def _bucket_states(lstm: nn.LSTM, x: torch.Tensor, flip: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Final states [forward | reverse] of the top layer for one padded bucket (B, T, D) -> (B, 2H); `flip` is
    `_flip_index` of its lengths and `last` each document's last position, both on x's device."""
    rows = torch.arange(x.shape[0], device=x.device)
    for layer in range(lstm.num_layers):
        forward = _direction(lstm, layer, "", x)
        reverse_flipped = _direction(lstm, layer, "_reverse", _gather_steps(x, flip))
        if layer + 1 == lstm.num_layers:
            # the forward direction ends at the last token; the reverse one at the first, which its flipped
            # input reaches last
            return torch.cat([forward[rows, last], reverse_flipped[rows, last]], dim=1)
        x = torch.cat([forward, _gather_steps(reverse_flipped, flip)], dim=2)  # flipping twice restores order
        if lstm.dropout and lstm.training:
            x = nn.functional.dropout(x, lstm.dropout, training=True)
    raise AssertionError("unreachable: num_layers >= 1")


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: pinned and non-blocking for a GPU, so the step never waits on the copy."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def bidirectional_states(lstm: nn.LSTM, x: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
    """For documents given as token vectors x (num_tokens, D) in document order, seq_lengths[b] tokens each (on
    the CPU), the bidirectional `lstm`'s final states [h_forward | h_reverse], (B, 2H): `h_n[-2]` and `h_n[-1]`
    of the module run on the packed documents. A document without tokens reads one zero vector. The result
    depends on x even when there are no tokens, so a caller's backward always reaches x's producers."""
    if not (lstm.bidirectional and lstm.batch_first and lstm.proj_size == 0):
        raise ValueError("bidirectional_states needs a bidirectional, batch_first LSTM without projections")
    if seq_lengths.numel() == 0:
        raise ValueError("bidirectional_states needs at least one document (run an empty one: seq_lengths [0])")
    num_tokens = x.shape[0]
    starts = torch.cumsum(seq_lengths, 0) - seq_lengths
    run_lengths = seq_lengths.clamp(min=1)
    # one zero row after the tokens: what padding and empty documents read (padding never reaches a state that
    # is read, so any row would do; zeros keep it tidy)
    rows = torch.cat([x, x.new_zeros(1, x.shape[1])])
    # every index is built on the host; a GPU gets each in one non-blocking copy
    states, order = [], []
    for bucket in length_buckets(run_lengths.tolist()):
        docs = torch.tensor(bucket)
        n, steps = run_lengths[docs], int(run_lengths[docs].max())
        pos = torch.arange(steps).unsqueeze(0)
        index = torch.where(pos < seq_lengths[docs].unsqueeze(1), starts[docs].unsqueeze(1) + pos, num_tokens)
        padded = rows[_to(index.flatten(), x.device)].view(len(bucket), steps, x.shape[1])
        states.append(_bucket_states(lstm, padded, _to(_flip_index(n, steps), x.device), _to(n - 1, x.device)))
        order += bucket
    # buckets are in length order: put the documents back in theirs (under autocast the states may be bf16)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(states)[_to(inverse, x.device)]
