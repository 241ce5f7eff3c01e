"""The fast paths give the results of the plain ones: shared query prefixes, frozen bf16 models,
mask-free attention, per-forward autocast, the precision rule; and the bench scripts run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm_human_preferences.task import lm_tasks
from lm_human_preferences.training import train_policy
from lm_human_preferences.language import encodings, model, packed, sample, trained_models
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training.run import RunHParams
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.tf_adam import TFAdam

PAD = 27
HP = model.HParams(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
REPO = Path(__file__).resolve().parent.parent


def _model(heads=("value", "reward"), seed=0, hp=HP):
    torch.manual_seed(seed)
    m = model.Model(hp, heads=heads)
    with torch.no_grad():
        if "value" in m.heads:
            m.heads["value"].weight.normal_()
        for p in m.parameters():
            p.mul_(2)
    return m


def _task(query_length=4, response_length=5, prefix="", suffix=""):
    return lm_tasks.TaskHParams(query_length=query_length, query_dataset="test", response_length=response_length,
                                query_prefix=prefix, query_suffix=suffix)


# Three queries (the second starts with padding, the third has a gap and trails padding), each
# repeated for its responses, some of which are padded (truncated) or entirely padding.
QUERIES = torch.tensor([[1, 2, 3, 4], [PAD, PAD, 5, 6], [7, PAD, 8, PAD]])
RESPONSES = torch.tensor([
    [1, 2, 3, 4, 5], [6, PAD, PAD, PAD, PAD], [7, 8, 9, 10, 11], [PAD, PAD, PAD, PAD, PAD],
    [3, 3, 3, 3, 3], [12, 13, PAD, 14, PAD], [PAD, PAD, PAD, PAD, PAD], [0, 1, 0, 1, 0],
    [2, 4, 6, 8, 10], [26, PAD, PAD, PAD, PAD], [11, 12, 13, 14, 15], [1, PAD, 2, PAD, 3],
])


SAMPLED = RESPONSES % PAD  # what a policy samples has no padding


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Equal to float rounding: every element within `tolerance` × the largest of its tensor."""
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name], grad, atol=tolerance * scale, rtol=0, msg=name)


def test_prefix_groups():
    rows = torch.tensor([[1, 2], [1, 2], [1, 2], [3, 4], [3, 4], [1, 2]])
    first, run = model.prefix_groups(rows)
    assert first.tolist() == [0, 3, 5] and run.tolist() == [0, 0, 0, 1, 1, 2]
    assert model.prefix_groups(torch.tensor([[1], [2], [3], [4], [4]])) is None  # 4 runs of 5 rows: does not pay
    assert model.prefix_groups(torch.tensor([[1, 2]])) is None


@pytest.mark.parametrize("share", [True, False])
def test_shared_queries_give_the_unshared_rewards_and_gradients(share):
    """Best-of-4 layout (repeat_interleave): rewards and every gradient equal the plain computation."""
    rewards_of = {}
    grads_of = {}
    for shared in (False, share):
        rm = RewardModel(_model(heads=("reward",)), encodings.get("test"))
        rm.configure(RunHParams(precision="fp32", share_queries=shared))
        with torch.no_grad():
            rm.gain.fill_(1.5)
        calls = []
        hook = rm.model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("shared_prefix")),
                                                  with_kwargs=True)
        rewards = rm(QUERIES.repeat_interleave(4, dim=0), RESPONSES)
        hook.remove()
        (rewards * torch.arange(12.0)).sum().backward()  # a different weight per response
        rewards_of[shared], grads_of[shared] = rewards.detach(), _grads(rm)
        assert calls == [4 if shared else 0]
    torch.testing.assert_close(rewards_of[share], rewards_of[False], atol=1e-5, rtol=1e-5)
    assert_grads_close(grads_of[share], grads_of[False])


