"""Bring your own model: any Hugging Face causal-LM directory as a checkpoint in the data directory.

The source directory is read, never written. `import_model` checks it (`check_model`: a causal-LM
config, weights, a tokenizer with a chat template that takes `add_generation_prompt`, at least one
end-of-turn id, a pad token that is none of them) and publishes a checkpoint under
`<home>/checkpoints/imports/`: links to the source's files, the tokenizer saved anew when it had
to be given a pad token, and the manifest with the content hash of it all. Importing the same
content twice gives the same checkpoint.

A tokenizer without a pad token gets one the way the field does it (TRL, the Hugging Face
fine-tuning guides): an existing special token that is not an end of turn (`unk`, or a reserved
`…pad…` token such as Llama 3's `<|finetune_right_pad_id|>`), else a new `<|pad|>` special token,
the embeddings resized when the model has no spare row for it. Never EOS: pad must differ from
every end-of-turn id, or answers could not be told from their padding.
"""
import os
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lm.turns import check_pad, end_of_turn_ids
from schemas.checkpoint import MANIFEST, BadCheckpoint, content_hash, publish, read_manifest, staging
from schemas.errors import Invalid

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
NEW_PAD = "<|pad|>"


class NotAChatModel(Invalid):
    """A directory that cannot serve and train as a chat policy; the message says what is missing."""
    code = "invalid_model"

    def __init__(self, message: str):
        super().__init__(message, param="path")


def readable_dir(src: Path) -> bool:
    try:
        return src.is_dir() and os.access(src, os.R_OK | os.X_OK)
    except OSError:  # a name too long, say: is_dir raises for what it does not take as "missing"
        return False


def load_checked(src: Path):
    """(config, tokenizer) of the causal LM at `src`, or NotAChatModel naming what is missing."""
    if not readable_dir(src):
        raise NotAChatModel(f"{str(src)[:300]} is not a readable directory")
    try:
        config = AutoConfig.from_pretrained(src)
    except Exception as e:
        raise NotAChatModel(f"{src} has no loadable config.json: {e}") from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise NotAChatModel(f"{src} is a {config.model_type!r} model, not a causal language model "
                            "(AutoModelForCausalLM cannot load it)")
    if not any(f.name.endswith(WEIGHTS) for f in src.iterdir()):
        raise NotAChatModel(f"{src} has no weights (*.safetensors or *.bin)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise NotAChatModel(f"{src} has no loadable tokenizer: {e}") from e
    check_template(tokenizer, src)
    if not end_of_turn_ids(tokenizer):
        raise NotAChatModel(f"{src}: no end-of-turn token (no eos_token, no special token after an assistant "
                            "turn in the chat template, no eos_token_id in generation_config.json)")
    return config, tokenizer


def check_template(tokenizer, src: Path) -> None:
    """A chat template that renders a conversation and opens the assistant's turn on
    `add_generation_prompt` (the prompt every answer is generated and trained from)."""
    if not getattr(tokenizer, "chat_template", None):
        raise NotAChatModel(f"{src}: the tokenizer has no chat template (chat_template in tokenizer_config.json "
                            "or chat_template.jinja)")
    messages = [{"role": "user", "content": "hi"}]
    try:
        opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        closed = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as e:
        raise NotAChatModel(f"{src}: the chat template does not render a user turn: {e}") from e
    if opened == closed:
        raise NotAChatModel(f"{src}: the chat template ignores add_generation_prompt (it must open the "
                            "assistant's turn)")


def give_pad(tokenizer, config) -> str | None:
    """Give `tokenizer` a pad token when it has none (see the module docstring); returns what was
    done, or None. NotAChatModel when its pad is an end-of-turn token."""
    if tokenizer.pad_token_id is not None:
        try:
            check_pad(tokenizer)
        except ValueError as e:
            raise NotAChatModel(f"{tokenizer.name_or_path}: {e}") from e
        return None
    ends = set(end_of_turn_ids(tokenizer))
    reserved = [t for i, t in sorted(tokenizer.added_tokens_decoder.items())
                if "pad" in t.content.lower() and i not in ends]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in ends:
        tokenizer.pad_token = tokenizer.unk_token
        return f"pad = unk {tokenizer.unk_token!r}"
    if reserved:
        tokenizer.pad_token = reserved[0].content
        return f"pad = reserved {reserved[0].content!r}"
    tokenizer.add_special_tokens({"pad_token": NEW_PAD})
    grown = tokenizer.pad_token_id >= config.vocab_size
    return f"pad = new {NEW_PAD!r}" + (" (embeddings resized)" if grown else "")


def imports_dir(checkpoint_dir: Path) -> Path:
    """Where imported checkpoints live in the data directory."""
    return checkpoint_dir / "imports"


def import_model(src: str | Path, root: Path) -> tuple[Path, dict]:
    """(checkpoint path, manifest) of the Hugging Face causal LM at `src` imported under `root`;
    the same content imported before gives that checkpoint back."""
    src = Path(src).expanduser().resolve()
    config, tokenizer = load_checked(src)
    digest = content_hash(src)  # names the import; the manifest's hash covers what it holds
    final = root / f"{src.name}-{digest.removeprefix('sha256:')[:12]}"
    if final.exists():
        try:
            return final, read_manifest(final)
        except BadCheckpoint:
            raise NotAChatModel(f"{final} exists but does not match its manifest; remove it and import again")
    pad = give_pad(tokenizer, config)
    with staging(final) as tmp:
        if pad is not None:
            tokenizer.save_pretrained(tmp)  # the source's tokenizer files stay as they were
        if pad is not None and tokenizer.pad_token_id >= config.vocab_size:
            model = AutoModelForCausalLM.from_pretrained(src)
            model.resize_token_embeddings(len(tokenizer))
            model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(tmp)
        link_rest(src, tmp)
        return final, publish(tmp, final, kind="policy", config={
            "imported_from": str(src), "source_hash": digest, "pad": pad or "the tokenizer's own",
            "end_of_turn_ids": end_of_turn_ids(tokenizer)})


def link_rest(src: Path, tmp: Path) -> None:
    """Link every file of `src` that `tmp` does not hold yet (no copies of the weights); when the
    weights were saved anew, none of the source's weight files."""
    resaved = any(f.name.endswith(WEIGHTS) for f in tmp.iterdir())
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or f.name == MANIFEST or (tmp / rel).exists() or (resaved and f.name.endswith(WEIGHTS)):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, tmp / rel)
