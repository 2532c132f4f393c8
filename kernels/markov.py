"""The sequential vanilla-Markov draft sampler, temperature only: the plain-torch twin of kernels.triton_markov
(and the same computation as DSparkDraft.sample_sequentially with a VanillaMarkov head)."""
import torch
import torch.nn.functional as F

from kernels.sampling import GREEDY_EPS, sample_inverse_cdf


def markov_sample(base_logits: torch.Tensor, anchors: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  temperature: torch.Tensor, uniforms: torch.Tensor,
                  vocab_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For k < G: logits = base_logits[:, k] + W2 · W1[prev] (fp32), q = softmax(logits / T) (one-hot at the argmax
    where T < GREEDY_EPS), token = inverse-CDF sample of q with uniforms[:, k], prev = token (first prev: anchors).
    base_logits [B, G, V'] fp32, w1 [V, r], w2 [V', r], temperature [B], uniforms [B, G] -> (tokens [B, G],
    probs [B, G, V']). With a draft vocabulary vocab_ids [V'] (token ids), column j stands for token vocab_ids[j];
    without one V' = V."""
    greedy = (temperature < GREEDY_EPS)[:, None]
    scale = torch.where(greedy, 1.0, temperature.float()[:, None])
    prev, tokens, probs = anchors, [], []
    for k in range(base_logits.shape[1]):
        logits = base_logits[:, k] + F.linear(w1[prev].float(), w2.float())
        one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        q = torch.where(greedy, one_hot, torch.softmax(logits / scale, -1))
        prev = sample_inverse_cdf(q, uniforms[:, k])
        prev = prev if vocab_ids is None else vocab_ids[prev]
        tokens.append(prev)
        probs.append(q)
    return torch.stack(tokens, 1), torch.stack(probs, 1)
