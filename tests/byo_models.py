"""Tiny random-init chat models of the families teams bring (Llama, Qwen3, Mistral, Gemma 3,
Phi-3, GPT-NeoX, OPT), saved as plain Hugging Face directories the way a hub download looks:
a ChatML-style tokenizer trained here whose end of turn (`<|im_end|>`) is not its EOS
(`<|endoftext|>`), no pad token, `generation_config.json` listing both as eos_token_id. Seeded,
2 layers, hidden 32: built in well under a second each."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, GPTNeoXConfig,
                          Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen3Config)

EOT, EOS = "<|im_end|>", "<|endoftext|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["hello there, how are you today?", "tell me a short story about a cat", "the cat sat on the mat",
        "what is the capital of france?", "paris is the capital of france", "good morning to you",
        "answer briefly please", "once upon a time there was a dog"] * 4
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
WINDOW = 8  # shorter than every sequence the tests run


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes), ChatML template, EOS != end of turn, no pad."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS, "<|im_start|>", EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", EOT]})
    tok.chat_template = CHATML
    return tok


def configs(vocab: int, eos: int) -> dict:
    ids = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    return {
        "llama": LlamaConfig(**SMALL, num_key_value_heads=2, **ids),
        "qwen3": Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8, **ids),
        "mistral": MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=WINDOW, **ids),
        "gemma3": Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"], **ids),
        "phi3": Phi3Config(**SMALL, num_key_value_heads=2, **ids),
        "gpt_neox": GPTNeoXConfig(**SMALL, **ids),
        "opt": OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=256, dropout=0.1, **ids),
    }


ARCHITECTURES = tuple(configs(1, 0))


def build(arch: str, out: Path, *, seed: int = 0, chat_template: str | None = CHATML,
          pad: str | None = None) -> Path:
    """A random-init `arch` chat model saved at `out` as a plain Hugging Face directory (without
    a chat template, or with `pad` as its pad token, for the imports that must be refused)."""
    tok = chatml_tokenizer()
    tok.chat_template = chat_template
    if pad:
        tok.pad_token = pad
    config = configs(len(tok), tok.eos_token_id)[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(EOT), tok.eos_token_id],
                                               bos_token_id=None, pad_token_id=None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_seq2seq(out: Path) -> Path:
    """A T5 (encoder-decoder, not a causal LM) with the same tokenizer: a directory to refuse."""
    from transformers import T5Config, T5ForConditionalGeneration
    tok = chatml_tokenizer()
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                        num_heads=4, decoder_start_token_id=0)).save_pretrained(out)
    tok.save_pretrained(out)
    return out
