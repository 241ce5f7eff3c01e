"""The losses of direct preference optimization (DPO; Rafailov et al. 2023) on best-of-N labels.

DPO trains the policy on the preference labels themselves, with no reward model: the policy's
*implicit reward* of a response y to a query x is β·(log π(y|x) − log π_ref(y|x)), π_ref the
frozen initial policy. A best-of-N record (a query, N responses, the labelled best b) gives
two losses of its implicit rewards r:

- `pairwise`: the DPO paper's Bradley–Terry loss −log σ(r_b − r_j) of the best against each
  other response j, averaged over the N − 1 pairs and the records (TRL's conversion of these
  label files keeps one pair a record, the best against the first different response);
- `best_of_n`: the original's reward-model loss of best-of-N labels — softmax cross-entropy
  over the N rewards with b as the class (`label_types.BestOfN.loss`) — on the implicit
  rewards; it is the DPO paper's Plackett–Luce loss (its appendix A.3) for the top choice of N.

For N = 2 both are −log σ(r_b − r_other). Identical responses in a record give a pair whose
margin is 0 whatever the weights: it adds log 2 to the pairwise loss and nothing to its gradient.
"""

import torch
import torch.nn.functional as F

from lm_human_preferences.labeling import label_types
from lm_human_preferences.task.policy import Policy

LOSSES = ("pairwise", "best_of_n")


def response_logprobs(policy: Policy, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each response [rows]: its tokens' log-probs (at the policy's sampling
    temperature, as PPO's KL) summed up to its end. The padding a truncated response ends with
    is no token of it; it is fed as token 0, which only positions after the response see."""
    real = (responses != policy.encoding.padding_token).cumprod(dim=1).bool()
    tokens = torch.where(real, responses, torch.zeros_like(responses))
    logprobs = policy.analyze_responses(queries, tokens, entropies=False)["logprobs"]
    return (logprobs * real).sum(dim=1)


def implicit_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (logprobs - ref_logprobs)


def pairwise_loss(rewards: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Mean over records and their N − 1 pairs of −log σ(r_best − r_other); rewards [records, N]."""
    records, n = rewards.shape
    chosen = rewards.gather(1, best.long().unsqueeze(1))
    others = ~F.one_hot(best.long(), n).bool()
    margins = (chosen - rewards)[others].view(records, n - 1)
    return -F.logsigmoid(margins).mean()


def loss(kind: str, rewards: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The `kind` loss (pairwise or best_of_n) of implicit rewards [records, N], and its stats:
    accuracy (the best has the highest implicit reward), the chosen response's mean reward, the
    others' mean, and their mean margin (chosen − the mean of the others)."""
    rewards = rewards.float()
    records, n = rewards.shape
    if kind == "pairwise":
        value = pairwise_loss(rewards, best)
    else:
        value, _ = label_types.BestOfN(n).loss(rewards, best)
    with torch.no_grad():
        chosen = rewards.gather(1, best.long().unsqueeze(1)).squeeze(1)
        rejected = (rewards.sum(1) - chosen) / (n - 1)
        stats = dict(loss=value.detach(), accuracy=(rewards.argmax(dim=1) == best).float().mean(),
                     chosen_reward=chosen.mean(), rejected_reward=rejected.mean(), margin=(chosen - rejected).mean())
    return value, stats
