#!/usr/bin/env python3
"""How far each phase runs from this machine's limit: measured time against a roofline floor, in one run.

    python bench/roofline.py                 # GPT-2 124M (random weights), PPO batch 8, 64+24 tokens, 4 epochs
    python bench/roofline.py --model test    # tiny: checks that the script runs

The machine: torch.matmul's time at every matrix-product shape of the model's forward and
backward passes, in the dtype the run multiplies in (`run.precision auto`: bf16 on a GPU or a
CPU with native bf16, else float32), and its memory bandwidth (the fastest of a sum, a copy and
an in-place add over a large tensor, and of the PPO update's own Adam steps). The floor
of a phase is the sum of
  - its matrix products, each at the time torch.matmul takes for that shape in that dtype
    (training backward: the two products per forward product, dX = dY·W and dW = dYᵀ·X);
  - its memory-bound steps at the measured bandwidth: each decode step of sampling reads every
    weight and the KV cache in that dtype (or does its arithmetic at the fastest rate measured,
    whichever takes longer), and an Adam step moves 28 bytes per parameter (the fp32 master
    read and written, the gradient read, both moments read and written).
Element-wise work, attention's softmax and Python are not in the floor, so it is a lower bound.

Measured in the same run, alternated after a warm-up round (medians of --repeats):
  - a PPO update as shipped (run.precision auto, shared queries, fused Adam), phase by phase,
    timed as bench/ppo_speed.py does;
  - sampling alone (Policy.respond on --batch_size distinct queries, as bench/sampling_speed.py),
    and its first token alone: the query's forward pass, the rest the decode steps;
  - a reward-model training step (best-of-4 loss of --records records, backward, Adam, shared
    queries, as bench/reward_speed.py).
"""

import argparse
import dataclasses

import torch
import torch.nn.functional as F

import common
import ppo_speed
from lm_human_preferences.language import model as lm
from lm_human_preferences.task.rewards import RewardModel
from lm_human_preferences.training.run import RunHParams
from lm_human_preferences.utils.tf_adam import TFAdam

ADAM_BYTES_PER_PARAM = 28  # fp32 master read + written (8), gradient read (4), m and v read + written (16)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A matrix product [m, k] × [k, n], `count` times (batched: `batch` independent products)."""
    m: int
    k: int
    n: int
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def forward_products(hp: lm.HParams, rows: int, length: int, keys: int, outputs: int) -> list[Shape]:
    """The matrix products of one forward pass: `rows` × `length` new tokens attending to `keys`
    positions, logits at `outputs` positions in all."""
    d, tokens, head = hp.n_embd, rows * length, hp.n_embd // hp.n_head
    per_layer = [Shape(tokens, d, 3 * d), Shape(tokens, d, d), Shape(tokens, d, 4 * d), Shape(tokens, 4 * d, d),
                 Shape(length, head, keys, rows * hp.n_head), Shape(length, keys, head, rows * hp.n_head)]
    return per_layer * hp.n_layer + [Shape(outputs, d, hp.n_vocab)]


def backward_products(forward: list[Shape]) -> list[Shape]:
    """For each forward product [m,k]×[k,n]: dX = dY[m,n]·Wᵀ[n,k] and dW = Xᵀ[k,m]·dY[m,n]."""
    return [s for f in forward for s in (Shape(f.m, f.n, f.k, f.batch), Shape(f.k, f.m, f.n, f.batch))]


