"""Model names and save folders → hparams, encodings and weights.

A *named* model (`test`, later OpenAI's GPT-2 releases) gives the initial language model.
A *save folder* in our layout (SPEC §9) holds a trained model:

    <folder>/hparams.json                      model hparams
    <folder>/encoding                          the encoding's name, as a JSON string
    <folder>/checkpoints/latest                file name of the newest checkpoint
    <folder>/checkpoints/model-<step>.safetensors
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lm_human_preferences.language.model import HParams, Model
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

NAMED = {
    "test": (HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2), "test"),
}
KEEP_CHECKPOINTS = 5  # as TensorFlow's Saver kept


@dataclass
class Saved:
    hparams: HParams
    encoding: str
    tensors: dict[str, torch.Tensor]  # the newest checkpoint
    step: int


def is_named(name: str) -> bool:
    return name in NAMED


def load_initial(name: str, heads: tuple[str, ...] = (), device: torch.device | str = "cpu") -> tuple[Model, str]:
    """(model, encoding name) for a named model or a save folder; heads missing from it start fresh.

    The `test` model's trunk is drawn from a fixed seed, so every model started from it (policy,
    reference policy, reward model) begins from the same weights, as with a pretrained model.
    """
    if is_named(name):
        hparams, encoding = NAMED[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Model(hparams)
        trunk = model.state_dict()
        model = Model(hparams, heads=heads)  # heads drawn from the caller's random state
        model.load_state_dict(trunk, strict=False)
        return model.to(device), encoding
    saved = load(name)
    model = Model(saved.hparams, heads=heads)
    load_into(model, saved.tensors, name)
    return model.to(device), saved.encoding


def load_into(model: Model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a model's tensors from a checkpoint; heads the checkpoint lacks keep their init."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not k.startswith("heads.")]
    if missing:
        raise UserError(f"{source}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                        "is it a model of another kind?")
    for key, value in own.items():
        if key in tensors:
            if tensors[key].shape != value.shape:
                raise UserError(f"{source}: {key} has shape {list(tensors[key].shape)}, the model expects "
                                f"{list(value.shape)}; hparams.json and the weights disagree")
            value.copy_(tensors[key])


def _read_json(path: str, what: str):
    try:
        return json.loads(storage.fetch(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e})") from None


def load(folder: str) -> Saved:
    """The newest checkpoint of a save folder (local path or URL)."""
    hp = HParams.from_dict(_read_json(storage.join(folder, "hparams.json"), "model hparams"))
    encoding = _read_json(storage.join(folder, "encoding"), "the encoding name")
    if not isinstance(encoding, str):
        raise UserError(f"{storage.join(folder, 'encoding')} must hold a JSON string such as \"main\"")
    latest = storage.fetch(storage.join(folder, "checkpoints", "latest")).read_text().strip()
    path = storage.fetch(storage.join(folder, "checkpoints", latest))
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read the checkpoint ({e}); it may be truncated or corrupt") from None
    return Saved(hparams=hp, encoding=encoding, tensors=tensors, step=int(latest.split("-")[1].split(".")[0]))


def save_checkpoint(folder: str | Path, hparams: HParams, encoding: str, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Write a checkpoint atomically, point `latest` at it, and keep the newest few."""
    folder = Path(folder)
    storage.atomic_write_text(folder / "hparams.json", hparams.to_json())
    storage.atomic_write_text(folder / "encoding", json.dumps(encoding))
    checkpoints = folder / "checkpoints"
    name = f"model-{step:07d}.safetensors"
    data = save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()})
    storage.atomic_write_bytes(checkpoints / name, data)
    storage.atomic_write_text(checkpoints / "latest", name)
    for old in sorted(checkpoints.glob("model-*.safetensors"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
