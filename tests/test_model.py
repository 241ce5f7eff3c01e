import math

import numpy as np
import pytest
import torch

from lm_human_preferences.language import model
from lm_human_preferences.utils.errors import UserError

PAD = 27
TEST_HP = model.HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)


def _model(hp=TEST_HP, heads=("value", "reward"), seed=0):
    torch.manual_seed(seed)
    m = model.Model(hp, heads=heads)
    with torch.no_grad():  # non-zero value head so its outputs are checked too
        if "value" in m.heads:
            m.heads["value"].weight.normal_()
            m.heads["value"].bias.fill_(0.3)
        for p in m.parameters():  # larger weights make differences visible
            p.mul_(3)
    return m.eval()


def numpy_gpt2(params: dict[str, np.ndarray], hp: model.HParams, row: list[int], pad: int) -> tuple[np.ndarray, dict]:
    """A direct transcription of the padding rules (docs/original.md) for one row, position by position."""
    real = [t != pad for t in row]
    tokens = [t if r else 0 for t, r in zip(row, real)]
    positions = np.cumsum(real) - np.array(real, dtype=int)

    def layer_norm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = params["wte.weight"][tokens] + params["wpe.weight"][positions]
    T, C = x.shape
    H = hp.n_head
    D = C // H
    for i in range(hp.n_layer):
        p = lambda name, i=i: params[f"h.{i}.{name}"]  # noqa: E731
        a = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"))
        qkv = a @ p("attn.c_attn.weight").T + p("attn.c_attn.bias")
        out = np.zeros((T, C))
        for h in range(H):
            q = qkv[:, h * D:(h + 1) * D]
            k = qkv[:, C + h * D:C + (h + 1) * D]
            v = qkv[:, 2 * C + h * D:2 * C + (h + 1) * D]
            for t in range(T):
                keys = [s for s in range(t + 1) if real[s] or s == t]
                scores = np.array([q[t] @ k[s] / math.sqrt(D) for s in keys])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[t, h * D:(h + 1) * D] = sum(wi * v[s] for wi, s in zip(w, keys))
        x = x + out @ p("attn.c_proj.weight").T + p("attn.c_proj.bias")
        m = layer_norm(x, p("ln_2.weight"), p("ln_2.bias"))
        m = gelu(m @ p("mlp.c_fc.weight").T + p("mlp.c_fc.bias"))
        x = x + m @ p("mlp.c_proj.weight").T + p("mlp.c_proj.bias")
    x = layer_norm(x, params["ln_f.weight"], params["ln_f.bias"])
    filled = np.zeros_like(x)
    last = np.zeros(C)
    for t in range(T):
        if real[t]:
            last = x[t]
        filled[t] = last
    logits = filled @ params["wte.weight"].T
    heads = {name: filled @ params[f"heads.{name}.weight"][0] + params[f"heads.{name}.bias"][0]
             for name in ("value", "reward")}
    return logits, heads


def test_matches_numpy_reference_with_padding():
    hp = model.HParams(n_vocab=11, n_ctx=10, n_embd=8, n_head=2, n_layer=2)
    m = _model(hp).double()
    params = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    rows = [[1, 2, 11, 3, 11, 11, 4, 5, 11, 11],
            [11, 11, 7, 8, 9, 10, 0, 11, 1, 2]]
    out = m(torch.tensor(rows), padding_token=11)
    for i, row in enumerate(rows):
        logits, heads = numpy_gpt2(params, hp, row, pad=11)
        real = np.array(row) != 11
        first_real = int(np.argmax(real))
        # From the first real token on, everything is defined by the padding rules; leading padding outputs zeros.
        np.testing.assert_allclose(out.logits[i, first_real:].detach().numpy(), logits[first_real:], atol=1e-9)
        for name in heads:
            np.testing.assert_allclose(out.heads[name][i, first_real:].detach().numpy(), heads[name][first_real:], atol=1e-9)
        assert out.logits[i, :first_real].abs().sum() == 0


def test_incremental_decoding_matches_full_sequence():
    m = _model()
    tokens = torch.tensor([[3, 5, PAD, 7, 1, PAD, PAD, 2],
                           [PAD, 4, 4, 4, 26, 0, PAD, 9],
                           [1, 2, 3, 4, 5, 6, 7, 8 % 27]])
    with torch.no_grad():
        full = m(tokens, PAD)
        for chunks in ([3, 1, 1, 3], [1] * 8, [8], [5, 3]):
            cache = m.new_cache(batch=3, capacity=8)
            logits, values = [], []
            start = 0
            for size in chunks:
                out = m(tokens[:, start:start + size], PAD, cache=cache)
                logits.append(out.logits)
                values.append(out.heads["value"])
                start += size
            assert cache.length == 8
            torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.cat(values, 1), full.heads["value"], atol=1e-5, rtol=1e-5)


