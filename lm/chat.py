"""Conversations as the model sees them: the chat template up to the assistant's turn, and how
many positions prompt plus answer may take."""


def as_messages(prompt) -> list[dict]:
    """Prompts come as plain text (one user turn) or as a conversation."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_prompt(tokenizer, prompt, tools: list[dict] | None = None) -> list[int]:
    """The chat-formatted prompt up to the assistant's turn: what the policy is trained on, sampled
    from in PPO, scored after by the reward model, and served with (with the request's tools, when
    it gives them, for the template to render)."""
    return tokenizer.apply_chat_template(as_messages(prompt), tools=tools or None, add_generation_prompt=True,
                                         tokenize=True)["input_ids"]


def context_length(config) -> int | None:
    """Positions the model has (prompt plus answer), or None when its config does not say.
    `max_position_embeddings` is the common name (GPT-2 maps it onto `n_positions`)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
