"""GPT-2 ("Alec's transformer") with named scalar heads, padding semantics and a KV cache.

Padding (docs/original.md, "Language model"): where `tokens == padding_token` the token is
replaced by id 0; a token's position is the number of real tokens before it, so gaps do not
shift positions; no query attends to a padded key (a padded query also attends to itself, which
keeps its softmax finite when no real token precedes it; its output is replaced anyway);
after the final LayerNorm the hidden state at a padded position is replaced by that of the
nearest earlier real token. A row may begin with padding: its real tokens then give exactly
what the row without that padding gives, and the leading padded positions output zeros.

The hparams carry dropout probabilities, as the original's did, but the original never
enabled dropout in training or sampling, so this model applies none.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.errors import UserError


@dataclass
class HParams(hyperparams.HParams):
    n_vocab: int = 0
    n_ctx: int = 0
    n_embd: int = 0
    n_head: int = 0
    n_layer: int = 0
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    head_pdrop: float = 0.1

    def validate(self, _prefix: str = "") -> None:
        super().validate(_prefix)
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            if getattr(self, name) <= 0:
                raise UserError(f"model hparam {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model hparam n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


@dataclass
class KVCache:
    """Keys/values of earlier tokens, preallocated to `capacity` positions, filled in place."""

    keys: torch.Tensor  # [n_layer, batch, n_head, capacity, head_dim]
    values: torch.Tensor  # [n_layer, batch, n_head, capacity, head_dim]
    real: torch.Tensor  # [batch, capacity] bool: which cached tokens are not padding
    n_real: torch.Tensor  # [batch] long: real tokens so far = position of the next real token
    last_hidden: torch.Tensor  # [batch, n_embd]: final hidden state of the last real token so far
    length: int = 0  # positions filled

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


@dataclass
class Output:
    logits: torch.Tensor  # [batch, positions, n_vocab]
    heads: dict[str, torch.Tensor]  # name -> [batch, positions], float32
    cache: KVCache | None


class Attention(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.n_head = hp.n_head
        self.c_attn = nn.Linear(hp.n_embd, 3 * hp.n_embd)
        self.c_proj = nn.Linear(hp.n_embd, hp.n_embd)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, n_embd = x.shape
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            start = cache.length
            cache.keys[layer, :, :, start:start + length] = k
            cache.values[layer, :, :, start:start + length] = v
            k = cache.keys[layer, :, :, :start + length].to(q.dtype)
            v = cache.values[layer, :, :, :start + length].to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # scale 1/sqrt(head_dim)
        return self.c_proj(y.transpose(1, 2).reshape(batch, length, n_embd))


class MLP(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.c_fc = nn.Linear(hp.n_embd, 4 * hp.n_embd)
        self.c_proj = nn.Linear(4 * hp.n_embd, hp.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hp.n_embd, eps=1e-5)
        self.attn = Attention(hp)
        self.ln_2 = nn.LayerNorm(hp.n_embd, eps=1e-5)
        self.mlp = MLP(hp)

    def forward(self, x, allowed, cache, layer):
        x = x + self.attn(self.ln_1(x), allowed, cache, layer)
        return x + self.mlp(self.ln_2(x))


class Model(nn.Module):
    """GPT-2 trunk plus scalar heads (`value` starts at zero, others Normal(0, 1/sqrt(n_embd+1)))."""

    def __init__(self, hp: HParams, heads: tuple[str, ...] = ()):
        super().__init__()
        hp.validate()
        self.hparams = hp
        self.wte = nn.Embedding(hp.n_vocab, hp.n_embd)
        self.wpe = nn.Embedding(hp.n_ctx, hp.n_embd)
        self.h = nn.ModuleList(Block(hp) for _ in range(hp.n_layer))
        self.ln_f = nn.LayerNorm(hp.n_embd, eps=1e-5)
        self.heads = nn.ModuleDict({name: nn.Linear(hp.n_embd, 1) for name in heads})
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The original's initializers: what an untrained (`test`) model starts from."""
        hp = self.hparams
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for block in self.h:
            stds = {block.attn.c_attn: 1 / math.sqrt(hp.n_embd), block.attn.c_proj: 1 / math.sqrt(hp.n_embd * hp.n_layer),
                    block.mlp.c_fc: 1 / math.sqrt(hp.n_embd), block.mlp.c_proj: 1 / math.sqrt(4 * hp.n_embd * hp.n_layer)}
            for linear, std in stds.items():
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
        for name in self.heads:
            self.reset_head(name)

    @torch.no_grad()
    def reset_head(self, name: str) -> None:
        head = self.heads[name]
        if name == "value":
            nn.init.zeros_(head.weight)
        else:
            nn.init.normal_(head.weight, std=1 / math.sqrt(self.hparams.n_embd + 1))
        nn.init.zeros_(head.bias)

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch` rows and up to `capacity` positions (≤ n_ctx).

        Its dtype defaults to the autocast dtype when autocast is on, else the weights' dtype.
        """
        hp = self.hparams
        if capacity > hp.n_ctx:
            raise UserError(f"a cache of {capacity} positions exceeds the model's context of {hp.n_ctx} tokens")
        device = self.wte.weight.device
        if dtype is None:
            autocasting = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocasting else self.wte.weight.dtype
        shape = (hp.n_layer, batch, hp.n_head, capacity, hp.n_embd // hp.n_head)
        return KVCache(
            keys=torch.empty(shape, dtype=dtype, device=device),
            values=torch.empty(shape, dtype=dtype, device=device),
            real=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            n_real=torch.zeros(batch, dtype=torch.long, device=device),
            last_hidden=torch.zeros(batch, hp.n_embd, device=device),
        )

    def forward(self, tokens: torch.Tensor, padding_token: int | None = None, cache: KVCache | None = None,
                output_slice: slice = slice(None)) -> Output:
        """Run `tokens` [batch, length] after the cached ones (if any), updating `cache` in place.

        Logits and heads are computed only at positions `output_slice` of this call's tokens
        (e.g. `slice(-1, None)` when sampling), which saves the large vocabulary projection.
        """
        batch, length = tokens.shape
        start = cache.length if cache is not None else 0
        end = start + length
        limit = cache.capacity if cache is not None else self.hparams.n_ctx
        if end > limit:
            raise UserError(f"{end} tokens exceed the model's context of {limit} positions; "
                            "shorten the query or response length")
        real = tokens != padding_token if padding_token is not None else torch.ones_like(tokens, dtype=torch.bool)
        tokens = torch.where(real, tokens, 0)
        n_real_before = cache.n_real if cache is not None else torch.zeros(batch, dtype=torch.long, device=tokens.device)
        positions = n_real_before[:, None] + torch.cumsum(real, dim=1) - real.long()  # exclusive cumsum

        key_real = torch.cat([cache.real[:, :start], real], dim=1) if cache is not None else real  # [batch, end]
        q_pos = torch.arange(start, end, device=tokens.device)[:, None]
        k_pos = torch.arange(end, device=tokens.device)[None, :]
        allowed = (k_pos <= q_pos) & (key_real[:, None, :] | (k_pos == q_pos))  # [batch, length, end]
        allowed = allowed[:, None]  # broadcast over heads

        x = self.wte(tokens) + self.wpe(positions)
        for layer, block in enumerate(self.h):
            x = block(x, allowed, cache, layer)
        x = self.ln_f(x)

        previous = cache.last_hidden if cache is not None else torch.zeros(batch, x.shape[-1], device=x.device)
        x = _fill_padding(x, real, previous.to(x.dtype))
        if cache is not None:
            cache.real[:, start:end] = real
            cache.n_real = n_real_before + real.sum(1)
            cache.last_hidden = x[:, -1].float()
            cache.length = end

        x = x[:, output_slice]
        logits = F.linear(x, self.wte.weight)  # tied output embedding
        heads = {name: head(x).squeeze(-1).float() for name, head in self.heads.items()}
        return Output(logits=logits, heads=heads, cache=cache)


def _fill_padding(x: torch.Tensor, real: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Replace x at padded positions by x at the nearest earlier real position.

    x [batch, length, n_embd]; real [batch, length]; previous [batch, n_embd] is used where no
    real position precedes in this call (the cache's last real hidden state, or zeros).
    """
    length = x.shape[1]
    index = torch.where(real, torch.arange(length, device=x.device), -1).cummax(dim=1).values  # [batch, length]
    gathered = x.gather(1, index.clamp(min=0)[:, :, None].expand_as(x))
    return torch.where((index >= 0)[:, :, None], gathered, previous[:, None, :])
