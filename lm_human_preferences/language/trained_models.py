"""Model names and folders → hparams, encodings and weights.

Named models: `test` (random weights from a fixed seed), `kjv` (a 1.7M-parameter word-level
model shipped in the package, trained by tools/train_small_lm.py) and OpenAI's GPT-2 releases
`124M`, `355M`, `774M`, `1558M` (downloaded once from the gpt-2 bucket). A folder (local path
or URL) may be in any of these layouts:

  ours               hparams.json, encoding, checkpoints/latest, checkpoints/model-<step>.safetensors
  original runs      hparams.json, encoding, checkpoints/checkpoint + TF checkpoint (scope <folder>/model)
  GPT-2 release      hparams.json, checkpoint + TF checkpoint (scope model)
  Hugging Face       config.json + model.safetensors (a local GPT2LMHeadModel folder)
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as safetensors_load_file, save

from lm_human_preferences.language import encodings, hf, tf_checkpoint
from lm_human_preferences.language.model import HParams, Model
from lm_human_preferences.utils import save_folders, storage
from lm_human_preferences.utils.errors import UserError

TEST_HPARAMS = HParams(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)
GPT2_MODELS = ("124M", "355M", "774M", "1558M")
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{name}"
# The files of a GPT-2 release that `load` reads (`checkpoint` names model.ckpt, in one shard).
GPT2_RELEASE_FILES = ("hparams.json", "checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
PACKAGED = {"kjv": Path(__file__).resolve().parent.parent / "data" / "kjv"}
KEEP_CHECKPOINTS = 5


@dataclass
class Saved:
    hparams: HParams
    encoding: str
    tensors: dict[str, torch.Tensor]  # our parameter names (plus reward_norm.gain/bias)
    step: int


def load_initial(name: str, heads: tuple[str, ...] = (), device: torch.device | str = "cpu") -> tuple[Model, str]:
    """(model, encoding name) for a named model or a folder; heads the weights lack start fresh.

    The `test` model's trunk is drawn from a fixed seed, so every model started from it (policy,
    reference policy, reward model) begins from the same weights, as with a pretrained model.
    """
    if name == "test":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            trunk = Model(TEST_HPARAMS).state_dict()
        model = Model(TEST_HPARAMS, heads=heads)  # heads drawn from the caller's random state
        model.load_state_dict(trunk, strict=False)
        return model.to(device), "test"
    if name in PACKAGED:
        saved = load(str(PACKAGED[name]))
    else:
        saved = load(GPT2_URL.format(name=name) if name in GPT2_MODELS else name)
    encoding_of(saved, name)
    model = Model(saved.hparams, heads=heads)
    load_into(model, saved.tensors, name)
    return model.to(device), saved.encoding


def context_and_encoding(name: str) -> tuple[int, str]:
    """(n_ctx, encoding name) of a named model or a folder, read from its hparams.json (or a
    Hugging Face folder's config.json) without loading, or downloading, any weights."""
    if name == "test":
        return TEST_HPARAMS.n_ctx, "test"
    if name in GPT2_MODELS:
        return 1024, "main"
    folder = str(PACKAGED[name]) if name in PACKAGED else storage.canonical_url(name.rstrip("/"))
    if not storage.is_remote(folder):
        if Path(folder, "config.json").exists():
            config = _read_json(str(Path(folder, "config.json")), "the Hugging Face config")
            if not isinstance(config, dict):
                raise UserError(f"{Path(folder, 'config.json')}: the Hugging Face config must be a JSON object")
            encoding_file = Path(folder, "encoding")
            encoding = _read_json(str(encoding_file), "the encoding name") if encoding_file.exists() else "main"
            return int(config.get("n_positions", config.get("n_ctx", 1024))), encoding
        if not Path(folder, "hparams.json").exists():
            raise UserError(f"{name}: no model here (looked for hparams.json and config.json); pass a save folder "
                            f"such as <save_dir>/policy or a model name ({', '.join(('test', *PACKAGED, *GPT2_MODELS))})")
    hparams, encoding = _hparams_and_encoding(folder)
    return hparams.n_ctx, encoding


# The released GPT-2 models' hparams.json: their shapes, known without a download.
GPT2_HPARAMS = {name: HParams(n_vocab=50257, n_ctx=1024, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
                for name, n_embd, n_head, n_layer in (("124M", 768, 12, 12), ("355M", 1024, 16, 24),
                                                      ("774M", 1280, 20, 36), ("1558M", 1600, 25, 48))}


def local_hparams(name: str) -> HParams | None:
    """The hparams of a named model or a local folder, read without loading weights or using the
    network; None for a folder that is not on this machine (a URL) or holds no model."""
    if name == "test":
        return TEST_HPARAMS
    if name in GPT2_HPARAMS:
        return GPT2_HPARAMS[name]
    folder = Path(PACKAGED[name]) if name in PACKAGED else Path(name)
    if storage.is_remote(name) or not folder.is_dir():
        return None
    if (folder / "config.json").exists():
        return hf.config_hparams(folder)
    if (folder / "hparams.json").exists():
        return _hparams_and_encoding(str(folder))[0]
    return None


def encoding_of(saved: Saved, source: str) -> encodings.Encoding:
    """The checkpoint's encoding, checked against the model's vocabulary size."""
    encoding = encodings.get(saved.encoding)
    if saved.hparams.n_vocab != encoding.n_vocab:
        raise UserError(f"{source}: the model has {saved.hparams.n_vocab} tokens but its encoding {saved.encoding!r} "
                        f"has {encoding.n_vocab}; the weights and the encoding do not belong together")
    return encoding


def load_into(model: Model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's tensors into `model`; heads the checkpoint lacks keep their init."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and not k.startswith("heads.")]
    if missing:
        raise UserError(f"{source}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more); "
                        "is it a model of another kind?")
    with torch.no_grad():
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
    """The newest weights in a folder (local path or URL) of any supported layout."""
    folder = storage.canonical_url(folder.rstrip("/"))
    if not storage.is_remote(folder) and Path(folder, "config.json").exists():
        hparams, encoding, tensors = hf.load_folder(Path(folder))
        return Saved(hparams, encoding, tensors, step=0)
    if storage.exists(storage.join(folder, save_folders.CHECKPOINTS, "latest")):
        return _load_ours(folder)
    for checkpoint_dir in (storage.join(folder, save_folders.CHECKPOINTS), folder):
        if storage.exists(storage.join(checkpoint_dir, "checkpoint")):
            return _load_tf(folder, checkpoint_dir)
    raise UserError(f"{folder}: no model here (looked for checkpoints/latest, checkpoints/checkpoint, checkpoint "
                    "and config.json); pass a save folder such as <save_dir>/policy or a model name "
                    f"({', '.join(('test', *PACKAGED, *GPT2_MODELS))})")


def _hparams_and_encoding(folder: str) -> tuple[HParams, str]:
    hparams = HParams.from_dict(_read_json(storage.join(folder, "hparams.json"), "model hparams"))
    encoding_path = storage.join(folder, "encoding")
    encoding = _read_json(encoding_path, "the encoding name") if storage.exists(encoding_path) else "main"
    if not isinstance(encoding, str):
        raise UserError(f"{encoding_path} must hold a JSON string such as \"main\"")
    return hparams, encoding


def _load_ours(folder: str) -> Saved:
    latest = storage.fetch(storage.join(folder, save_folders.CHECKPOINTS, "latest")).read_text().strip()
    return load_file(folder, latest)


def checkpoint_name(step: int) -> str:
    return f"model-{step:07d}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_file(folder: str | Path, name: str) -> Saved:
    """One checkpoint file of our layout, its checksum verified (files saved before checksums load unverified)."""
    hparams, encoding = _hparams_and_encoding(str(folder))
    path = storage.fetch(storage.join(str(folder), save_folders.CHECKPOINTS, name))
    try:
        tensors = safetensors_load_file(path)
        with safe_open(path, "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read the checkpoint ({e}); it may be truncated or corrupt") from None
    if expected is not None and _digest(tensors) != expected:
        raise UserError(f"{path}: the checkpoint's checksum does not match its contents; the file is corrupt "
                        "(restore it, or resume from an earlier checkpoint by pointing checkpoints/latest at one)")
    step = re.search(r"(\d+)", name)
    return Saved(hparams, encoding, tensors, step=int(step.group(1)) if step else 0)


_LAYER = re.compile(r"h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([gbw])$")


def tf_to_ours(name: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Our parameter name and layout for a TF variable name relative to the model scope."""
    if name in ("wte", "wpe"):
        return f"{name}.weight", value
    if name in ("ln_f/g", "ln_f/b"):
        return "ln_f." + ("weight" if name.endswith("g") else "bias"), value
    match = _LAYER.match(name)
    if match:
        layer, module, kind = match.groups()
        key = f"h.{layer}.{module.replace('/', '.')}.{'bias' if kind == 'b' else 'weight'}"
        return key, value[0].T if kind == "w" else value  # conv1x1 w [1, in, out] → Linear [out, in]
    match = re.match(r"heads/(\w+)/([wb])$", name)
    if match:
        head, kind = match.groups()
        return f"heads.{head}.{'weight' if kind == 'w' else 'bias'}", value.reshape(1, -1) if kind == "w" else value.reshape(1)
    return None


def _model_scope(names: list[str], preferred: str) -> str:
    scopes = sorted({n[:-len("/wte")] for n in names if n.endswith("/wte")})
    for scope in (f"{preferred}/model", "model"):
        if scope in scopes:
            return scope
    if len(scopes) == 1:
        return scopes[0]
    raise UserError(f"cannot tell which model to load from a checkpoint holding {', '.join(scopes) or 'no model'}")


def _load_tf(folder: str, checkpoint_dir: str) -> Saved:
    hparams, encoding = _hparams_and_encoding(folder)
    prefix = tf_checkpoint.latest_prefix(storage.fetch(storage.join(checkpoint_dir, "checkpoint")))
    index = storage.fetch(storage.join(checkpoint_dir, prefix + ".index"))
    num_shards, entries = tf_checkpoint.read_index(index)
    scope = _model_scope(list(entries), preferred=folder.rsplit("/", 1)[-1])
    top = scope[:-len("/model")] if scope.endswith("/model") else ""
    wanted = {n: e for n, e in entries.items()
              if (n.startswith(scope + "/") or n.startswith(f"{top}/reward_norm/"))
              and not re.search(r"/adam(_1)?$", n, re.IGNORECASE)}

    def fetch_shard(i: int, n: int) -> Path:
        return storage.fetch(storage.join(checkpoint_dir, f"{prefix}.data-{i:05d}-of-{n:05d}"))

    tensors = {}
    for name, value in tf_checkpoint.read_tensors(wanted, num_shards, fetch_shard).items():
        if name.startswith(f"{top}/reward_norm/"):
            tensors[f"reward_norm.{name.rsplit('/', 1)[-1]}"] = torch.from_numpy(value.astype(np.float32))
            continue
        mapped = tf_to_ours(name[len(scope) + 1:], value)
        if mapped is not None:
            tensors[mapped[0]] = torch.from_numpy(np.ascontiguousarray(mapped[1], dtype=np.float32))
    step = re.search(r"-(\d+)$", prefix)
    return Saved(hparams, encoding, tensors, step=int(step.group(1)) if step else 0)


def save_checkpoint(folder: str | Path, hparams: HParams, encoding: str, tensors: dict[str, torch.Tensor],
                    step: int, dtype: torch.dtype = torch.float32) -> None:
    """Write a checkpoint atomically, point `latest` at it, and keep the newest few."""
    folder = Path(folder)
    storage.atomic_write_text(folder / "hparams.json", hparams.to_json())
    storage.atomic_write_text(folder / "encoding", json.dumps(encoding))
    checkpoints = folder / save_folders.CHECKPOINTS
    name = checkpoint_name(step)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    storage.atomic_write_bytes(checkpoints / name, save(tensors, metadata={"sha256": _digest(tensors)}))
    storage.atomic_write_text(checkpoints / "latest", name)  # only once the file is whole on disk
    earlier = sorted(p for p in checkpoints.glob("model-*.safetensors") if p.name < name)
    for old in earlier[:-(KEEP_CHECKPOINTS - 1)]:
        old.unlink()