class Machine:
    """torch.matmul times per shape and the memory bandwidth, measured on this machine."""

    def __init__(self, device: torch.device, copy_mib: int, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype  # what the measured run multiplies in: its floor's products are timed in it
        self.copy_elements = copy_mib * 2 ** 20 // 4
        self._operands: dict[tuple[Shape, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds: dict[tuple[Shape, torch.dtype], float] = {}
        self.bandwidth = 0.0  # bytes/s
        self.peak = 0.0  # the fastest FLOP/s measured at any shape in `dtype`

    def _matmul_seconds(self, shape: Shape, dtype: torch.dtype, repeats: int = 3) -> float:
        key = (shape, dtype)
        if key not in self._operands:
            size = (shape.batch,) if shape.batch > 1 else ()
            self._operands[key] = (torch.randn(*size, shape.m, shape.k, device=self.device).to(dtype),
                                   torch.randn(*size, shape.k, shape.n, device=self.device).to(dtype))
        a, b = self._operands[key]
        best = float("inf")
        for _ in range(repeats):
            best = min(best, common.timed(torch.matmul, a, b)[0])
        return best

    def measure(self, shapes: set[Shape], dtypes: tuple[torch.dtype, ...]) -> dict[str, float]:
        """One round: every shape in every dtype, and the bandwidth. Returns named seconds (for `alternate`)."""
        result = {}
        for dtype in dtypes:
            for shape in shapes:
                result[f"{dtype} {shape}"] = self._matmul_seconds(shape, dtype)
        a = torch.ones(self.copy_elements, device=self.device)
        b = torch.ones_like(a)
        # Bytes/s of the fastest of three streaming kernels: read (sum), read + write (copy),
        # two reads + a write (in-place add, as most of Adam's streams are).
        kernels = {"sum": (a.sum, (), 1), "copy": (b.copy_, (a,), 2), "add": (b.add_, (a,), 3)}
        result["bandwidth"] = 0.0
        for fn, fn_args, streams in kernels.values():
            fn(*fn_args)
            seconds = min(common.timed(fn, *fn_args)[0] for _ in range(3))
            result["bandwidth"] = max(result["bandwidth"], streams * 4 * self.copy_elements / seconds)
        return result

    def take(self, medians: dict[str, float], shapes: set[Shape], dtypes: tuple[torch.dtype, ...]) -> None:
        for dtype in dtypes:
            for shape in shapes:
                self.seconds[(shape, dtype)] = medians[f"{dtype} {shape}"]
        self.bandwidth = medians["bandwidth"]
        if self.dtype in dtypes:
            self.peak = max(self.peak, max(s.flops / self.seconds[(s, self.dtype)] for s in shapes))

    def products(self, shapes: list[Shape], dtype: torch.dtype) -> float:
        return sum(self.seconds[(s, dtype)] for s in shapes)

    def rate(self, shapes: list[Shape], dtype: torch.dtype) -> float:
        """FLOP/s over these products."""
        return sum(s.flops for s in shapes) / self.products(shapes, dtype)


@dataclasses.dataclass
class Floors:
    """Per-phase floor ingredients: matrix products, bytes that must be moved, and memory-bound
    decode steps (bytes, FLOPs) each."""
    products: dict[str, list[Shape]]
    bytes: dict[str, float]
    steps: dict[str, list[tuple[float, float]]] = dataclasses.field(default_factory=dict)

    def seconds(self, machine: Machine, phase: str) -> float:
        compute = machine.products(self.products.get(phase, []), machine.dtype)
        steps = sum(max(moved / machine.bandwidth, flops / machine.peak) for moved, flops in self.steps.get(phase, []))
        return compute + self.bytes.get(phase, 0.0) / machine.bandwidth + steps


def linear_weights(hp: lm.HParams) -> int:
    """Elements of the matrices every forward pass reads (the trunk's Linear layers and the output embedding)."""
    return hp.n_layer * 12 * hp.n_embd ** 2 + hp.n_vocab * hp.n_embd


def sampling_floor(hp: lm.HParams, batch: int, query: int, response: int, n_params: int,
                   itemsize: int) -> tuple[list[Shape], list[tuple[float, float]]]:
    """The query's forward pass (logits at its last position), then response − 1 decode steps, each
    reading every weight and the KV cache so far, `itemsize` bytes an element: (bytes, FLOPs) per step."""
    steps = []
    for step in range(1, response):
        cache = hp.n_layer * 2 * batch * (query + step) * hp.n_embd * itemsize  # keys + values
        flops = sum(s.flops for s in forward_products(hp, batch, 1, query + step, batch))
        steps.append((itemsize * n_params + cache, flops))
    return forward_products(hp, batch, query, query, batch), steps


def ppo_floors(hp: lm.HParams, batch: int, query: int, response: int, epochs: int, n_params: int,
               itemsize: int) -> Floors:
    length = query + response
    sampling, steps = sampling_floor(hp, batch, query, response, n_params, itemsize)
    scored = forward_products(hp, batch, length, length, batch * response)  # logits at the response positions
    reward = forward_products(hp, batch, length, length, batch)  # the reward head at the last position only
    return Floors(products={"sampling": sampling, "reference": scored, "reward": reward,
                            "train": (scored + backward_products(scored)) * epochs},
                  bytes={"optimizer": epochs * ADAM_BYTES_PER_PARAM * n_params}, steps={"sampling": steps})


def reward_floors(hp: lm.HParams, records: int, query: int, response: int, n_params: int) -> Floors:
    """Each record's query runs once (shared), its 4 responses attend to it; reward at the last position."""
    forward = forward_products(hp, records, query, query, 0) + forward_products(hp, 4 * records, response,
                                                                                query + response, 4 * records)
    forward = [s for s in forward if s.n and s.m]
    return Floors(products={"step": forward + backward_products(forward)},
                  bytes={"step": ADAM_BYTES_PER_PARAM * n_params})


def reward_step(size: str, records: int, query: int, response: int):
    """A reward-model training step as train_reward runs it (run.precision auto, shared queries, TFAdam)."""
    torch.manual_seed(0)
    hp = common.SIZES[size]
    device = common.device()
    encoding = common.bench_encoding(hp.n_vocab)
    reward_model = RewardModel(lm.Model(hp, heads=("reward",)), encoding).to(device)
    reward_model.configure(RunHParams())
    optimizer = TFAdam(reward_model.parameters(), lr=1e-9)
    queries = torch.randint(0, 26, (records, query), device=device).repeat_interleave(4, dim=0)
    responses = torch.randint(0, 26, (4 * records, response), device=device)
    responses[1::4, response // 2:] = encoding.padding_token  # some truncated responses
    labels = torch.randint(0, 4, (records,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(reward_model(queries, responses).view(records, 4), labels).backward()
        optimizer.step()

    return (lambda: {"step": common.timed(step)[0]}), sum(p.numel() for p in reward_model.parameters())


def sampling_timer(trainer):
    """`respond` of the whole response, and of its first token alone (the query's forward pass, one
    draw, and packing the matrices where language/packed.py packs them): the difference is the
    decode steps'."""
    queries = next(trainer.queries)
    length = trainer.hp.task.response_length

    def run() -> dict[str, float]:
        generator = torch.Generator(trainer.policy.device).manual_seed(0)
        first = common.timed(trainer.policy.respond, queries, 1, generator)[0]
        return {"sampling": common.timed(trainer.policy.respond, queries, length, generator)[0], "first": first}

    return run


def row(label: str, measured: float, floor: float) -> list[str]:
    return [label, f"{measured:.3f}", f"{floor:.3f}", f"{measured / floor:.2f}x" if floor > 0 else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_size_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--noptepochs", type=int, default=4)
    parser.add_argument("--records", type=int, default=4, help="best-of-4 records per reward-model step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy_mib", type=int, default=512, help="size of the tensors that measure the bandwidth")
    common.add_out_arg(parser)
    args = parser.parse_args()
    common.prepare(args)
    if args.model == "test":
        args.copy_mib = min(args.copy_mib, 8)
    hp = common.SIZES[args.model]
    q, r, b = args.query_length, args.response_length, args.batch_size
    trainer = common.make_trainer(args.model, b, q, r, noptepochs=args.noptepochs)
    n_policy = sum(p.numel() for p in trainer.params)
    dtype = trainer.policy.compute_dtype  # the floor's products are timed in what the run multiplies in
    ppo = ppo_floors(hp, b, q, r, args.noptepochs, n_policy, dtype.itemsize)
    reward_run, n_reward = reward_step(args.model, args.records, q, r)
    rm = reward_floors(hp, args.records, q, r, n_reward)
    shapes = {s for f in (ppo, rm) for shapes in f.products.values() for s in shapes}
    machine = Machine(common.device(), args.copy_mib, dtype)
    medians = common.alternate({"update": ppo_speed.update_timer(trainer), "sampling": sampling_timer(trainer),
                                "reward": reward_run, "machine": lambda: machine.measure(shapes, (dtype,))},
                               args.repeats)
    machine.take(medians["machine"], shapes, (dtype,))
    # The fused Adam kernel may stream faster than the simple kernels: the bandwidth is the fastest seen.
    update = medians["update"]
    adam_rate = ppo.bytes["optimizer"] / update["optimizer"] if update["optimizer"] > 0 else 0.0
    machine.bandwidth = max(machine.bandwidth, adam_rate)
    medians["machine"]["streaming"], medians["machine"]["bandwidth"] = medians["machine"]["bandwidth"], machine.bandwidth
    # The other dtype, for the record; bf16 only where it is native (emulated, it runs at ~1 GFLOP/s).
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    native = common.native_bf16()
    if other == torch.float32 or native:
        machine.take({**machine.measure(shapes, (other,)), "bandwidth": machine.bandwidth}, shapes, (other,))

    def rates(shapes: list[Shape]) -> str:
        return ", ".join(f"{str(t).removeprefix('torch.')} {machine.rate(shapes, t) / 1e12:.2f}"
                         for t in (dtype, other) if (shapes[0], t) in machine.seconds)

    print(common.describe(args))
    print(f"PPO batch {b}, {args.noptepochs} epochs, 1 minibatch, as shipped (precision auto = "
          f"{dtype}); reward model: {args.records} best-of-4 records a step; "
          f"medians of {args.repeats} after a warm-up, alternated with the machine's measurements; "
          f"floors from {dtype} products")
    train = ppo.products["train"][:len(ppo.products["train"]) // args.noptepochs]
    big = [s for s in train if s.batch == 1]
    print(f"machine: memory bandwidth {machine.bandwidth / 1e9:.1f} GB/s (streaming kernels "
          f"{medians['machine']['streaming'] / 1e9:.1f}, Adam {adam_rate / 1e9:.1f}); torch.matmul at the training shapes "
          f"(trunk and logits, forward and backward), TFLOP/s: {rates(big)}; attention's batched products: "
          f"{rates([s for s in train if s.batch > 1])}" + ("" if native else "; bf16 not measured (emulated on this CPU)"))
    rows = [["phase (s)", "measured", "floor", "measured/floor"]]
    phases: list[dict] = []

    def phase(label: str, measured: float, floor: float) -> list[str]:
        phases.append(dict(phase=label, measured_s=measured, floor_s=floor))
        return row(label, measured, floor)

    floor_total = 0.0
    for key, label in ppo_speed.PHASES:
        floor = ppo.seconds(machine, key)
        floor_total += floor
        rows.append(phase(f"PPO {label}", update[key], floor))
    rows.append(phase("PPO other", update["other"], 0.0))
    rows.append(phase("PPO update", update["total"], floor_total))
    sampling = medians["sampling"]
    query_floor = machine.products(ppo.products["sampling"], dtype)
    rows.append(phase(f"sampling alone ({b}×{r} tokens)", sampling["sampling"], ppo.seconds(machine, "sampling")))
    rows.append(phase("— query forward, first token", sampling["first"], query_floor))
    rows.append(phase(f"— {r - 1} decode steps", sampling["sampling"] - sampling["first"],
                    ppo.seconds(machine, "sampling") - query_floor))
    rows.append(phase(f"reward-model step ({4 * args.records} sequences)", medians["reward"]["step"],
                    rm.seconds(machine, "step")))
    print(common.table(rows))
    # A decode step reads every weight for `b` new tokens: 2·b FLOPs per weight. Where that is near
    # the machine's ridge point (peak FLOP/s over bandwidth), it is bound by reading and by
    # arithmetic at once, and its products cannot hide either behind the other.
    moved, flops = ppo.steps["sampling"][0]
    print(f"decode step: {flops / moved:.1f} FLOP a byte read at batch {b}, this machine's ridge point "
          f"{machine.peak / machine.bandwidth:.1f} (peak {machine.peak / 1e12:.2f} TFLOP/s over "
          f"{machine.bandwidth / 1e9:.1f} GB/s): its floor {moved / machine.bandwidth * 1e3:.1f} ms reading, "
          f"{flops / machine.peak * 1e3:.1f} ms computing; measured "
          f"{(sampling['sampling'] - sampling['first']) / max(r - 1, 1) * 1e3:.1f} ms a step")
    print(f"PPO: {b / update['total']:.2f} episodes/s (floor {b / floor_total:.2f}); sampling: "
          f"{b * r / medians['sampling']['sampling']:.0f} new tokens/s (floor {b * r / ppo.seconds(machine, 'sampling'):.0f}); "
          f"reward model: {4 * args.records / medians['reward']['step']:.1f} sequences/s "
          f"(floor {4 * args.records / rm.seconds(machine, 'step'):.1f})")
    common.write_results(args.out, "roofline", dict(
        model=args.model, batch_size=b, query_length=q, response_length=r, noptepochs=args.noptepochs,
        records=args.records, repeats=args.repeats, dtype=str(dtype).removeprefix("torch."), clock=args.clock,
        bandwidth_gb_s=machine.bandwidth / 1e9, peak_tflop_s=machine.peak / 1e12, phases=phases,
        decode_step=dict(flop_per_byte=flops / moved, ridge_point=machine.peak / machine.bandwidth,
                         measured_ms=(sampling["sampling"] - sampling["first"]) / max(r - 1, 1) * 1e3,
                         reading_floor_ms=moved / machine.bandwidth * 1e3, computing_floor_ms=flops / machine.peak * 1e3)))


if __name__ == "__main__":
    main()
