"""Grammar libraries for constrained decoding, on CPU: llguidance (what lm/grammar.py uses) against
outlines-core (the reference), on one JSON schema and one tokenizer, in the same run.

Prints, for each: the time to compile the schema for the vocabulary, and the time per token to
compute the allowed-token mask and advance along a valid answer; then llguidance's ratios to
outlines-core (below 1: llguidance is cheaper). The tokenizer is the bootstrap's kind (byte-level
BPE trained on the bundled demonstrations) at a GPT-2-sized vocabulary, built here, nothing
downloaded. xgrammar is left out: its wheel pulls triton and its own FFI runtime into the venv.

    python bench/grammar.py [--vocab 32000] [--repeat 20]
"""
import argparse
import json
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
          "properties": {"name": {"const": "get_weather"},
                         "arguments": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                                       "properties": {"city": {"type": "string", "maxLength": 24},
                                                      "days": {"type": "integer"}}}}}
ANSWER = '{"name":"get_weather","arguments":{"city":"Paris in spring","days":3}}'


def tokenizer(vocab: int):
    from schemas.bundled import bundled_demonstrations
    from trainer.tokenizer import build_tokenizer
    demos = bundled_demonstrations()
    texts = [d["prompt"] for d in demos] + [d["completion"] for d in demos] + [json.dumps(SCHEMA), ANSWER]
    return build_tokenizer(texts * 3, vocab)


def bench_llguidance(tok, ids, repeat):
    from lm.grammar import Constraints
    t0 = time.perf_counter()
    c = Constraints(tok, len(tok))
    # compact separators, as the answer is written (lm/grammar.py's own style puts spaces after them)
    grammar = "start: %json " + json.dumps(dict(SCHEMA, **{"x-guidance": {"whitespace_flexible": False,
                                                                          "item_separator": ",", "key_separator": ":"}}))
    c.matcher(grammar)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeat):
        m = c.matcher(grammar)
        for t in ids:
            allowed = c.allowed([m])
            assert allowed[0, t], "llguidance refused a token of the valid answer"
            m.consume_token(t)
    return compile_s, (time.perf_counter() - t0) / (repeat * len(ids))


def bench_outlines(tok, ids, repeat):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    tokens: dict[bytes, list[int]] = {}
    for piece, i in tok.get_vocab().items():
        if i == tok.eos_token_id or piece in tok.all_special_tokens:
            continue
        tokens.setdefault(bytes(byte_decoder[ch] for ch in piece), []).append(i)
    vocabulary = Vocabulary(tok.eos_token_id, tokens)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[\n ]?"), vocabulary)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeat):
        guide = Guide(index)
        for t in ids:
            allowed = torch.zeros(len(tok), dtype=torch.bool)
            allowed[guide.get_tokens()] = True  # the same (V,) mask lm.sampling takes
            assert allowed[t], "outlines-core refused a token of the valid answer"
            guide.advance(t)
    return compile_s, (time.perf_counter() - t0) / (repeat * len(ids))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character map, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = tokenizer(args.vocab)
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    rows = {"llguidance": bench_llguidance(tok, ids, args.repeat),
            "outlines-core": bench_outlines(tok, ids, args.repeat)}
    print(f"vocabulary {len(tok)}, answer of {len(ids)} tokens, {args.repeat} answers each")
    print(f"{'library':<14} {'compile ms':>11} {'mask+advance us/token':>22}")
    for name, (compile_s, per_token) in rows.items():
        print(f"{name:<14} {compile_s * 1e3:>11.1f} {per_token * 1e6:>22.1f}")
    (lc, lt), (oc, ot) = rows["llguidance"], rows["outlines-core"]
    print(f"llguidance / outlines-core: compile {lc / oc:.3f}, per token {lt / ot:.3f}")


if __name__ == "__main__":
    main()
