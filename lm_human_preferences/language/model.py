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

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
class Output:
    logits: torch.Tensor | None  # [batch, positions, n_vocab]; None when not asked for
    heads: dict[str, torch.Tensor]  # name -> [batch, positions], float32
    cache: "KVCache | None"


class KVCache:
    """Everything a forward pass needs from earlier tokens, for every row of a batch.

    Per layer, the keys and values of the cached positions; and for the padding rules, which
    cached positions are real tokens, how many real tokens each row has so far (= the position
    of its next real token), and the final hidden state of its last real token (what a padded
    position repeats).

    Two kinds of storage:
    - preallocated (`Model.new_cache(batch, capacity)`): `capacity` positions per layer, filled
      in place; the fast one for sampling, where nothing needs gradients;
    - growing (`Model.new_cache(batch)`): each call's keys and values are concatenated to the
      cached ones, so gradients flow back through the cache (a shared query prefix in training).

    `Model.forward` fills it: `store` per layer, then `advance` once the call's tokens are done.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], real: torch.Tensor,
                 n_real: torch.Tensor, last_hidden: torch.Tensor, length: int, capacity: int | None,
                 has_padding: bool = False):
        self.keys = keys  # per layer [batch, n_head, capacity or length, head_dim]
        self.values = values
        self.real = real  # [batch, capacity or length] bool
        self.n_real = n_real  # [batch] long
        self.last_hidden = last_hidden  # [batch, n_embd]
        self.length = length  # positions filled
        self._capacity = capacity  # None: growing
        self.has_padding = has_padding  # whether any cached position is padding (host-side, no device sync)

    @classmethod
    def empty(cls, hp: "HParams", batch: int, capacity: int | None, dtype: torch.dtype,
              device: torch.device) -> "KVCache":
        shape = (batch, hp.n_head, capacity or 0, hp.n_embd // hp.n_head)
        return cls(keys=[torch.empty(shape, dtype=dtype, device=device) for _ in range(hp.n_layer)],
                   values=[torch.empty(shape, dtype=dtype, device=device) for _ in range(hp.n_layer)],
                   real=torch.zeros(batch, capacity or 0, dtype=torch.bool, device=device),
                   n_real=torch.zeros(batch, dtype=torch.long, device=device),
                   last_hidden=torch.zeros(batch, hp.n_embd, device=device),
                   length=0, capacity=capacity)

    @property
    def capacity(self) -> int | None:
        """Preallocated positions; None for a growing cache (bounded by the model's n_ctx)."""
        return self._capacity

    @property
    def batch(self) -> int:
        return self.n_real.shape[0]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values [batch, n_head, length, head_dim] of `layer`; returns all of
        the layer's keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if self._capacity is None:
            if start:
                k = torch.cat([self.keys[layer], k.to(self.keys[layer].dtype)], dim=2)
                v = torch.cat([self.values[layer], v.to(self.values[layer].dtype)], dim=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(v.dtype)

    def key_real(self, real: torch.Tensor) -> torch.Tensor:
        """[batch, length + this call's length]: which keys of this call are real tokens."""
        return torch.cat([self.real[:, :self.length], real], dim=1)

    def advance(self, real: torch.Tensor, has_padding: bool, n_real: torch.Tensor, last_hidden: torch.Tensor) -> None:
        """Record this call's tokens once every layer has stored its keys and values."""
        start, end = self.length, self.length + real.shape[1]
        if self._capacity is None:
            self.real = torch.cat([self.real, real], dim=1)
        else:
            self.real[:, start:end] = real
        self.n_real = n_real
        self.last_hidden = last_hidden
        self.length = end
        self.has_padding = self.has_padding or has_padding

    def select(self, index: torch.Tensor) -> "KVCache":
        """A new cache whose row i is row index[i] of this one (differentiable for a growing cache).

        This is how one computation of a shared query serves all of its responses."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return KVCache([pick(k) for k in self.keys], [pick(v) for v in self.values], pick(self.real),
                       pick(self.n_real), pick(self.last_hidden), self.length, self._capacity, self.has_padding)


def prefix_groups(prefix: torch.Tensor, max_share: float = 0.75) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Runs of consecutive rows with equal `prefix` [batch, prefix_len], e.g. a query repeated for its N responses.

    Returns (first row of each run [runs], run of each row [batch]), or None where sharing does
    not pay: fewer than two rows, or more than `max_share` × batch runs.
    """
    batch = prefix.shape[0]
    if batch < 2 or prefix.shape[1] == 0:
        return None
    starts = torch.ones(batch, dtype=torch.bool, device=prefix.device)
    starts[1:] = (prefix[1:] != prefix[:-1]).any(dim=1)
    first = starts.nonzero().squeeze(1)
    if len(first) > max_share * batch:
        return None
    return first, torch.cumsum(starts, 0) - 1


@dataclass
class _Mask:
    """How this call's queries may attend: `mask` for SDPA (None with `is_causal`, or none at all)."""
    mask: torch.Tensor | None
    is_causal: bool


# Devices where attention without padding runs without a dense mask. On CUDA a dense mask rules
# out flash attention, so there a batch without padding passes `is_causal` (or, for one new token
# after a cache, no mask at all). On CPU, SDPA's flash kernel takes a mask in the same kernel,
# `is_causal` gained only a few % of a forward pass there (docs/measurements.md), and a dense
# mask everywhere keeps a row's numbers independent of whether other rows of its batch have
# padding.
MASK_FREE_DEVICES = ("cuda",)


def _attention_mask(real: torch.Tensor, key_real: torch.Tensor, start: int, padded: bool) -> _Mask:
    """Causal attention to real keys; a padded query attends only to itself.

    Without padding (on MASK_FREE_DEVICES) the causal structure alone is needed: `is_causal`
    when the call starts at position 0, no mask at all for a single new token; a dense mask
    otherwise.
    """
    batch, length = real.shape
    end = start + length
    if not padded and real.device.type in MASK_FREE_DEVICES:
        if start == 0:
            return _Mask(None, True)
        if length == 1:
            return _Mask(None, False)
    q_pos = torch.arange(start, end, device=real.device)[:, None]
    k_pos = torch.arange(end, device=real.device)[None, :]
    allowed = k_pos <= q_pos
    if padded:
        allowed = allowed & (key_real[:, None, :] | (k_pos == q_pos))  # [batch, length, end]
    return _Mask(allowed.expand(batch, length, end)[:, None], False)  # broadcast over heads


class Attention(nn.Module):
    def __init__(self, hp: HParams):
        super().__init__()
        self.n_head = hp.n_head
        self.c_attn = nn.Linear(hp.n_embd, 3 * hp.n_embd)
        self.c_proj = nn.Linear(hp.n_embd, hp.n_embd)

    def forward(self, x: torch.Tensor, mask: _Mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, n_embd = x.shape
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.store(layer, k, v)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad:
            # CPU attention in training: SDPA's backward is slower in bf16 than in float32
            # (docs/measurements.md), and the products are tiny.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.mask,
                                                   is_causal=mask.is_causal).to(q.dtype)
        else:  # scale 1/sqrt(head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal)
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

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
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
        # After freeze(bf16): the output embedding in bf16 (wte itself stays float32 for the lookup).
        self.register_buffer("wte_lowp", None, persistent=False)
        self.frozen = False  # freeze(): never trained again (packed matrices of it are kept: language/packed.py)
        self.frozen_dtype: torch.dtype | None = None
        # While language/packed.py packs the matrices for inference: the logits' projection with them.
        self.output_projection: Callable[[torch.Tensor], torch.Tensor] | None = None
        # run.gradient_checkpointing: keep only each block's input for the backward pass and
        # recompute the block there (activation memory of one block instead of all; ~1/3 more compute).
        self.gradient_checkpointing = False
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

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype = torch.float32) -> "Model":
        """Stop training this model and keep it for inference with `dtype` matrix products.

        For bf16, the matrices of every Linear layer and a copy of the output embedding are
        stored in bf16 once, which is exactly what autocast would cast them to on every forward
        call (it caches casts only of weights that require grad, and only within one context);
        embeddings and LayerNorms stay float32, as under autocast. Forward calls then run under
        bf16 autocast by themselves, so results equal the float32 model's under autocast.
        """
        self.requires_grad_(False).eval()
        self.frozen = True
        if dtype != torch.float32:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
            self.wte_lowp = self.wte.weight.to(dtype)
            self.frozen_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        """Where the model is, and so where every tensor of its forward passes, samples and training steps goes."""
        return self.wte.weight.device

    def new_cache(self, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch` rows: preallocated for up to `capacity` positions (≤ n_ctx), or
        growing (capacity None; gradients flow through it).

        Its dtype defaults to the autocast dtype when autocast is on, else the weights' dtype.
        """
        hp = self.hparams
        if capacity is not None and capacity > hp.n_ctx:
            raise UserError(f"a cache of {capacity} positions exceeds the model's context of {hp.n_ctx} tokens")
        device = self.device
        if dtype is None:
            autocasting = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocasting else self.frozen_dtype or self.wte.weight.dtype
        return KVCache.empty(hp, batch, capacity, dtype, device)

    def forward(self, tokens: torch.Tensor, padding_token: int | None = None, cache: KVCache | None = None,
                output_slice: slice = slice(None), shared_prefix: int = 0, logits: bool = True) -> Output:
        """Run `tokens` [batch, length] after the cached ones (if any), updating `cache` in place.

        Logits and heads are computed only at positions `output_slice` of this call's tokens
        (e.g. `slice(-1, None)` when sampling), which saves the large vocabulary projection;
        with `logits=False` only the heads are (the reward model's forward).

        With `shared_prefix` k (and no cache), consecutive rows whose first k tokens are equal
        (a query repeated for each of its responses) run those tokens once, and their remaining
        tokens attend to that one computation's keys and values; gradients flow through it. The
        results equal the unshared computation's up to float rounding.
        """
        with self._frozen_autocast():
            if shared_prefix and cache is None and 0 < shared_prefix < tokens.shape[1] \
                    and output_slice.step in (None, 1):
                groups = prefix_groups(tokens[:, :shared_prefix])
                if groups is not None:
                    return self._forward_shared(tokens, padding_token, output_slice, shared_prefix, logits, *groups)
            x = self._hidden(tokens, padding_token, cache)
            return self._outputs(x[:, output_slice], cache, logits)

    def _forward_shared(self, tokens: torch.Tensor, padding_token: int | None, output_slice: slice, k: int,
                        logits: bool, first: torch.Tensor, run: torch.Tensor) -> Output:
        cache = self.new_cache(len(first))
        prefix, rest = tokens[first, :k], tokens[:, k:]
        # One embedding lookup for both parts: each lookup's backward zero-fills a gradient of the whole vocabulary.
        ids = torch.cat([prefix.reshape(-1), rest.reshape(-1)])
        embedded = self.wte(ids if padding_token is None else torch.where(ids == padding_token, 0, ids))
        # Whether each part holds padding, read in one device sync for both.
        padded = [False, False] if padding_token is None else \
            torch.stack([(prefix == padding_token).any(), (rest == padding_token).any()]).tolist()
        prefix_x = self._hidden(prefix, padding_token, cache, embedded[:prefix.numel()].view(*prefix.shape, -1),
                                padded=padded[0])
        rest_x = self._hidden(rest, padding_token, cache.select(run), embedded[prefix.numel():].view(*rest.shape, -1),
                              padded=padded[1])
        wanted = range(tokens.shape[1])[output_slice]
        in_prefix = slice(min(wanted.start, k), min(wanted.stop, k))
        in_rest = slice(max(wanted.start, k) - k, max(wanted.stop, k) - k)
        x = torch.cat([prefix_x[:, in_prefix].index_select(0, run), rest_x[:, in_rest]], dim=1)
        return self._outputs(x, None, logits)

    def _frozen_autocast(self):
        device_type = self.device.type
        if self.frozen_dtype is None or torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.frozen_dtype)

    def _hidden(self, tokens: torch.Tensor, padding_token: int | None, cache: KVCache | None,
                embedded: torch.Tensor | None = None, padded: bool | None = None) -> torch.Tensor:
        """Final hidden states [batch, length, n_embd] (padding filled), after the cached tokens.

        `embedded`: the token embeddings (padding as id 0), when the caller looked them up already;
        `padded`: whether any token is padding, when the caller knows (else read from the device).
        """
        batch, length = tokens.shape
        start = cache.length if cache is not None else 0
        end = start + length
        limit = cache.capacity if cache is not None and cache.capacity is not None else self.hparams.n_ctx
        if end > limit:
            raise UserError(f"{end} tokens exceed the model's context of {limit} positions; "
                            "shorten the query or response length")
        device = tokens.device
        n_real_before = cache.n_real if cache is not None else torch.zeros(batch, dtype=torch.long, device=device)
        if padding_token is None:
            real, padded = torch.ones_like(tokens, dtype=torch.bool), False
        else:
            real = tokens != padding_token
            if padded is None:
                padded = not bool(real.all())  # one host sync: it decides which attention kernel runs
        if padded:
            tokens = torch.where(real, tokens, 0)
            positions = n_real_before[:, None] + torch.cumsum(real, dim=1) - real.long()  # exclusive cumsum
        else:
            positions = n_real_before[:, None] + torch.arange(length, device=device)
        keys_padded = padded or (cache is not None and cache.has_padding)
        key_real = cache.key_real(real) if cache is not None and keys_padded else real
        mask = _attention_mask(real, key_real, start, keys_padded)

        x = (self.wte(tokens) if embedded is None else embedded) + self.wpe(positions)
        for layer, block in enumerate(self.h):
            x = self._block(block, x, mask, cache, layer)
        x = self.ln_f(x)

        if padded:
            previous = cache.last_hidden if cache is not None else torch.zeros(batch, x.shape[-1], device=device)
            x = _fill_padding(x, real, previous.to(x.dtype))
        if cache is not None:
            n_real = n_real_before + (real.sum(1) if padded else length)
            cache.advance(real, padded, n_real, x[:, -1].float())
        return x

    def _block(self, block: Block, x: torch.Tensor, mask: _Mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        """One block, checkpointed when gradient checkpointing is on and gradients are recorded.

        A block stores its keys and values in a growing cache (a shared query prefix in training).
        Recomputed in the backward pass, it must see the cache as it was, so it runs on a
        one-layer copy holding the layer's earlier keys and values as explicit inputs, and this
        layer's cache entries are set from its outputs. The model draws no random numbers (no
        dropout), so the recomputation needs no saved RNG state (on a GPU, a save per block).
        """
        if not (self.gradient_checkpointing and torch.is_grad_enabled()) or (cache is not None and cache.capacity):
            return block(x, mask, cache, layer)  # a preallocated cache is for sampling, without gradients
        if cache is None:
            return checkpoint(block, x, mask, None, layer, use_reentrant=False, preserve_rng_state=False)
        real, n_real, last_hidden, length, has_padding = cache.real, cache.n_real, cache.last_hidden, cache.length, \
            cache.has_padding

        def run(x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
            layer_cache = KVCache([past_k], [past_v], real, n_real, last_hidden, length, None, has_padding)
            y = block(x, mask, layer_cache, 0)
            return y, layer_cache.keys[0], layer_cache.values[0]

        x, cache.keys[layer], cache.values[layer] = checkpoint(run, x, cache.keys[layer], cache.values[layer],
                                                               use_reentrant=False, preserve_rng_state=False)
        return x

    def _outputs(self, x: torch.Tensor, cache: KVCache | None, logits: bool) -> Output:
        output_embedding = self.wte_lowp if self.wte_lowp is not None else self.wte.weight
        if not logits:
            projected = None
        elif self.output_projection is not None:
            projected = self.output_projection(x)
        else:
            projected = F.linear(x, output_embedding)  # tied output embedding
        heads = {name: head(x).squeeze(-1).float() for name, head in self.heads.items()}
        return Output(logits=projected, heads=heads, cache=cache)


def _fill_padding(x: torch.Tensor, real: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Replace x at padded positions by x at the nearest earlier real position.

    x [batch, length, n_embd]; real [batch, length]; previous [batch, n_embd] is used where no
    real position precedes in this call (the cache's last real hidden state, or zeros).
    """
    length = x.shape[1]
    index = torch.where(real, torch.arange(length, device=x.device), -1).cummax(dim=1).values  # [batch, length]
    gathered = x.gather(1, index.clamp(min=0)[:, :, None].expand_as(x))
    return torch.where((index >= 0)[:, :, None], gathered, previous[:, None, :])
