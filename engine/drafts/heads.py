"""DSpark's sequential heads (DeepSpec `markov_head_type`) and confidence head.
Each head turns the previous token (and the backbone hidden state) into a [V] logit bias for the next position."""
import torch
from torch import nn

from engine.models.layers import Linear


class VanillaMarkov(nn.Module):
    """Low-rank first-order transition bias W2 · W1[x_{k-1}]; markov_w2 is an [r -> V] linear stored [V, r]."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = Linear(rank, vocab_size, bias=False)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, prev: torch.Tensor, hidden: torch.Tensor, state):
        """prev [B] token ids, hidden [B, h] -> (fp32 bias [B, V], new state)."""
        return self.project(self.markov_w1(prev)), state

    def project(self, latent: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(latent.float())  # fp32 in, fp32 out: no rounding of the bias to bf16

    def w2_transposed(self) -> torch.Tensor:
        """fp32 W2 as [rank, V] for the fused CPU sampler, made once per weight tensor (restrict_vocab swaps it)."""
        weight = self.markov_w2.weight
        key = (weight.data_ptr(), tuple(weight.shape), weight._version)
        if getattr(self, "_w2t_key", None) != key:
            self._w2t, self._w2t_key = weight.detach().float().t().contiguous(), key
        return self._w2t


class GatedMarkov(VanillaMarkov):
    """The transition embedding is gated by the backbone state: W2 · (σ(Wg[h; W1[x]]) ⊙ W1[x])."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size, rank, hidden_size)
        self.gate_proj = Linear(hidden_size + rank, rank, bias=True)

    def step(self, prev: torch.Tensor, hidden: torch.Tensor, state):
        emb = self.markov_w1(prev)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1)))
        return self.project(gate * emb), state


class RNNHead(VanillaMarkov):
    """A gated recurrent state over the whole block prefix (paper eq. 6): z = [s; W1[x]; h],
    s' = σ(g) ⊙ s + (1 - σ(g)) ⊙ tanh(c), bias = W2 · tanh(o) with [g; c; o] = joint_proj(z)."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size, rank, hidden_size)
        self.joint_proj = Linear(2 * rank + hidden_size, 3 * rank, bias=True)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.rank)

    def step(self, prev: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor):
        z = torch.cat([state, self.markov_w1(prev), hidden], dim=-1)
        gate, candidate, output = self.joint_proj(z).chunk(3, dim=-1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1 - gate) * torch.tanh(candidate)
        return self.project(torch.tanh(output)), state


SEQUENTIAL_HEADS = {"vanilla": VanillaMarkov, "gated": GatedMarkov, "rnn": RNNHead}


class ConfidenceHead(nn.Module):
    """c_k = σ((proj([h_k ; W1[x_{k-1}]]) + b_k) / T_k): the conditional probability that draft k is accepted, with
    optional per-position temperatures (and biases) from Sequential Temperature Scaling."""

    def __init__(self, in_features: int, bias: bool = True):
        super().__init__()
        self.proj = Linear(in_features, 1, bias=bias)
        self.register_buffer("temperatures", torch.ones(0), persistent=False)
        self.register_buffer("biases", torch.zeros(0), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, G, in] -> [B, G] fp32 confidences."""
        return self.calibrate(self.logits(features))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The uncalibrated logits [B, G] (fp32): what STS is fitted on."""
        return self.proj(features).squeeze(-1).float()

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        g = logits.shape[1]
        if self.biases.numel():
            logits = logits + self.biases[:g]
        if self.temperatures.numel():
            logits = logits / self.temperatures[:g]
        return torch.sigmoid(logits)
