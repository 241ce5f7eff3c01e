"""`lmhp-export-hf MODEL OUT`: a policy or reward-model trunk as a Hugging Face GPT-2 folder."""

from pathlib import Path

from lm_human_preferences.language import hf, trained_models
from lm_human_preferences.utils.errors import UserError

EXPORT_HELP = """\
usage: lmhp-export-hf MODEL OUT

Write the GPT-2 trunk of MODEL (a save folder such as <save_dir>/policy or <save_dir>/reward_model,
in our layout or the original's, a path or URL, or a model name) and its tokenizer to the folder
OUT, which transformers' GPT2LMHeadModel.from_pretrained(OUT), AutoTokenizer.from_pretrained(OUT)
and pipeline("text-generation", OUT) load. Scalar heads are not exported.
"""


def export_hf(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(EXPORT_HELP)
        return
    if len(args) != 2:
        raise UserError("usage: lmhp-export-hf MODEL OUT (see --help)")
    model, encoding = trained_models.load_initial(args[0])
    hf.export_folder(model, Path(args[1]), encoding)
    print(f"wrote {args[1]}: config.json, model.safetensors and the tokenizer of the {encoding!r} encoding")