def test_shared_prefix_matches_every_output_position():
    """All logits and heads (not only the last) equal the plain forward, for any output slice."""
    m = _model()
    tokens = torch.cat([QUERIES.repeat_interleave(4, dim=0), RESPONSES], dim=1)
    with torch.no_grad():
        plain = m(tokens, PAD)
        for output_slice in (slice(None), slice(3, -1), slice(-1, None), slice(0, 2), slice(5, 7)):
            shared = m(tokens, PAD, shared_prefix=4, output_slice=output_slice)
            torch.testing.assert_close(shared.logits, plain.logits[:, output_slice], atol=1e-5, rtol=1e-5)
            for name in plain.heads:
                torch.testing.assert_close(shared.heads[name], plain.heads[name][:, output_slice], atol=1e-5, rtol=1e-5)


def test_shared_queries_in_analyze_responses_and_sampling():
    """N responses per query laid out query-repeated: log-probs, values, their gradients and the
    samples themselves equal the unshared computation."""
    task = _task(prefix="a", suffix=".")
    queries = QUERIES.repeat_interleave(4, dim=0)
    results = {}
    for shared in (False, True):
        policy = Policy(_model(heads=("value",)), encodings.get("test"), task, precision="fp32", share_queries=shared)
        rollout = policy.respond(queries, 5, generator=torch.Generator().manual_seed(3))
        out = policy.analyze_responses(queries, SAMPLED)
        (out["logprobs"].sum() + out["values"].sum()).backward()
        results[shared] = rollout, out, _grads(policy.model)
    (r0, a0, g0), (r1, a1, g1) = results[False], results[True]
    assert torch.equal(r0["responses"], r1["responses"])
    torch.testing.assert_close(r1["logprobs"], r0["logprobs"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r1["values"], r0["values"], atol=1e-5, rtol=1e-5)
    for key in ("logprobs", "values", "entropies"):
        torch.testing.assert_close(a1[key], a0[key], atol=1e-5, rtol=1e-5)
    assert_grads_close(g1, g0)


def test_sampling_shares_the_context_cache():
    m = _model().eval()
    context = QUERIES.repeat_interleave(3, dim=0)
    noise = torch.rand(9, 6, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    shared = sample.sample(m, context, 6, padding_token=PAD, noise=noise)
    hook.remove()
    plain = sample.sample(m, context, 6, padding_token=PAD, noise=noise, share_context=False)
    assert calls[0] == 3 and calls[1:] == [9] * 5  # the context ran once per query
    assert torch.equal(shared.tokens, plain.tokens)
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.values["value"], plain.values["value"], atol=1e-5, rtol=1e-5)


def test_growing_cache_passes_gradients_and_matches_full_forward():
    m = _model()
    tokens = torch.tensor([[3, 5, PAD, 7, 1, PAD, PAD, 2], [PAD, 4, 4, 4, 26, 0, PAD, 9]])
    full = m(tokens, PAD)
    full.heads["value"].sum().backward()
    expected = _grads(m)
    m.zero_grad()
    cache = m.new_cache(2)
    assert cache.capacity is None
    parts = [m(tokens[:, :3], PAD, cache=cache), m(tokens[:, 3:4], PAD, cache=cache), m(tokens[:, 4:], PAD, cache=cache)]
    values = torch.cat([p.heads["value"] for p in parts], dim=1)
    # Float32 rounding, relative to the values' scale (up to 21 here): both computations lie
    # within 4e-5 of float64's, where they are equal; an AVX2 CPU's products differ by 2.1e-5.
    scale = full.heads["value"].abs().max().item()
    torch.testing.assert_close(values, full.heads["value"], atol=1e-5 * scale, rtol=1e-5)
    values.sum().backward()
    assert_grads_close(_grads(m), expected)


def test_mask_free_attention_matches_masked(monkeypatch):
    """The path CUDA takes for batches without padding (is_causal / no mask) gives the masked results."""
    m = _model().eval()
    tokens = torch.tensor([[3, 5, 9, 7, 1, 2, 6, 2], [1, 4, 4, 4, 26, 0, 3, 9]])
    with torch.no_grad():
        masked = m(tokens, PAD)
        monkeypatch.setattr(model, "MASK_FREE_DEVICES", ("cuda", "cpu"))
        free = m(tokens, PAD)
        cache = m.new_cache(2, 8)
        steps = [m(tokens[:, :5], PAD, cache=cache)] + [m(tokens[:, i:i + 1], PAD, cache=cache) for i in range(5, 8)]
    torch.testing.assert_close(free.logits, masked.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), masked.logits, atol=1e-5, rtol=1e-5)
    assert model._attention_mask(tokens != PAD, tokens != PAD, 0, False).is_causal
    assert model._attention_mask(tokens[:, :1] != PAD, tokens != PAD, 7, False).mask is None


