"""Hugging Face interop: GPT2LMHeadModel folders (config.json + model.safetensors) ↔ our GPT-2.

`transformers` is not needed here: the folder format is plain JSON and safetensors. HF's GPT-2
stores Conv1D weights as [in, out]; ours are nn.Linear [out, in]. The output embedding is
tied to `wte` in both, so `lm_head.weight` is not written.

An exported folder also holds its encoding's tokenizer, so that `AutoTokenizer` and
`pipeline("text-generation", folder)` load it and cut text into our token ids: GPT-2's files
(vocab.json and merges.txt are its encoder.json and vocab.bpe) for `main`, and for the
word-level encodings a `tokenizers` tokenizer.json that cuts text as they do (`_word_level`).
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.language import encodings
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
    tokenizer = tokenizer_files(encoding, hp.n_ctx)  # before any file: GPT-2's may need a download
    tensors = {}
    for name, value in model.state_dict().items():
        if name.startswith("heads."):
            continue
        value = value.detach().to("cpu", torch.float32)
        tensors[f"transformer.{name}"] = (value.T if _is_conv1d(name) else value).contiguous()
    storage.atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    storage.atomic_write_bytes(folder / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    storage.atomic_write_text(folder / "encoding", json.dumps(encoding))
    for name, text in tokenizer.items():
        storage.atomic_write_text(folder / name, text)


_GPT2_SPECIAL = "<|endoftext|>"
# Python's `\s` spelt out (every such character is below U+3001): the Oniguruma regexes of `tokenizers`
# leave out \x1c-\x1f, which Python counts as spaces.
_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def tokenizer_files(encoding: str, n_ctx: int) -> dict[str, str]:
    """The tokenizer files of `encoding` by name (see the module doc). Text holding `<|endoftext|>`
    literally is where GPT-2's differs: ours encodes it as ordinary text, HF's as the special token."""
    if encoding == "main":
        encoder, merges = encodings.read_bpe_files()
        special = {"bos_token": _GPT2_SPECIAL, "eos_token": _GPT2_SPECIAL, "unk_token": _GPT2_SPECIAL}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, **special}
        files = {"vocab.json": json.dumps(encoder, ensure_ascii=False),
                 "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                 "special_tokens_map.json": json.dumps(special, indent=2)}
    elif encoding == "kjv_words":
        pieces = json.loads(encodings.KJV_VOCAB.read_text(encoding="utf-8"))
        pattern = encodings.WORD_PIECES.pattern.replace(r"\s", _WHITESPACE)  # only inside a [...] there
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        files = {"tokenizer.json": _word_level(pieces, pattern, encodings.UNKNOWN_WORD, lowercase=True)}
    elif encoding == "test":
        chars = list(encodings.TEST_CHARS)
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        files = {"tokenizer.json": _word_level(chars, r"[\s\S]", len(chars) - 1, lowercase=False)}
    else:
        raise UserError(f"no Hugging Face tokenizer is known for the encoding {encoding!r}")
    return {**files, "tokenizer_config.json": json.dumps({**config, "model_max_length": n_ctx}, indent=2)}


def _word_level(pieces: list[str], pattern: str, unknown: int, lowercase: bool) -> str:
    """tokenizer.json of a tokenizer that (lower-cases text, when asked, then) keeps the matches of
    `pattern`, dropping the text between them as re.findall does, and gives each match its index
    in `pieces`, or `unknown`; decoding joins the pieces."""
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "Lowercase"} if lowercase else None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": True},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {piece: i for i, piece in enumerate(pieces)},
                  "unk_token": pieces[unknown]},
    }, ensure_ascii=False)


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