def test_output_slice_matches_full_output():
    m = _model()
    tokens = torch.tensor([[3, 5, PAD, 7, 1, PAD]])
    with torch.no_grad():
        full = m(tokens, PAD)
        last = m(tokens, PAD, output_slice=slice(-1, None))
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    torch.testing.assert_close(last.heads["reward"], full.heads["reward"][:, -1:])
    # the last position is padding, so it reports the last real token (index 4)
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, 4])


@pytest.mark.parametrize("gaps", [(1,), (0, 2), (3, 3, 3), (4,)])
def test_padding_gaps_leave_real_outputs_unchanged(gaps):
    m = _model()
    row = [3, 14, 15, 9, 2]
    padded = list(row)
    for offset, where in enumerate(sorted(gaps)):
        padded.insert(where + 1 + offset, PAD)  # after the first token: rows must not start padded here
    with torch.no_grad():
        plain = m(torch.tensor([row]), PAD)
        gapped = m(torch.tensor([padded]), PAD)
    real = [i for i, t in enumerate(padded) if t != PAD]
    torch.testing.assert_close(gapped.logits[0, real], plain.logits[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gapped.heads["reward"][0, real], plain.heads["reward"][0], atol=1e-6, rtol=1e-6)
    for i, t in enumerate(padded):  # a padded position repeats the nearest earlier real one
        if t == PAD:
            nearest = max(j for j in real if j < i)
            torch.testing.assert_close(gapped.logits[0, i], gapped.logits[0, nearest])


def test_leading_padding_equals_stripped_row():
    m = _model()
    row = [5, 6, 7, 8]
    with torch.no_grad():
        stripped = m(torch.tensor([row]), PAD)
        led = m(torch.tensor([[PAD, PAD, PAD] + row, [1, 2, 3, 4, 5, 6, 7]]), PAD)
    # float32 rounding differs between the two batch layouts (a few ulps of values near 3);
    # a wrong position or mask would be off by far more than 1e-5
    torch.testing.assert_close(led.logits[0, 3:], stripped.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(led.heads["value"][0, 3:], stripped.heads["value"][0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(led.logits).all()


def test_padding_token_ids_are_replaced_by_zero():
    """Without a padding token, id 27 would be out of range; with it, it never reaches wte."""
    m = _model()
    with torch.no_grad():
        out = m(torch.tensor([[1, 27, 2]]), padding_token=27)
    assert torch.isfinite(out.logits).all()


def test_heads_start_as_specified():
    hp = model.HParams(n_vocab=5, n_ctx=4, n_embd=1023, n_head=1, n_layer=1)
    torch.manual_seed(0)
    m = model.Model(hp, heads=("value", "reward"))
    assert torch.count_nonzero(m.heads["value"].weight) == 0
    assert torch.count_nonzero(m.heads["value"].bias) == 0
    assert torch.count_nonzero(m.heads["reward"].bias) == 0
    w = m.heads["reward"].weight
    expected_std = 1 / math.sqrt(1024)
    assert abs(w.std().item() - expected_std) < 0.1 * expected_std
    assert abs(w.mean().item()) < 0.1 * expected_std


def test_too_long_input_is_a_clear_error():
    m = _model()
    with pytest.raises(UserError, match="9 tokens exceed the model's context of 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    cache = m.new_cache(1, 4)
    m(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="exceed"):
        m(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="exceeds the model's context"):
        m.new_cache(1, 9)


def test_bad_hparams_are_rejected():
    with pytest.raises(UserError, match="not divisible by n_head"):
        model.Model(model.HParams(n_vocab=5, n_ctx=4, n_embd=7, n_head=2, n_layer=1))
    with pytest.raises(UserError, match="n_layer must be positive"):
        model.Model(model.HParams(n_vocab=5, n_ctx=4, n_embd=8, n_head=2, n_layer=0))


def test_bf16_autocast_close_to_float32():
    m = _model()
    tokens = torch.tensor([[3, 5, PAD, 7, 1, PAD, 4, 4]])
    with torch.no_grad():
        ref = m(tokens, PAD).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(tokens, PAD).logits
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