def test_frozen_bf16_model_equals_autocast_of_the_float32_model():
    m = _model()
    frozen = _model().freeze(torch.bfloat16)
    assert frozen.h[0].attn.c_attn.weight.dtype == torch.bfloat16 and frozen.wte.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in frozen.parameters())
    tokens = torch.tensor([[3, 5, PAD, 7, 1, PAD, 4, 4]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = m(tokens, PAD)
    with torch.no_grad():
        got = frozen(tokens, PAD)  # autocasts by itself
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.heads["reward"], expected.heads["reward"])
    assert "wte_lowp" not in frozen.state_dict()


def test_analyze_responses_entropy_is_a_statistic():
    task = _task()
    policy = Policy(_model(heads=("value",)), encodings.get("test"), task, precision="fp32")
    out = policy.analyze_responses(QUERIES, SAMPLED[:3])
    assert out["logprobs"].requires_grad and not out["entropies"].requires_grad
    logits = policy.model(torch.cat([QUERIES, SAMPLED[:3]], 1), PAD).logits[:, 3:-1].float() / task.policy.temperature
    logp = torch.log_softmax(logits.detach(), -1)
    assert torch.equal(out["entropies"], -(logp.exp() * logp).sum(-1))
    assert torch.equal(out["logprobs"].detach(), logp.gather(-1, SAMPLED[:3].unsqueeze(-1)).squeeze(-1))
    assert policy.analyze_responses(QUERIES, SAMPLED[:3], entropies=False)["entropies"] is None


def test_autocast_scope_is_one_forward_call():
    """bf16 training: after an optimizer step the next forward must use the new weights.

    Autocast caches its bf16 copies of the weights until its context exits; a context spanning
    the update would compute the second forward with the old weights."""
    task = _task()
    policy = Policy(_model(heads=("value",)), encodings.get("test"), task, precision="bf16")
    optimizer = TFAdam(policy.model.parameters(), lr=0.1)
    first = policy.analyze_responses(QUERIES, SAMPLED[:3])
    first["logprobs"].sum().backward()
    optimizer.step()
    second = policy.analyze_responses(QUERIES, SAMPLED[:3])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh context: the new weights (with grad, as training)
        logits = policy.model(torch.cat([QUERIES, SAMPLED[:3]], 1), PAD).logits[:, 3:-1].detach()
    expected = torch.log_softmax(logits.float(), -1).gather(-1, SAMPLED[:3, :, None]).squeeze(-1)
    assert not torch.equal(second["logprobs"], first["logprobs"])
    torch.testing.assert_close(second["logprobs"].detach(), expected, atol=0, rtol=0)


def _ppo_trainer(precision: str):
    task = lm_tasks.TaskHParams(query_length=3, query_dataset="test", response_length=4)
    task.policy.initial_model = "test"
    hp = train_policy.HParams(task=task)
    hp.rewards.trained_model = "unused"
    hp.ppo.batch_size, hp.ppo.noptepochs, hp.ppo.lr = 8, 2, 1e-2
    hp.run.precision = precision
    encoding = encodings.get("test")
    policy = Policy(_model(heads=("value",)), encoding, task)
    reference = _model(heads=())
    reference.load_state_dict(policy.model.state_dict(), strict=False)
    ref_policy = Policy(reference, encoding, task)
    reward_model = RewardModel(_model(heads=("reward",), seed=1), encoding)
    return train_policy.PPOTrainer(policy, ref_policy, reward_model, hp, seed=0)


def test_ppo_epochs_see_the_updated_weights(monkeypatch):
    """Each PPO forward opens its own autocast context, so epoch 2 computes with the weights that
    epoch 1's optimizer step left (one context around the update would reuse its stale bf16 copies)."""
    trainer = _ppo_trainer("bf16")
    assert trainer.ref_policy.model.frozen_dtype == torch.bfloat16
    assert trainer.policy.model.frozen_dtype is None and trainer.policy.model.wte.weight.requires_grad
    calls, snapshots = [], []
    real_analyze, real_step = Policy.analyze_responses, trainer.optimizer.step

    def analyze(self, *args, **kwargs):
        calls.append((torch.is_autocast_enabled("cpu"), self, args, real_analyze(self, *args, **kwargs)))
        return calls[-1][-1]

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        snapshots.append({k: v.clone() for k, v in trainer.policy.model.state_dict().items()})

    monkeypatch.setattr(Policy, "analyze_responses", analyze)
    monkeypatch.setattr(trainer.optimizer, "step", step)
    trainer.step(0)
    assert len(calls) == 1 + 2 and not any(c[0] for c in calls)  # reference + one per epoch, none inside autocast
    _, policy, args, epoch2 = calls[2]
    assert policy is trainer.policy
    fresh = _model(heads=("value",))
    fresh.load_state_dict(snapshots[0])  # the weights after epoch 1
    expected = real_analyze(Policy(fresh, policy.encoding, _task(3, 4), precision="bf16"), *args)
    torch.testing.assert_close(epoch2["logprobs"], expected["logprobs"], atol=1e-6, rtol=0)
    torch.testing.assert_close(epoch2["values"], expected["values"], atol=1e-6, rtol=0)


def test_ppo_bf16_epochs_track_float32():
    """Two PPO epochs in bf16 move the policy as float32 does (approxkl after the first epoch)."""
    stats = {p: _ppo_trainer(p).step(0)[0] for p in ("fp32", "bf16")}
    assert stats["bf16"]["ppo/policy/approxkl"] > 0
    assert stats["bf16"]["ppo/policy/approxkl"] == pytest.approx(stats["fp32"]["ppo/policy/approxkl"], rel=0.3, abs=1e-4)
    assert stats["bf16"]["objective/kl"] == pytest.approx(0.0, abs=0.05)  # the reference starts equal to the policy


def test_precision_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert distributed.compute_dtype(cpu, "fp32", 10 ** 9) == torch.float32
    assert distributed.compute_dtype(cpu, "bf16", 10) == torch.bfloat16
    assert distributed.compute_dtype(cpu, "auto", 800_000) == torch.float32  # small models: float32 is faster
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert distributed.compute_dtype(cpu, "auto", 124_000_000) == torch.bfloat16
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert distributed.compute_dtype(cpu, "auto", 124_000_000) == torch.float32
    with pytest.raises(UserError, match="unknown precision"):
        distributed.compute_dtype(cpu, "fp16")
    with pytest.raises(UserError, match="precision must be one of"):
        RunHParams(precision="half").validate()


@pytest.mark.parametrize("script, args, expected", [
    ("ppo_update.py", ["--batch_size", "8", "--updates", "1"], "episodes/s"),
    ("ppo_speed.py", ["--repeats", "1", "--noptepochs", "1"], "sum of its parts"),
    ("roofline.py", ["--repeats", "1", "--noptepochs", "1", "--clock", "cpu"], "ridge point"),
    ("reward_speed.py", ["--repeats", "1", "--records", "2"], "shared/unshared"),
    ("sampling_speed.py", ["--repeats", "1"], "new tokens/s"),
    ("ppo_memory.py", ["--batch_size", "8", "--chunk_sizes", "4"], "peak"),
    ("precision_crossover.py", ["--repeats", "1"], "fp32/bf16"),
    ("packed_linear.py", ["--repeats", "1", "--rows", "2", "70", "--sizes", "300x40"], "plain/packed"),
])
def test_bench_scripts_run(script, args, expected, tmp_path):
    """Every benchmark runs end to end on the tiny model (a few seconds; no timing is checked) and
    writes its results with their provenance."""
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), "--model", "test", *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    record = json.loads(out.read_text())
    assert record["bench"] == script.removesuffix(".py") and record["command"].startswith(f"python bench/{script} ")
    assert record["results"]
    provenance = record["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["threads"] >= 1
    assert provenance["machine"]["kind"] in ("cpu", "cuda") and provenance["machine"]["cpu"]
    assert isinstance(provenance["machine"]["native_bf16"], bool)
    assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?|unknown", provenance["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", provenance["date"])


def _train_steps(module, loss_of, steps: int = 3):
    """`steps` Adam steps on loss_of(); each step's outputs and gradients (as the trainers see them)."""
    optimizer = TFAdam([p for p in module.parameters() if p.requires_grad], lr=0.05)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, outputs = loss_of()
        loss.backward()
        history.append(({k: v.detach().clone() for k, v in outputs.items()}, _grads(module)))
        optimizer.step()
    return history


def _policy_steps(precision: str, working_copy: bool):
    policy = Policy(_model(heads=("value",)), encodings.get("test"), _task(), precision=precision)
    if working_copy:
        policy.configure(RunHParams(precision=precision))
        assert policy.working_copy is not None

    def loss_of():
        out = policy.analyze_responses(QUERIES, SAMPLED[:3])
        return out["logprobs"].sum() + out["values"].sum(), {"logprobs": out["logprobs"], "values": out["values"]}

    history = _train_steps(policy.model, loss_of)
    sampled = policy.respond(QUERIES, 5, generator=torch.Generator().manual_seed(3))
    return policy, history, sampled


def test_working_copy_is_the_autocast_computation():
    """A trained bf16 policy computes with a working copy of its weights: every forward equals
    per-forward autocast of the float32 weights bit for bit, over several optimizer steps (the
    copy follows each step); gradients equal to float rounding (the token lookup's sparse
    gradient is added in another order); weights, gradients and checkpoints stay float32."""
    _, plain, plain_sampled = _policy_steps("bf16", working_copy=False)
    policy, fast, fast_sampled = _policy_steps("bf16", working_copy=True)
    for (plain_out, plain_grads), (fast_out, fast_grads) in zip(plain, fast):
        for key in plain_out:
            assert torch.equal(fast_out[key], plain_out[key]), key
        assert_grads_close(fast_grads, plain_grads)
        assert all(g.dtype == torch.float32 and not g.is_sparse for g in fast_grads.values())
    assert torch.equal(fast_sampled["responses"], plain_sampled["responses"])
    assert torch.equal(fast_sampled["logprobs"], plain_sampled["logprobs"])
    assert all(t.dtype == torch.float32 for t in policy.model.state_dict().values())


def test_working_copy_agrees_with_float32():
    """The float32 reference path and the bf16 working copy agree to bf16 rounding (outputs and
    gradients of the same weights; how training trajectories compare: test_ppo_bf16_epochs_track_float32)."""
    (ref_out, ref_grads), = _policy_steps("fp32", working_copy=False)[1][:1]
    (fast_out, fast_grads), = _policy_steps("bf16", working_copy=True)[1][:1]
    assert_grads_close(fast_out, ref_out, tolerance=0.05)  # within 5% of each tensor's largest element
    assert fast_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():  # bf16 gradients of this small model with large weights: the same direction
        assert F.cosine_similarity(fast_grads[name].flatten(), grad.flatten(), dim=0) > 0.95, name


def test_working_copy_follows_loaded_weights():
    """Weights loaded into the model after the copy was made (a resumed run) are what it computes with."""
    policy = Policy(_model(heads=("value",)), encodings.get("test"), _task(), precision="bf16")
    policy.configure(RunHParams(precision="bf16"))
    before = policy.analyze_responses(QUERIES, SAMPLED[:3])["logprobs"]
    other = _model(heads=("value",), seed=5)
    trained_models.load_into(policy.model, other.state_dict(), "test")
    got = policy.analyze_responses(QUERIES, SAMPLED[:3])["logprobs"]
    expected = Policy(other, encodings.get("test"), _task(), precision="bf16").analyze_responses(QUERIES, SAMPLED[:3])
    assert not torch.equal(got, before)
    assert torch.equal(got, expected["logprobs"])


def test_reward_model_working_copy_trains_as_autocast():
    """Reward training with a working copy: the rewards and gradients autocast gives, the token
    lookup's gradient made dense (no logits gradient reaches the output embedding here)."""
    queries, labels = QUERIES.repeat_interleave(4, dim=0), torch.tensor([0, 3, 1])
    results = {}
    for working_copy in (False, True):
        rm = RewardModel(_model(heads=("reward",)), encodings.get("test"))
        rm.precision = "bf16"
        if working_copy:
            rm.configure(RunHParams(precision="bf16"))
            assert rm.working_copy is not None

        def loss_of():
            rewards = rm(queries, RESPONSES)
            return torch.nn.functional.cross_entropy(rewards.view(3, 4), labels), {"rewards": rewards}

        results[working_copy] = _train_steps(rm, loss_of)
    for (plain_out, plain_grads), (fast_out, fast_grads) in zip(results[False], results[True]):
        assert torch.equal(fast_out["rewards"], plain_out["rewards"])
        assert_grads_close(fast_grads, plain_grads)
        assert not fast_grads["model.wte.weight"].is_sparse


def test_working_copy_with_gradient_checkpointing():
    """Blocks recomputed in the backward pass (run.gradient_checkpointing) give the same gradients."""
    results = {}
    for checkpointing in (False, True):
        policy = Policy(_model(heads=("value",)), encodings.get("test"), _task(), precision="bf16")
        policy.configure(RunHParams(precision="bf16", gradient_checkpointing=checkpointing))
        out = policy.analyze_responses(QUERIES, SAMPLED[:3])
        (out["logprobs"].sum() + out["values"].sum()).backward()
        results[checkpointing] = out["logprobs"].detach(), _grads(policy.model)
    assert torch.equal(results[True][0], results[False][0])
    assert_grads_close(results[True][1], results[False][1])


needs_packing = pytest.mark.skipif(not packed.available(torch.device("cpu"), torch.bfloat16),
                                   reason="this CPU or torch has no native bf16 oneDNN products to pack for")
needs_float32_packing = pytest.mark.skipif(not packed.available(torch.device("cpu"), torch.float32),
                                           reason="this torch has no oneDNN linear to pack for")
PACK_HP = model.HParams(n_vocab=300, n_ctx=96, n_embd=64, n_head=4, n_layer=2)


@needs_float32_packing
def test_float32_packed_products_at_few_rows_only(monkeypatch):
    """Float32: the trunk's matrices packed only with `trunk` and only for calls of few rows, the
    output embedding always, matrices below FLOAT32_MIN_ELEMENTS never; the same numbers as the
    plain products; nothing kept after the block."""
    m = _model(heads=("reward",), hp=PACK_HP)
    linear = m.h[0].mlp.c_fc
    with packed.packed(m, torch.float32, trunk=True):  # 64 × 256 matrices: too small to pay
        assert "forward" not in linear.__dict__ and m.output_projection is None
    monkeypatch.setattr(packed, "FLOAT32_MIN_ELEMENTS", linear.weight.numel())
    with packed.packed(m, torch.float32, trunk=True):  # the largest packed, the others not
        assert "forward" in linear.__dict__ and "forward" not in m.h[0].attn.c_proj.__dict__
    monkeypatch.setattr(packed, "FLOAT32_MIN_ELEMENTS", 0)
    few = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))  # 40 rows
    many = torch.randint(0, 300, (4, 20), generator=torch.Generator().manual_seed(1))  # 80 > FLOAT32_MAX_ROWS
    assert 40 <= packed.FLOAT32_MAX_ROWS < 80
    calls = []
    real_pointwise = torch.ops.mkldnn._linear_pointwise

    def counted(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return real_pointwise(x, *args)

    with torch.no_grad():
        plain_few, plain_many = m(few, None), m(many, None)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted, raising=False)
            with packed.packed(m, torch.float32, trunk=True):
                assert "forward" in linear.__dict__ and m.output_projection is not None
                got_few = m(few, None)
                packed_calls = len(calls)
                got_many = m(many, None, logits=False)
            # at 40 rows: 2 layers × 4 matrices, the reward head and the output embedding; none at 80
            assert packed_calls == 2 * 4 + 2 and len(calls) == packed_calls
            with packed.packed(m, torch.float32, trunk=False):
                assert "forward" not in linear.__dict__ and m.output_projection is not None
        assert "_packed_weight" not in linear.__dict__ and "_packed_weight" not in m.__dict__  # nothing kept
    assert m.output_projection is None and "forward" not in linear.__dict__
    torch.testing.assert_close(got_few.logits, plain_few.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_few.heads["reward"], plain_few.heads["reward"], atol=1e-5, rtol=1e-5)
    assert torch.equal(got_many.heads["reward"], plain_many.heads["reward"])  # plain products at 80 rows
    assert got_many.logits is None
    m.freeze()  # a frozen model's packed matrices are kept: packed once
    with torch.no_grad(), packed.packed(m, torch.float32, trunk=False):
        frozen_logits = m(few, None).logits
    kept = m.__dict__["_packed_weight"][2]
    with packed.packed(m, torch.float32, trunk=False):
        assert m.__dict__["_packed_weight"][2] is kept and "forward" not in linear.__dict__
    torch.testing.assert_close(frozen_logits, plain_few.logits, atol=1e-5, rtol=1e-5)


