import json
from pathlib import Path

import pytest
import torch

from lm_human_preferences.cli import main as cli
from lm_human_preferences.language import encodings, hf, trained_models
from lm_human_preferences.language.model import HParams, Model
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


SAMPLES = ["In the beginning God created the heaven and the earth.",
           "And God said, Let there be light: and there was light.\n\nAnd  it's 1611!",
           "  Spaces,\ttabs and UPPER case; words unknown: xyzzy — é ü 日本語\u00a0\x1c end.", ""]


def _exported(tmp_path, encoding: str) -> tuple[Path, Model]:
    """A model of `encoding` exported to a folder: the packaged kjv model through the command,
    the test model, and a tiny random GPT-2 with the real vocabulary (its files from the local server)."""
    out = tmp_path / "out"
    if encoding == "kjv_words":
        assert cli.main("export_hf", ["kjv", str(out)]) == 0
        return out, trained_models.load_initial("kjv")[0].eval()
    if encoding == "test":
        model = trained_models.load_initial("test")[0]
    else:
        torch.manual_seed(0)
        model = Model(HParams(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1))
    hf.export_folder(model, out, encoding)
    return out, model.eval()


@pytest.mark.parametrize("encoding", ["kjv_words", "test", "main"])
def test_export_writes_a_tokenizer_with_our_token_ids(tmp_path, encoding):
    """AutoTokenizer and pipeline("text-generation") load the exported folder, with no network;
    the tokenizer gives our encoding's ids and texts, and the pipeline continues a prompt as our
    model does (greedy, up to the config's end-of-text token)."""
    out, model = _exported(tmp_path, encoding)
    ours = encodings.get(encoding)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert tokenizer.decode(ids) == ours.decode(ids)
    pipe = transformers.pipeline("text-generation", str(out))
    prompt = "god"  # with 3 new tokens, within the test model's 8 positions
    tokens = ours.encode(prompt)
    assert pipe.tokenizer(prompt)["input_ids"] == tokens
    new = []
    with torch.no_grad():
        while len(new) < 3 and (not new or new[-1] != model.hparams.n_vocab - 1):
            new.append(int(model(torch.tensor([tokens + new])).logits[0, -1].argmax()))
    generated = pipe(prompt, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert generated == prompt + pipe.tokenizer.decode(new, skip_special_tokens=True)


def test_an_encoding_without_a_tokenizer_is_refused():
    with pytest.raises(UserError, match="no Hugging Face tokenizer is known for the encoding 'other'"):
        hf.tokenizer_files("other", 8)
