"""The reward model: initial LM + `reward` head + a scalar affine "reward norm" (docs/original.md, "Reward model")."""

import contextlib

import torch
from torch import nn

from lm_human_preferences.language import packed, trained_models
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.language.model import Model
from lm_human_preferences.utils import distributed, save_folders, storage, tf_adam
from lm_human_preferences.utils.errors import UserError


class RewardModel(nn.Module):
    """reward = gain · head(last real token of query + response) + bias.

    gain and bias are trained together with the model, as in the original.
    """

    def __init__(self, model: Model, encoding: Encoding):
        super().__init__()
        if "reward" not in model.heads:
            raise ValueError("the reward model's LM needs a 'reward' head")
        self.model = model
        self.encoding = encoding
        # On the LM's device: a reward model is never half on the CPU, whichever constructor built it.
        self.gain = nn.Parameter(torch.ones((), device=model.device))
        self.bias = nn.Parameter(torch.zeros((), device=model.device))
        self.precision = "auto"  # run.precision: auto / fp32 / bf16
        self.share_queries = True  # run.share_queries: a query repeated in a batch (best-of-N) runs once
        self._n_params = sum(p.numel() for p in model.parameters())
        self.working_copy: tf_adam.WorkingCopy | None = None  # bf16 weights kept in step with the trained ones

    def configure(self, run, frozen: bool = False) -> "RewardModel":
        """Take `run.precision`, `run.share_queries` and `run.gradient_checkpointing`; a `frozen` reward
        model (PPO's) stores its LM in the compute precision once (gain and bias stay float32)."""
        self.precision, self.share_queries = run.precision, run.share_queries
        self.model.gradient_checkpointing = run.gradient_checkpointing and not frozen
        if frozen:
            self.requires_grad_(False).eval()
            self.model.freeze(self.compute_dtype)
        elif self.compute_dtype != torch.float32 and self.model.frozen_dtype is None:
            # Trained in low precision: a working copy of the weights (tf_adam.WorkingCopy), as Policy.
            self.working_copy = tf_adam.working_copy(self.model, self.compute_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return distributed.compute_dtype(self.device, self.precision, self._n_params)

    def forward(self, queries: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Rewards [batch] for queries [batch, q] followed by responses [batch, r] (no prefix/suffix).

        With share_queries, consecutive rows of the same query (best-of-N records, laid out with
        repeat_interleave) run the query once; its keys and values serve every response, in the
        backward pass too.
        """
        tokens = torch.cat([queries, responses], dim=1)
        if self.working_copy is not None:
            weights = self.working_copy.active()
        elif self.model.frozen_dtype is not None and not torch.is_grad_enabled():
            # prepacked matrices (language/packed.py), packed once
            weights = packed.packed(self.model, self.model.frozen_dtype)
        else:
            weights = contextlib.nullcontext()
        with distributed.autocast(self.device, self.compute_dtype), weights:
            out = self.model(tokens, self.encoding.padding_token, output_slice=slice(-1, None),
                             shared_prefix=queries.shape[1] if self.share_queries else 0, logits=False)
        return self.gain * out.heads["reward"][:, 0] + self.bias

    @torch.no_grad()
    def reset_norm(self) -> None:
        self.gain.fill_(1.0)
        self.bias.fill_(0.0)

    @torch.no_grad()
    def set_norm(self, mean: float, std: float, target_mean: float, target_std: float) -> None:
        """Given rewards measured with gain 1 and bias 0 (mean, std), make them target_mean/target_std."""
        if not std > 0:
            raise UserError(f"cannot normalize rewards: their std over the samples is {std}; "
                            "use more normalize_samples or check the reward model")
        gain = target_std / std
        self.gain.fill_(gain)
        self.bias.fill_(target_mean - gain * mean)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint: the LM with its reward head, plus reward_norm.{gain,bias}."""
        tensors = dict(self.model.state_dict())
        tensors["reward_norm.gain"] = self.gain.detach()
        tensors["reward_norm.bias"] = self.bias.detach()
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """The inverse of `state_tensors`."""
        for key in ("heads.reward.weight", "reward_norm.gain", "reward_norm.bias"):
            if key not in tensors:
                raise UserError(f"{source}: the checkpoint lacks {key}; is it a policy rather than a reward model?")
        trained_models.load_into(self.model, tensors, source)
        with torch.no_grad():
            self.gain.copy_(tensors["reward_norm.gain"])
            self.bias.copy_(tensors["reward_norm.bias"])


def reward_stats(rewards: torch.Tensor) -> tuple[float, float]:
    """Mean and population std over every rank's rewards."""
    count = distributed.all_reduce_sum(torch.tensor(float(rewards.numel()), device=rewards.device))
    total = distributed.all_reduce_sum(rewards.float().sum())
    mean = total / count
    var = distributed.all_reduce_sum(((rewards.float() - mean) ** 2).sum()) / count
    return mean.item(), var.sqrt().item()


def reward_model_folder(path: str) -> str:
    """Accept a train_reward save folder or its `reward_model` subfolder (as the released runs name it)."""
    nested = storage.join(path, save_folders.REWARD_MODEL)
    if storage.exists(storage.join(nested, "hparams.json")):
        return nested
    if storage.exists(storage.join(path, "hparams.json")):
        return path
    raise UserError(f"{path}: no reward model here (looked for hparams.json in it and in its reward_model/); "
                    "pass the save folder of a train_reward run")


def load_trained(path: str, device: torch.device | str = "cpu") -> RewardModel:
    """A trained reward model from a save folder (path or URL), with its gain and bias."""
    folder = reward_model_folder(path)
    saved = trained_models.load(folder)
    reward_model = RewardModel(Model(saved.hparams, heads=("reward",)), trained_models.encoding_of(saved, folder))
    reward_model.load_tensors(saved.tensors, folder)
    return reward_model.to(device)