@needs_float32_packing
def test_frozen_float32_reference_packs_its_output_embedding_once(monkeypatch):
    """The reference (a frozen float32 policy) scores from its output embedding packed once: the
    log-probs of the plain product; the trunk stays plain (its forward has many rows)."""
    monkeypatch.setattr(packed, "FLOAT32_MIN_ELEMENTS", 0)
    reference = Policy(_model(heads=(), hp=PACK_HP), encodings.get("test"), _task(), precision="fp32")
    reference.configure(RunHParams(precision="fp32"), frozen=True)
    with torch.no_grad():
        got = reference.analyze_responses(QUERIES, SAMPLED[:3], entropies=False)
        kept = reference.model.__dict__["_packed_weight"][2]
        again = reference.analyze_responses(QUERIES, SAMPLED[:3], entropies=False)
        assert reference.model.__dict__["_packed_weight"][2] is kept
        assert "_packed_weight" not in reference.model.h[0].mlp.c_fc.__dict__
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(packed, "available", lambda device, dtype: False)
            plain = reference.analyze_responses(QUERIES, SAMPLED[:3], entropies=False)
    torch.testing.assert_close(got["logprobs"], plain["logprobs"], atol=1e-5, rtol=1e-5)
    assert torch.equal(again["logprobs"], got["logprobs"])


