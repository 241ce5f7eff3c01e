import json

import pytest
import torch

from lm_human_preferences.cli import main as cli
from lm_human_preferences.language import trained_models
from lm_human_preferences.utils.errors import UserError

transformers = pytest.importorskip("transformers")


def tiny_hf_model(tmp_path, vocab=27):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than HF's init, so differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    (tmp_path / "hf" / "encoding").write_text(json.dumps("test"))
    return model


def test_import_hf_folder_as_initial_model(tmp_path):
    hf_model = tiny_hf_model(tmp_path)
    ours, encoding = trained_models.load_initial(str(tmp_path / "hf"), heads=("value",))
    assert encoding == "test"
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]])
    with torch.no_grad():
        delta = (ours(tokens).logits - hf_model(tokens).logits).abs().max().item()
    print(f"HF import: max |Δlogit| = {delta:.2e}")
    assert delta < 1e-5
    assert torch.count_nonzero(ours.heads["value"].weight) == 0


def test_export_policy_loads_in_transformers(tmp_path):
    model, _ = trained_models.load_initial("test", heads=("value",))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    trained_models.save_checkpoint(tmp_path / "policy", model.hparams, "test", model.state_dict(), step=1)
    assert cli.main("export_hf", [str(tmp_path / "policy"), str(tmp_path / "out")]) == 0
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        delta = (loaded(tokens).logits - model(tokens).logits).abs().max().item()
    print(f"HF export: max |Δlogit| = {delta:.2e}")
    assert delta < 1e-5


def test_export_reward_model_trunk(tmp_path):
    model, _ = trained_models.load_initial("test", heads=("reward",))
    tensors = {**model.state_dict(), "reward_norm.gain": torch.tensor(2.0), "reward_norm.bias": torch.tensor(0.5)}
    trained_models.save_checkpoint(tmp_path / "reward_model", model.hparams, "test", tensors, step=3)
    assert cli.main("export_hf", [str(tmp_path / "reward_model"), str(tmp_path / "out")]) == 0
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = torch.tensor([[4, 4, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_hf_models(tmp_path):
    tiny_hf_model(tmp_path, vocab=30)
    (tmp_path / "hf" / "encoding").unlink()
    with pytest.raises(UserError, match="a vocabulary of 30 tokens is not GPT-2's"):
        trained_models.load_initial(str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(UserError, match="only gpt2 is supported"):
        trained_models.load_initial(str(tmp_path / "hf"))
