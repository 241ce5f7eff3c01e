#!/usr/bin/env python3
"""Generate the TensorFlow checkpoint fixtures under tests/fixtures/tf/ (run once; CI does not).

Needs TensorFlow, which this project does not depend on; use a separate environment:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu cramjam
    /tmp/tfvenv/bin/python tools/make_tf_fixtures.py

It writes, with tf.compat.v1.train.Saver and random weights:
  gpt2/      OpenAI's GPT-2 release layout (variables model/...), n_vocab 50257 so the real
             `main` encoding applies; also a copy of its index rewritten with snappy-compressed
             blocks (model.ckpt.index.snappy);
  run/       an lm-human-preferences run: train_policy_hparams.json, policy/ (variables
             policy/model/... with the value head, plus ref_policy/ and Adam slots) and
             reward_model/ (reward_model/model/... with the reward head, reward_norm/{gain,bias},
             Adam slots), n_vocab 27 with the `test` encoding;
and reference outputs computed from the same weights with a GPT-2 forward written in TF ops
(reference.npz in each folder).
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import cramjam
import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tf"
sys.path.insert(0, str(ROOT))  # for the table codec helpers, used to write the snappy variant
TOKENS = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]], dtype=np.int32)


def gpt2_variables(scope: str, hp: dict, rng: np.random.Generator, heads: tuple[str, ...] = ()) -> dict:
    e, v, c = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]
    w = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)  # noqa: E731  (large, so errors show)
    variables = {f"{scope}/wte": w(v, e), f"{scope}/wpe": w(c, e)}
    for i in range(hp["n_layer"]):
        p = f"{scope}/h{i}"
        variables.update({
            f"{p}/ln_1/g": 1 + w(e), f"{p}/ln_1/b": w(e), f"{p}/ln_2/g": 1 + w(e), f"{p}/ln_2/b": w(e),
            f"{p}/attn/c_attn/w": w(1, e, 3 * e), f"{p}/attn/c_attn/b": w(3 * e),
            f"{p}/attn/c_proj/w": w(1, e, e), f"{p}/attn/c_proj/b": w(e),
            f"{p}/mlp/c_fc/w": w(1, e, 4 * e), f"{p}/mlp/c_fc/b": w(4 * e),
            f"{p}/mlp/c_proj/w": w(1, 4 * e, e), f"{p}/mlp/c_proj/b": w(e),
        })
    variables.update({f"{scope}/ln_f/g": 1 + w(e), f"{scope}/ln_f/b": w(e)})
    for head in heads:  # the original's fc_layer: w [n_embd], b []
        variables[f"{scope}/heads/{head}/w"] = w(e)
        variables[f"{scope}/heads/{head}/b"] = np.float32(rng.normal())
    return variables


def tf_forward(variables: dict, scope: str, hp: dict, tokens: np.ndarray, heads: tuple[str, ...] = ()):
    """GPT-2 in TF ops, as the original's model.py computes it (no padding)."""
    get = lambda name: tf.constant(variables[f"{scope}/{name}"])  # noqa: E731

    def norm(x, name):
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
        return (x - u) * tf.math.rsqrt(s + 1e-5) * get(f"{name}/g") + get(f"{name}/b")

    def conv(x, name):
        return tf.einsum("bte,ef->btf", x, get(f"{name}/w")[0]) + get(f"{name}/b")

    batch, length = tokens.shape
    n_head, embd = hp["n_head"], hp["n_embd"]
    h = tf.gather(get("wte"), tokens) + tf.gather(get("wpe"), tf.range(length))[None]
    mask = tf.linalg.band_part(tf.ones([length, length]), -1, 0)
    for i in range(hp["n_layer"]):
        a = conv(norm(h, f"h{i}/ln_1"), f"h{i}/attn/c_attn")
        q, k, v = (tf.transpose(tf.reshape(t, [batch, length, n_head, embd // n_head]), [0, 2, 1, 3])
                   for t in tf.split(a, 3, axis=2))
        w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(float(embd // n_head))
        w = tf.nn.softmax(w * mask - 1e10 * (1 - mask), axis=-1)
        a = tf.reshape(tf.transpose(tf.matmul(w, v), [0, 2, 1, 3]), [batch, length, embd])
        h = h + conv(a, f"h{i}/attn/c_proj")
        m = conv(norm(h, f"h{i}/ln_2"), f"h{i}/mlp/c_fc")
        m = 0.5 * m * (1 + tf.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * tf.pow(m, 3))))
        h = h + conv(m, f"h{i}/mlp/c_proj")
    h = norm(h, "ln_f")
    logits = tf.einsum("bte,ve->btv", h, get("wte"))
    outputs = {head: tf.einsum("bte,e->bt", h, get(f"heads/{head}/w")) + get(f"heads/{head}/b") for head in heads}
    return logits.numpy(), {k: v.numpy() for k, v in outputs.items()}


def save(variables: dict, prefix: Path, step: int | None = None) -> None:
    """Write a real TF checkpoint with tf.compat.v1.train.Saver (graph mode)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tf.Graph().as_default():
        tf_vars = [tf1.get_variable(name, initializer=value) for name, value in variables.items()]
        saver = tf1.train.Saver(tf_vars, save_relative_paths=True)
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            saver.save(session, str(prefix), global_step=step, write_meta_graph=False)


def snappy_index(index: Path, out: Path) -> None:
    """Rewrite an SSTable with every block snappy-compressed (recomputing handles and CRCs)."""
    from lm_human_preferences.language.tf_checkpoint import _block_entries, _read_block, _varint, crc32c, mask_crc

    file = index.read_bytes()
    footer = file[-48:]
    meta_off, pos = _varint(footer, 0)
    meta_size, pos = _varint(footer, pos)
    index_off, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    blob = bytearray()

    def varint(n: int) -> bytes:
        out = bytearray()
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    def put(block: bytes) -> bytes:
        data = bytes(cramjam.snappy.compress_raw(block)) + b"\x01"
        handle = varint(len(blob)) + varint(len(data) - 1)
        blob.extend(data + struct.pack("<I", mask_crc(crc32c(data))))
        return handle

    def rebuild(entries) -> bytes:  # one restart point per entry keeps the encoding simple
        body, restarts = bytearray(), []
        for key, value in entries:
            restarts.append(len(body))
            body += varint(0) + varint(len(key)) + varint(len(value)) + key + value
        return bytes(body + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts)))

    new_index = []
    for key, handle in _block_entries(_read_block(file, index_off, index_size, index.name)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        new_index.append((key, put(rebuild(_block_entries(_read_block(file, offset, size, index.name))))))
    meta_handle = put(_read_block(file, meta_off, meta_size, index.name))
    index_handle = put(rebuild(new_index))
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    out.write_bytes(bytes(blob) + footer)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    rng = np.random.default_rng(0)

    gpt2_hp = dict(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
    gpt2 = gpt2_variables("model", gpt2_hp, rng)
    save(gpt2, OUT / "gpt2" / "model.ckpt")
    (OUT / "gpt2" / "hparams.json").write_text(json.dumps(gpt2_hp, indent=2))
    snappy_index(OUT / "gpt2" / "model.ckpt.index", OUT / "gpt2" / "model.ckpt.index.snappy")
    logits, _ = tf_forward(gpt2, "model", gpt2_hp, TOKENS)
    vocab_ids = np.concatenate([np.arange(1000), np.arange(50257 - 1000, 50257)])  # all 50257 would be 3 MB
    np.savez(OUT / "gpt2" / "reference.npz", tokens=TOKENS, vocab_ids=vocab_ids, logits=logits[..., vocab_ids],
             logsumexp=np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1))

    run_hp = dict(n_vocab=27, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
    policy = gpt2_variables("policy/model", run_hp, rng, heads=("value",))
    extras = {f"{name}/adam": np.zeros_like(value) for name, value in list(policy.items())[:3]}
    extras.update({f"{name}/adam_1": np.ones_like(value) for name, value in list(policy.items())[:3]})
    extras["global_step"] = np.int64(7)
    ref = {name.replace("policy/", "ref_policy/", 1): value + 1 for name, value in policy.items() if "heads" not in name}
    save({**policy, **ref, **extras}, OUT / "run" / "policy" / "checkpoints" / "model.ckpt", step=7)
    reward = gpt2_variables("reward_model/model", run_hp, rng, heads=("reward",))
    reward.update({"reward_model/reward_norm/gain": np.float32(1.7), "reward_model/reward_norm/bias": np.float32(-0.3)})
    reward_extras = {f"{name}/adam": np.zeros_like(value) for name, value in list(reward.items())[:2]}
    save({**reward, **reward_extras}, OUT / "run" / "reward_model" / "checkpoints" / "model.ckpt", step=5)
    for part in ("policy", "reward_model"):
        (OUT / "run" / part / "hparams.json").write_text(json.dumps(run_hp, indent=2))
        (OUT / "run" / part / "encoding").write_text(json.dumps("test"))
    task = dict(query_length=4, query_dataset="test", response_length=4, start_text=None,
                policy=dict(temperature=0.7, initial_model="test"))
    (OUT / "run" / "train_policy_hparams.json").write_text(json.dumps(
        dict(task=task, rewards=dict(trained_model="gs://lm-human-preferences/runs/fixture/reward_model"),
             ppo=dict(batch_size=8), run=dict(seed=1)), indent=2))
    tokens = TOKENS % 27
    policy_logits, policy_heads = tf_forward(policy, "policy/model", run_hp, tokens, heads=("value",))
    _, reward_heads = tf_forward(reward, "reward_model/model", run_hp, tokens, heads=("reward",))
    np.savez(OUT / "run" / "reference.npz", tokens=tokens, policy_logits=policy_logits, value=policy_heads["value"],
             reward=1.7 * reward_heads["reward"][:, -1] - 0.3)
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>9}  {path.relative_to(OUT)}")


if __name__ == "__main__":
    main()