def test_reward_model_computes_no_logits():
    """The reward model asks its LM for the reward head only: the same rewards as with logits."""
    m = _model(heads=("reward",), hp=PACK_HP)
    tokens = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, heads_only = m(tokens, None, output_slice=slice(-1, None)), m(tokens, None, output_slice=slice(-1, None),
                                                                             logits=False)
    assert heads_only.logits is None and full.logits.shape == (3, 1, 300)
    assert torch.equal(heads_only.heads["reward"], full.heads["reward"])


@needs_packing
def test_packed_matrices_give_the_unpacked_products():
    """A frozen bf16 model's forward from prepacked matrices equals the plain bf16 forward, and
    the packing is kept until the weights change."""
    hp = model.HParams(n_vocab=300, n_ctx=32, n_embd=64, n_head=4, n_layer=2)
    m = _model(heads=("reward",), hp=hp).freeze(torch.bfloat16)
    tokens = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = m(tokens, None)
        with packed.packed(m, torch.bfloat16):
            got = m(tokens, None)
            assert m.output_projection is not None
            assert "forward" in m.h[0].mlp.c_fc.__dict__
        first = m.h[0].mlp.c_fc.__dict__["_packed_weight"][2]
        with packed.packed(m, torch.bfloat16):
            again = m(tokens, None)
        assert m.h[0].mlp.c_fc.__dict__["_packed_weight"][2] is first  # unchanged weights: not packed again
    assert m.output_projection is None and "forward" not in m.h[0].mlp.c_fc.__dict__
    torch.testing.assert_close(got.logits.float(), plain.logits.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.heads["reward"], plain.heads["reward"], atol=2e-2, rtol=2e-2)
    assert torch.equal(again.logits, got.logits)
    cached = m.h[0].mlp.c_fc.__dict__["_packed_weight"]
    with torch.no_grad():
        m.h[0].mlp.c_fc.weight.mul_(2)  # a changed matrix is packed again
        with packed.packed(m, torch.bfloat16):
            assert m.h[0].mlp.c_fc.__dict__["_packed_weight"][2] is not cached[2]
            changed = m(tokens, None)
    assert not torch.equal(changed.logits, got.logits)


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=needs_float32_packing),
                                       pytest.param("bf16", marks=needs_packing)])
