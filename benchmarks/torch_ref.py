"""The PyTorch reference: the same model, train step, greedy and beam search as s2s_jax.

Benchmark-only (s2s_jax never imports torch; tests that do skip without it). It mirrors
s2s_jax.model exactly where the benchmark needs it: separate source/target embeddings, an
L-layer nn.LSTM encoder whose final (h, c) of every layer starts an L-layer nn.LSTM decoder,
a full softmax, the loss summed NLL / number of sentences, SGD with global-norm clipping at 5.
nn.LSTM's gate order is (i, f, g, o) like ours, so `load_params` copies our parameters in
unchanged (b goes to bias_ih, bias_hh is 0) and both frameworks then compute the same function
(the benchmark checks the losses agree).

Training batches here have no padding (the benchmark uses full-length sentences). `beam`
takes 0-padded sources of any lengths (the encoder then packs them, holding each sentence's
state at its last word as ours does) and follows s2s_jax.decode.beam_search step for step:
the same candidates, ties, caps, length penalty and stop rule, batched over all B*W rows,
so that both return the same hypotheses and do the same work. The module runs on whatever
device it is moved to (`net.to("cuda")` gives cuDNN's LSTM); autocast follows the inputs'
device, and `sync` waits for a device's queued work (timing on a GPU needs it).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

BOS_ID, EOS_ID, PAD_ID = 2, 3, 0  # as s2s_jax.data.vocab (not imported: this file stays torch-only)
NEG_INF = float("-inf")


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
      dst.copy_(torch.from_numpy(np.array(src, np.float32, order="C")))  # a writable copy

    with torch.no_grad():
      put(self.src_embed.weight, params["src_embed"])
      put(self.tgt_embed.weight, params["tgt_embed"])
      for lstm, layers in ((self.encoder, params["encoder"]), (self.decoder, params["decoder"])):
        for i, p in enumerate(layers):
          put(getattr(lstm, f"weight_ih_l{i}"), np.asarray(p["w_x"]).T)
          put(getattr(lstm, f"weight_hh_l{i}"), np.asarray(p["w_h"]).T)
          put(getattr(lstm, f"bias_ih_l{i}"), p["b"])
          getattr(lstm, f"bias_hh_l{i}").zero_()
      put(self.softmax.weight, np.asarray(params["softmax"]["w"]).T)
      put(self.softmax.bias, params["softmax"]["b"])

  def encode(self, src_BxS: torch.Tensor, len_B: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's final (h, c), each LxBxH. `len_B`: source lengths of 0-padded rows (an
    empty row gets the zero state); None: no padding."""
    x_SxBxE = self.src_embed(src_BxS.T)
    if len_B is None:
      _, state = self.encoder(x_SxBxE)
      return state
    packed = nn.utils.rnn.pack_padded_sequence(x_SxBxE, len_B.clamp(min=1).cpu(),
                                               enforce_sorted=False)
    _, (h, c) = self.encoder(packed)
    empty = (len_B == 0)[None, :, None]
    return h.masked_fill(empty, 0.0), c.masked_fill(empty, 0.0)

  def step(self, state: tuple[torch.Tensor, torch.Tensor], y_prev_R: torch.Tensor
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decoder step: (log p RxV in float32, <pad> and <s> at -inf; the new state)."""
    h_1xRxH, state = self.decoder(self.tgt_embed(y_prev_R)[None], state)
    logp_RxV = torch.log_softmax(self.softmax(h_1xRxH[0]).float(), dim=-1)
    logp_RxV[:, PAD_ID] = NEG_INF  # never emitted: they are not output words
    logp_RxV[:, BOS_ID] = NEG_INF
    return logp_RxV, state

  def outputs(self, src_BxS: torch.Tensor, y_in_TxB: torch.Tensor) -> torch.Tensor:
    """What the softmax reads at every target position (teacher forcing), TxBxH."""
    h_TxBxH, _ = self.decoder(self.tgt_embed(y_in_TxB), self.encode(src_BxS))
    return h_TxBxH

  def loss(self, src_BxS: torch.Tensor, tgt_BxT: torch.Tensor) -> torch.Tensor:
    """Summed target NLL / number of sentences (the paper's loss, as s2s_jax.model.loss_fn)."""
    bos = torch.full_like(tgt_BxT[:, :1], BOS_ID)
    y_in_TxB = torch.cat([bos, tgt_BxT[:, :-1]], dim=1).T
    logits = self.softmax(self.outputs(src_BxS, y_in_TxB)).float()
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_BxT.T.reshape(-1),
                                      ignore_index=PAD_ID, reduction="sum")
    num_sents = (tgt_BxT != PAD_ID).any(dim=1).sum().clamp(min=1)
    return nll / num_sents


class AttentionSeq2Seq(Seq2Seq):
  """`Seq2Seq` with s2s_jax's Luong attention (model.attention = dot, general, concat or
  location) over the encoder's top layer and, with `input_feeding`, the attentional vector of
  step t-1 fed to decoder layer 0 beside the word (model.input_feeding). As s2s_jax.model:
  a_t = softmax over the source of score(h_t, h_s), c_t = sum_s a_t(s) h_s, and
  h~_t = tanh(W_c [c_t; h_t]) feeds the softmax. Without input feeding the decoder runs over the
  whole sequence in one nn.LSTM call and attends to all steps at once; with it, one nn.LSTM
  call a step. For the training benchmark: unpadded batches (no source mask), no search."""

  def __init__(self, num_layers: int, hidden_size: int, embed_size: int, src_vocab: int,
               tgt_vocab: int, attention: str = "general", input_feeding: bool = False,
               positions: int = 100, init_scale: float = 0.08):
    super().__init__(num_layers, hidden_size, embed_size, src_vocab, tgt_vocab, init_scale)
    if attention not in ("dot", "general", "concat", "location"):
      raise ValueError(f"the PyTorch reference has Luong's dot, general, concat and location "
                       f"attention, not {attention!r}")
    self.attention, self.input_feeding = attention, input_feeding
    h = hidden_size
    if input_feeding:
      self.decoder = nn.LSTM(embed_size + h, h, num_layers)
    shapes = {"w_c": (2 * h, h), "general": {"w_a": (h, h)}, "location": {"w_a": (h, positions)},
              "concat": {"w_q": (h, h), "w_k": (h, h), "v": (h,)}}
    self.att = nn.ParameterDict({k: nn.Parameter(torch.empty(v)) for k, v in
                                 {"w_c": shapes["w_c"], **shapes.get(attention, {})}.items()})
    with torch.no_grad():
      for p in self.parameters():
        p.uniform_(-init_scale, init_scale)

  def load_params(self, params: Mapping) -> None:
    """Copies an s2s_jax params pytree with an "attention" entry into this module."""
    super().load_params(params)
    with torch.no_grad():
      for k, p in self.att.items():
        p.copy_(torch.from_numpy(np.array(params["attention"][k], np.float32, order="C")))

  def attend(self, q_BxTxH: torch.Tensor, values_BxSxH: torch.Tensor,
             keys_BxSxK: torch.Tensor) -> torch.Tensor:
    """h~ for the queries q (the decoder's top h at T steps), BxTxH."""
    if self.attention in ("dot", "general"):
      s_BxTxS = torch.bmm(q_BxTxH, keys_BxSxK.transpose(1, 2))
    elif self.attention == "concat":
      q_BxTxK = q_BxTxH @ self.att["w_q"]
      s_BxTxS = torch.tanh(q_BxTxK[:, :, None] + keys_BxSxK[:, None]) @ self.att["v"]
    else:
      s_BxTxS = (q_BxTxH @ self.att["w_a"])[:, :, :values_BxSxH.shape[1]]
    c_BxTxH = torch.bmm(torch.softmax(s_BxTxS, dim=-1), values_BxSxH)
    return torch.tanh(torch.cat([c_BxTxH, q_BxTxH], dim=-1) @ self.att["w_c"])

  def outputs(self, src_BxS: torch.Tensor, y_in_TxB: torch.Tensor) -> torch.Tensor:
    """The attentional vectors h~ at every target position (teacher forcing), TxBxH."""
    top_SxBxH, state = self.encoder(self.src_embed(src_BxS.T))
    values_BxSxH = top_SxBxH.transpose(0, 1)
    keys_BxSxK = values_BxSxH
    if self.attention in ("general", "concat"):
      keys_BxSxK = values_BxSxH @ self.att["w_a" if self.attention == "general" else "w_k"]
    x_TxBxE = self.tgt_embed(y_in_TxB)
    if not self.input_feeding:
      h_TxBxH, _ = self.decoder(x_TxBxE, state)
      return self.attend(h_TxBxH.transpose(0, 1), values_BxSxH, keys_BxSxK).transpose(0, 1)
    feed_BxH = x_TxBxE.new_zeros(x_TxBxE.shape[1], top_SxBxH.shape[-1])
    outs = []
    for x_BxE in x_TxBxE:
      h_1xBxH, state = self.decoder(torch.cat([x_BxE, feed_BxH], dim=-1)[None], state)
      feed_BxH = self.attend(h_1xBxH.transpose(0, 1), values_BxSxH, keys_BxSxK)[:, 0]
      outs.append(feed_BxH)
    return torch.stack(outs)


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
  """Arg-max decoding as s2s_jax.decode.greedy of full-length sources with the default caps
  (stop at </s> or at max_len). Returns (ids BxT, summed log p B)."""
  dev = src_BxS.device
  with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
    b = src_BxS.shape[0]
    state = net.encode(src_BxS)
    y = torch.full((b,), BOS_ID, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    score = torch.zeros(b, device=dev)
    out = torch.full((b, max_len), PAD_ID, dtype=torch.long, device=dev)
    for t in range(max_len):
      logp, state = net.step(state, y)
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


class Hypotheses(NamedTuple):
  """As s2s_jax.decode.Hypotheses: n-best lists, best first; unused slots -inf and <pad>."""
  tokens_BxNxT: torch.Tensor
  scores_BxN: torch.Tensor  # log p, or log p / lp(|y|) with a length penalty
  log_probs_BxN: torch.Tensor
  steps: int  # decoder steps run (the longest search in the batch)


def default_caps(len_B: torch.Tensor, max_len: int) -> torch.Tensor:
  """max_len for every sentence, 1 (only </s>) for an empty row (s2s_jax.decode's default)."""
  return torch.full_like(len_B, max_len).masked_fill(len_B == 0, 1)


def length_penalty_factor(length: torch.Tensor, alpha: float) -> torch.Tensor:
  """GNMT's lp(|y|) = ((5 + |y|) / 6)^alpha, float32."""
  return ((5.0 + length.float()) / 6.0) ** alpha


def _top(x_BxK: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
  """The k largest along axis 1, best first, the lower index first among equals (lax.top_k's
  order; torch.topk leaves ties unordered). For the short merges of a step."""
  vals, idx = torch.sort(x_BxK, dim=1, descending=True, stable=True)
  return vals[:, :k], idx[:, :k]


def _take(x_BxKxT: torch.Tensor, idx_BxM: torch.Tensor) -> torch.Tensor:
  """Rows idx of every sentence: x[b, idx[b, m]], BxMxT."""
  return x_BxKxT.gather(1, idx_BxM[:, :, None].expand(-1, -1, x_BxKxT.shape[2]))


@torch.inference_mode()
def beam(net: Seq2Seq, src_BxS: torch.Tensor, cap_B: torch.Tensor | None = None, *,
         beam_size: int, nbest: int = 1, max_len: int, length_penalty: float = 0.0,
         bf16: bool = False) -> Hypotheses:
  """s2s_jax.decode.beam (semantics in s2s_jax.decode's docstring) for 0-padded sources;
  `cap_B`: each sentence's cap on the output length (s2s_jax.decode.output_caps; None: max_len).

  One batched step per time step for all B*W rows: of each sentence's W*V extensions the top
  2W; the kept ones (first W) ending in </s> join the n-best set, the W best others refill the
  beam. Runs until every sentence has stopped (its best live score, divided by lp(cap) with a
  length penalty, no better than its N-th complete one) or max_len steps.
  """
  if not 1 <= nbest <= beam_size:
    raise ValueError(f"nbest must be between 1 and the beam size {beam_size}, got {nbest}")
  dev = src_BxS.device
  b, w, n, t_max = src_BxS.shape[0], beam_size, nbest, max_len
  len_B = (src_BxS != PAD_ID).sum(dim=1)
  cap_B = default_caps(len_B, max_len) if cap_B is None else cap_B.to(dev).long()
  bound_B = length_penalty_factor(cap_B, length_penalty) if length_penalty else None
  padded = bool((len_B < src_BxS.shape[1]).any())
  with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
    h, c = net.encode(src_BxS, len_B if padded else None)
    state = (h.repeat_interleave(w, dim=1), c.repeat_interleave(w, dim=1))
    y_prev_R = torch.full((b * w,), BOS_ID, dtype=torch.long, device=dev)
    live_lp_BxW = torch.full((b, w), NEG_INF, device=dev)
    live_lp_BxW[:, 0] = 0.0
    live_tok_BxWxT = torch.full((b, w, t_max), PAD_ID, dtype=torch.long, device=dev)
    fin_tok_BxNxT = torch.full((b, n, t_max), PAD_ID, dtype=torch.long, device=dev)
    fin_score_BxN = torch.full((b, n), NEG_INF, device=dev)
    fin_lp_BxN = torch.full((b, n), NEG_INF, device=dev)
    done_B = torch.zeros(b, dtype=torch.bool, device=dev)
    not_eos_V = torch.arange(net.softmax.out_features, device=dev) != EOS_ID
    kept_2W = torch.arange(2 * w, device=dev) < w
    row0_Bx1 = torch.arange(b, device=dev)[:, None] * w
    t = 0
    while t < t_max and not bool(done_B.all()):
      logp_RxV, state = net.step(state, y_prev_R)
      v = logp_RxV.shape[-1]
      cand_BxWxV = live_lp_BxW[:, :, None] + logp_RxV.view(b, w, v)
      at_cap_Bx1x1 = (t + 1 >= cap_B)[:, None, None]
      cand_BxWxV = cand_BxWxV.masked_fill(at_cap_Bx1x1 & not_eos_V, NEG_INF)
      top_lp_Bx2W, top_idx_Bx2W = torch.topk(cand_BxWxV.view(b, w * v), 2 * w, dim=1)
      parent_Bx2W, tok_Bx2W = top_idx_Bx2W // v, top_idx_Bx2W % v
      seq_Bx2WxT = _take(live_tok_BxWxT, parent_Bx2W)
      seq_Bx2WxT[:, :, t] = tok_Bx2W
      is_eos_Bx2W = tok_Bx2W == EOS_ID

      # Kept extensions ending in </s> join the complete set (earlier entries win ties).
      new_lp_Bx2W = top_lp_Bx2W.masked_fill(~(is_eos_Bx2W & kept_2W), NEG_INF)
      new_score_Bx2W = new_lp_Bx2W
      if length_penalty:
        new_score_Bx2W = new_lp_Bx2W / length_penalty_factor(torch.tensor(t + 1), length_penalty)
      fin_score_BxN, pick_BxN = _top(torch.cat([fin_score_BxN, new_score_Bx2W], dim=1), n)
      fin_lp_BxN = torch.cat([fin_lp_BxN, new_lp_Bx2W], dim=1).gather(1, pick_BxN)
      fin_tok_BxNxT = _take(torch.cat([fin_tok_BxNxT, seq_Bx2WxT], dim=1), pick_BxN)

      # The beam: the W best extensions not ending in </s>, in rank order.
      live_lp_BxW, sel_BxW = _top(top_lp_Bx2W.masked_fill(is_eos_Bx2W, NEG_INF), w)
      live_tok_BxWxT = _take(seq_Bx2WxT, sel_BxW)
      y_prev_R = tok_Bx2W.gather(1, sel_BxW).view(-1)
      rows_R = (row0_Bx1 + parent_Bx2W.gather(1, sel_BxW)).view(-1)
      state = (state[0].index_select(1, rows_R), state[1].index_select(1, rows_R))

      best_live_B = live_lp_BxW[:, 0]
      if length_penalty:
        best_live_B = best_live_B / bound_B
      done_B |= (best_live_B == NEG_INF) | (best_live_B <= fin_score_BxN[:, n - 1])
      t += 1
  return Hypotheses(fin_tok_BxNxT, fin_score_BxN, fin_lp_BxN, t)
