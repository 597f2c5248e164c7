"""The PyTorch reference: the same model, train step and greedy decoding as s2s_jax, in torch.

Benchmark-only (tests never import torch). It mirrors s2s_jax.model exactly where the
benchmark needs it: separate source/target embeddings, an L-layer nn.LSTM encoder whose final
(h, c) of every layer starts an L-layer nn.LSTM decoder, a full softmax, the loss summed NLL /
number of sentences, SGD with global-norm clipping at 5. nn.LSTM's gate order is (i, f, g, o)
like ours, so `load_params` copies our parameters in unchanged (b goes to bias_ih, bias_hh is 0)
and both frameworks then compute the same function (the benchmark checks the losses agree).

Batches here have no padding (the benchmark uses full-length sentences); padded sources
would need pack_padded_sequence, which this reference does not do. The module runs on whatever
device it is moved to (`net.to("cuda")` gives cuDNN's LSTM); autocast follows the inputs'
device, and `sync` waits for a device's queued work (timing on a GPU needs it).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

BOS_ID, EOS_ID, PAD_ID = 2, 3, 0  # as s2s_jax.data.vocab (not imported: this file stays torch-only)


class Seq2Seq(nn.Module):
  """Embeddings, L-layer LSTM encoder and decoder, full softmax."""

  def __init__(self, num_layers: int, hidden_size: int, embed_size: int, src_vocab: int,
               tgt_vocab: int, init_scale: float = 0.08):
    super().__init__()
    self.src_embed = nn.Embedding(src_vocab, embed_size)
    self.tgt_embed = nn.Embedding(tgt_vocab, embed_size)
    self.encoder = nn.LSTM(embed_size, hidden_size, num_layers)
    self.decoder = nn.LSTM(embed_size, hidden_size, num_layers)
    self.softmax = nn.Linear(hidden_size, tgt_vocab)
    with torch.no_grad():
      for p in self.parameters():
        p.uniform_(-init_scale, init_scale)

  def load_params(self, params: Mapping) -> None:
    """Copies an s2s_jax params pytree (numpy arrays) into this module."""
    def put(dst: torch.Tensor, src) -> None:
      dst.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(src, np.float32))))

    with torch.no_grad():
      put(self.src_embed.weight, params["src_embed"])
      put(self.tgt_embed.weight, params["tgt_embed"])
      for lstm, layers in ((self.encoder, params["encoder"]), (self.decoder, params["decoder"])):
        for l, p in enumerate(layers):
          put(getattr(lstm, f"weight_ih_l{l}"), np.asarray(p["w_x"]).T)
          put(getattr(lstm, f"weight_hh_l{l}"), np.asarray(p["w_h"]).T)
          put(getattr(lstm, f"bias_ih_l{l}"), p["b"])
          getattr(lstm, f"bias_hh_l{l}").zero_()
      put(self.softmax.weight, np.asarray(params["softmax"]["w"]).T)
      put(self.softmax.bias, params["softmax"]["b"])

  def encode(self, src_BxS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, state = self.encoder(self.src_embed(src_BxS.T))
    return state

  def loss(self, src_BxS: torch.Tensor, tgt_BxT: torch.Tensor) -> torch.Tensor:
    """Summed target NLL / number of sentences (the paper's loss, as s2s_jax.model.loss_fn)."""
    state = self.encode(src_BxS)
    bos = torch.full_like(tgt_BxT[:, :1], BOS_ID)
    y_in_TxB = torch.cat([bos, tgt_BxT[:, :-1]], dim=1).T
    h_TxBxH, _ = self.decoder(self.tgt_embed(y_in_TxB), state)
    logits = self.softmax(h_TxBxH).float()
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_BxT.T.reshape(-1),
                                      ignore_index=PAD_ID, reduction="sum")
    num_sents = (tgt_BxT != PAD_ID).any(dim=1).sum().clamp(min=1)
    return nll / num_sents


def sync(device: torch.device) -> None:
  """Returns once `device` has finished all queued work (a no-op on the CPU)."""
  if device.type == "cuda":
    torch.cuda.synchronize(device)


class Trainer:
  """One SGD step with global-norm clipping; bf16=True runs forward/backward under autocast
  (on the device the inputs are on)."""

  def __init__(self, net: Seq2Seq, learning_rate: float = 0.7, clip_norm: float = 5.0,
               bf16: bool = False):
    self.net, self.clip_norm, self.bf16 = net, clip_norm, bf16
    self.opt = torch.optim.SGD(net.parameters(), lr=learning_rate)

  def step(self, src_BxS: torch.Tensor, tgt_BxT: torch.Tensor) -> float:
    with torch.autocast(src_BxS.device.type, dtype=torch.bfloat16, enabled=self.bf16):
      loss = self.net.loss(src_BxS, tgt_BxT)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip_norm)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)  # gradients are freed: they belong to the step's peak
    return loss.detach()


@torch.inference_mode()
def greedy(net: Seq2Seq, src_BxS: torch.Tensor, max_len: int,
           bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
  """Arg-max decoding as s2s_jax.decode.greedy (stop at </s> or at max_len).

  Returns (ids BxT, summed log p B).
  """
  dev = src_BxS.device
  with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
    b = src_BxS.shape[0]
    state = net.encode(src_BxS)
    y = torch.full((b,), BOS_ID, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    score = torch.zeros(b, device=dev)
    out = torch.full((b, max_len), PAD_ID, dtype=torch.long, device=dev)
    for t in range(max_len):
      h_1xBxH, state = net.decoder(net.tgt_embed(y)[None], state)
      logp = torch.log_softmax(net.softmax(h_1xBxH[0]).float(), dim=-1)
      y = logp.argmax(dim=-1)
      if t + 1 >= max_len:
        y = torch.full_like(y, EOS_ID)
      lp = logp.gather(1, y[:, None])[:, 0]
      score += torch.where(done, torch.zeros_like(lp), lp)
      y = torch.where(done, torch.full_like(y, PAD_ID), y)
      out[:, t] = y
      done |= y == EOS_ID
      if bool(done.all()):
        break
  return out, score
