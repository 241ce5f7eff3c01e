"""Hugging Face interop: GPT2LMHeadModel folders (config.json + model.safetensors) ↔ our GPT-2.

`transformers` is not needed here: the folder format is plain JSON and safetensors. HF's GPT-2
stores Conv1D weights as [in, out]; ours are nn.Linear [out, in]. The output embedding is
tied to `wte` in both, so `lm_head.weight` is not written.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.language.model import HParams, Model
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_conv1d(name: str) -> bool:
    return name.startswith("h.") and name.endswith(_CONV1D)


def export_folder(model: Model, folder: Path, encoding: str) -> None:
    """Write the GPT-2 trunk of `model` (heads dropped) as a GPT2LMHeadModel folder."""
    hp = model.hparams
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": hp.n_vocab,
        "n_positions": hp.n_ctx, "n_ctx": hp.n_ctx, "n_embd": hp.n_embd, "n_head": hp.n_head, "n_layer": hp.n_layer,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": hp.resid_pdrop, "embd_pdrop": hp.embd_pdrop, "attn_pdrop": hp.attn_pdrop,
        "scale_attn_weights": True, "tie_word_embeddings": True, "bos_token_id": hp.n_vocab - 1,
        "eos_token_id": hp.n_vocab - 1,
    }
    tensors = {}
    for name, value in model.state_dict().items():
        if name.startswith("heads."):
            continue
        value = value.detach().to("cpu", torch.float32)
        tensors[f"transformer.{name}"] = (value.T if _is_conv1d(name) else value).contiguous()
    storage.atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    storage.atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    storage.atomic_write_text(folder / "encoding", json.dumps(encoding))


def config_hparams(folder: Path) -> HParams:
    """Our hparams of a GPT2LMHeadModel / GPT2Model folder, from its config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read the Hugging Face config ({e})") from None
    if config.get("model_type") != "gpt2":
        raise UserError(f"{folder}: a Hugging Face model of type {config.get('model_type')!r}; only gpt2 is supported")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{folder}: activation {config['activation_function']!r} is not GPT-2's tanh GELU")
    hparams = HParams(n_vocab=config["vocab_size"], n_ctx=config.get("n_positions", config.get("n_ctx", 1024)),
                      n_embd=config["n_embd"], n_head=config["n_head"], n_layer=config["n_layer"])
    if config.get("n_inner") not in (None, 4 * hparams.n_embd):
        raise UserError(f"{folder}: n_inner {config['n_inner']} differs from GPT-2's 4 × n_embd")
    return hparams


def load_folder(folder: Path) -> tuple[HParams, str, dict[str, torch.Tensor]]:
    """(hparams, encoding name, our tensors) of a local GPT2LMHeadModel / GPT2Model folder."""
    hparams = config_hparams(folder)
    weights = folder / "model.safetensors"
    try:
        raw = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: cannot read the weights ({e}); only safetensors folders are supported") from None
    tensors = {}
    for name, value in raw.items():
        name = name.removeprefix("transformer.")
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied output embedding and causal-mask buffers
        tensors[name] = (value.T if _is_conv1d(name) else value).float().contiguous()
    encoding_file = folder / "encoding"
    if encoding_file.exists():
        encoding = json.loads(encoding_file.read_text())
    elif hparams.n_vocab == 50257:
        encoding = "main"
    else:
        raise UserError(f"{folder}: a vocabulary of {hparams.n_vocab} tokens is not GPT-2's; write the encoding's "
                        "name as a JSON string into an `encoding` file in the folder")
    return hparams, encoding, tensors
