"""Grammar-constrained decoding with llguidance: a grammar (llguidance's Lark dialect, which
embeds JSON schemas with `%json {...}`) becomes, at every step, a mask of the tokens that keep the
answer inside it; `lm.sampling.sample_rows` draws among those only. Once the grammar is complete
the mask allows end-of-turn alone, so the answer parses and ends there.

Why llguidance: its Lark dialect holds a tool call's tags and its JSON arguments in one grammar
(outlines-core takes regular expressions only); it computes each mask on the fly from the token
trie, with no per-grammar compile over the whole vocabulary; it is one dependency-free wheel
(xgrammar brings triton); and it is maintained as the structured-output engine behind vLLM,
SGLang and llama.cpp."""
import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

# Compact JSON with fixed separators: a small model is not left to pad with whitespace forever.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar (a schema, in the end) llguidance cannot compile."""


def json_grammar(schema: dict | None) -> str:
    """Any JSON object (schema None), or one matching `schema`."""
    return "start: " + json_rule(schema)


def json_rule(schema: dict | None) -> str:
    schema = closed(schema or {"type": "object"})
    schema["x-guidance"] = JSON_STYLE
    return "%json " + json.dumps(schema)


def closed(schema):
    """`schema` with every object that lists its properties and says nothing of others closed to
    others (`additionalProperties: false`, what OpenAI's strict mode requires anyway): the answer
    holds what was asked for, not whatever keys a model keeps inventing."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON's escapes are Lark's


class Constraints:
    """One model's grammars: compiled against its tokenizer once, one matcher per constrained row."""

    CACHED = 64  # grammars kept compiled: a client sends the same tools or schema again and again

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # checked on the event loop, matched on the engine's thread

    def check(self, grammar: str) -> None:
        """Raises GrammarError when `grammar` does not compile (a schema llguidance refuses)."""
        self._compiled_matcher(grammar)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start: a copy of the compiled one, so n choices and
        repeated requests compile it once."""
        return self._compiled_matcher(grammar).deep_copy()

    def _compiled_matcher(self, grammar: str) -> llguidance.LLMatcher:
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        m = self._compile(grammar)
        with self._lock:
            self._compiled[grammar] = m
            while len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return m

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        try:
            compiled = llguidance.grammar_from("lark", grammar)
        except Exception as e:  # its parser's own message says what is wrong
            raise GrammarError(str(e)) from None
        is_err, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, self.tokenizer)
        if is_err:
            raise GrammarError("; ".join(messages))
        m = llguidance.LLMatcher(self.tokenizer, compiled)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def allowed(self, matchers: list) -> torch.Tensor | None:
        """(B, V) bool: each row's allowed next tokens (all, for a row without a matcher); None
        when no row is constrained."""
        if not any(matchers):
            return None
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), self.tokenizer.vocab_size)
        bitmask.fill_(-1)  # every bit set: unconstrained rows allow everything
        for i, m in enumerate(matchers):
            if m is not None:
                llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        # bit j of word w is token 32w + j (little-endian words): unpacked in one numpy call
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")  # (B, 32 * words)
        return torch.from_numpy(bits[:, :self.vocab_size].astype(bool))

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of a UTF-8 character included)."""
        return self.tokenizer.decode_bytes([token])