def test_sampling_from_packed_matrices_follows_training(precision, monkeypatch):
    """A trained policy samples from packed matrices (bf16: packed copies of its working copy, kept
    until they change; float32: packed for each call): the same samples as without packing, and
    after an optimizer step from the new weights."""
    hp, lr, tolerance = (PACK_HP, 0.01, 1e-5) if precision == "fp32" else (HP, 0.1, 1e-2)
    monkeypatch.setattr(packed, "FLOAT32_MIN_ELEMENTS", 0)  # PACK_HP's matrices are small
    results = {}
    for use_packing in (False, True):
        policy = Policy(_model(heads=("value",), hp=hp), encodings.get("test"), _task(), precision=precision)
        policy.configure(RunHParams(precision=precision))
        optimizer = TFAdam(policy.model.parameters(), lr=lr)
        rounds = []
        for _ in range(2):
            with pytest.MonkeyPatch.context() as patch:
                if not use_packing:
                    patch.setattr(packed, "available", lambda device, dtype: False)
                rounds.append(policy.respond(QUERIES, 5, generator=torch.Generator().manual_seed(3)))
            policy.analyze_responses(QUERIES, SAMPLED[:3])["logprobs"].sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results[use_packing] = rounds
    for plain, fast in zip(results[False], results[True]):
        assert torch.equal(fast["responses"], plain["responses"])
        torch.testing.assert_close(fast["logprobs"], plain["logprobs"], atol=tolerance, rtol=tolerance)
    assert not torch.equal(results[True][0]["logprobs"], results[True][1]["logprobs"])
