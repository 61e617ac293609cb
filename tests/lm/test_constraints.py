"""Constrained sampling and tool-call formats at the level of the decoding core: a mask is obeyed
row by row, logprobs are those of the distribution drawn from, a grammar yields parseable calls,
and each family's tool-call output is parsed."""
import json

import pytest
import torch

from lm.grammar import Constraints, GrammarError, json_grammar
from lm.sampling import sample_rows
from lm.tools import FORMATS, tool_format

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "maximum": 9,
                                                                                  "minimum": 1}},
    "required": ["city", "days"]}}}


def test_mask_is_obeyed_per_row_and_logprobs_are_the_drawn_distribution():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    allowed = torch.ones(3, 40, dtype=torch.bool)
    allowed[1] = False
    allowed[1, [3, 7, 11]] = True  # row 1 is constrained to three tokens
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    tokens, logp = sample_rows(logits, [0.0, 1.0, 0.8], [1.0, 1.0, 0.5], gens, allowed=allowed, logprobs=True)
    assert tokens[0] == int(logits[0].argmax()) and tokens[1] in (3, 7, 11)
    assert torch.allclose(logp[0], torch.log_softmax(logits[0], -1))  # greedy: the softmax of the logits
    masked = logits[1].masked_fill(~allowed[1], float("-inf"))
    assert torch.allclose(logp[1], torch.log_softmax(masked, -1))  # T = 1, the mask renormalised
    # row 2: top_p 0.5 at T 0.8: the nucleus renormalised, nothing outside it
    p = torch.softmax(logits[2] / 0.8, -1)
    order = p.argsort(descending=True)
    keep = order[:int(((p[order].cumsum(0) - p[order]) <= 0.5).sum())]
    assert torch.isinf(logp[2]).sum() == 40 - len(keep) and tokens[2] in keep.tolist()
    assert torch.allclose(logp[2][keep], (p[keep] / p[keep].sum()).log())
    assert tokens == sample_rows(logits, [0.0, 1.0, 0.8], [1.0, 1.0, 0.5],
                                 [torch.Generator().manual_seed(s) for s in (1, 2, 3)], allowed=allowed)[0]


@pytest.fixture(scope="module")
def tokenizer(policy_path):
    from lm.checkpoint import load_tokenizer
    return load_tokenizer(policy_path)


def walk(constraints, grammar, seed):
    """Random logits through the grammar's mask until it allows end-of-turn only: the text."""
    m, out, g = constraints.matcher(grammar), [], torch.Generator().manual_seed(seed)
    eos = constraints.tokenizer.eos_token
    for _ in range(200):
        tokens, _ = sample_rows(torch.randn(1, constraints.vocab_size, generator=g), [1.0], [1.0], [g],
                                allowed=constraints.allowed([m]))
        if tokens[0] == eos:
            return out
        assert m.consume_token(tokens[0])
        out.append(tokens[0])
    raise AssertionError("the grammar never ended")


def test_bootstrap_template_renders_hermes_tool_calls_that_grammars_guarantee(tokenizer):
    fmt = tool_format(tokenizer)
    assert fmt is FORMATS["hermes"]
    constraints = Constraints(tokenizer, len(tokenizer))
    for seed in range(3):
        text = tokenizer.decode(walk(constraints, fmt.grammar([WEATHER]), seed))
        content, calls = fmt.parse(text, {"get_weather"})
        assert content is None and calls[0]["function"]["name"] == "get_weather", text
        args = json.loads(calls[0]["function"]["arguments"])
        assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 9
        answer = json.loads(tokenizer.decode(walk(constraints, json_grammar({"type": "object", "properties": {
            "ok": {"type": "boolean"}}, "required": ["ok"]}), seed)))
        assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)


def test_a_template_without_tools_is_not_a_tool_format(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tool_format(tokenizer) is None


@pytest.mark.parametrize("name,text,content,calls", [
    ("hermes", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Rome"})]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     None, [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', None, []),
    ("hermes", "No tools needed.", None, []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
])
def test_tool_call_formats_parse(name, text, content, calls):
    got_content, got = FORMATS[name].parse(text, {"get_weather"})
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert got_content == (content if calls else text)


def test_a_grammar_compiles_once_and_each_matcher_starts_fresh(tokenizer):
    """Matchers for one grammar are copies of one compiled matcher: a row that advanced (or a
    cached copy) never leaks its state into the next row, and a bad grammar stays refused."""
    constraints = Constraints(tokenizer, len(tokenizer))
    grammar = json_grammar({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    first = constraints.matcher(grammar)
    start = constraints.allowed([first]).clone()
    for token in tokenizer.encode('{"ok": '):
        assert first.consume_token(token)
    assert not torch.equal(constraints.allowed([first]), start)
    assert torch.equal(constraints.allowed([constraints.matcher(grammar)]), start)
    for _ in range(2):
        with pytest.raises(GrammarError):
            constraints.check("start: %json {")
