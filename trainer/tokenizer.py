"""A byte-level BPE tokenizer with a chat template, trained on our own text.

Byte-level means any input encodes (no unknown token). Pad and end-of-turn are distinct special
tokens: pad never appears inside a sequence, so "last real token" and "stopped at EOS" are both
unambiguous for the reward model and PPO.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, EOS] + [f"<|{r}|>" for r in ROLES]

# One turn = <|role|>content<|end|>; generation starts after <|assistant|> and ends at <|end|>.
# Tools, when a request gives them, are listed in a system turn first; a call is Hermes' format,
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> (lm/tools.py parses it), and a tool's
# result comes back in a user turn as <tool_response>...</tool_response>, as Qwen's template does.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|user|><tool_response>{{ m['content'] }}</tool_response><|end|>"
    "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}<|assistant|>{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] %}<tool_call>{\"name\": {{ c['function']['name'] | tojson }}, "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}</tool_call>{% endfor %}<|end|>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS)
    tok.chat_template = CHAT_TEMPLATE
    return tok
