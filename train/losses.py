"""DSpark's training loss (DeepSpec `dspark/loss.py`, paper §3.3), as weighted sums so that a batch spread over
micro-steps and ranks is normalised once by its global weight sum:

    loss = α_ce·CE + α_l1·‖p_d − p_t‖₁ + α_conf·BCE(σ⁻¹ c_k, c*),   c* = clamp(1 − ½‖p_d − p_t‖₁, 0, 1) detached,

every term weighted by w_k = exp(−k/γ_decay) on valid (supervised, contiguous-prefix) positions."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossSums:
    """Σ w·term for each term, Σ w, and the unweighted acceptance statistics of the block positions."""
    ce: torch.Tensor
    l1: torch.Tensor
    conf: torch.Tensor
    weight: torch.Tensor
    accept_sum: torch.Tensor   # [G] Σ over valid blocks of (1 − ½‖p_d − p_t‖₁) at position k
    accept_count: torch.Tensor  # [G]


def position_weights(valid: torch.Tensor, decay_gamma: float) -> torch.Tensor:
    k = torch.arange(valid.shape[-1], dtype=torch.float32, device=valid.device)
    return torch.exp(-k / decay_gamma) * valid.float()


def loss_sums(draft_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
              conf_logits: torch.Tensor | None, decay_gamma: float,
              outside_mass: torch.Tensor | None = None) -> LossSums:
    """draft logits and target probabilities [A, G, K] over the draft's vocabulary (K = V: every token), labels
    [A, G] as columns of it (-1: a token outside, which gets no CE term), valid [A, G], conf_logits [A, G] or None.
    outside_mass [A, G]: the target's probability outside the vocabulary, which counts in full in the L1 term (the
    draft can never propose it)."""
    w = position_weights(valid, decay_gamma)
    log_probs = draft_logits.log_softmax(-1)
    inside = labels >= 0
    ce = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * inside
    l1 = (log_probs.exp() - target_probs).abs().sum(-1)
    if outside_mass is not None:
        l1 = l1 + outside_mass
    accept = (1 - 0.5 * l1).clamp(0, 1)
    if conf_logits is None:
        conf = torch.zeros_like(w)
    else:
        conf = F.binary_cross_entropy_with_logits(conf_logits, accept.detach(), reduction="none")
    v = valid.float()
    return LossSums(ce=(w * ce).sum(), l1=(w * l1).sum(), conf=(w * conf).sum(), weight=w.sum(),
                    accept_sum=(accept.detach() * v).sum(0), accept_count=v.sum(0))


def combine(s: LossSums, total_weight: float, ce_alpha: float, l1_alpha: float, conf_alpha: float) -> torch.Tensor:
    """This micro-batch's share of the batch loss, normalised by the batch's total weight (all ranks)."""
    terms = ce_alpha * s.ce + l1_alpha * s.l1 + conf_alpha * s.conf
    return terms / max(total_weight, 1e-8)


def expected_acceptance_length(accept_rate: torch.Tensor) -> float:
    """τ estimate from per-position acceptance rates (1 − TV): 1 + Σ_k Π_{i<=k} a_i."""
    return float(1 + accept_rate.cumprod(0).sum())
