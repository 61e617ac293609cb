"""What both the service and the trainer need to run a language model: pick a device, load and
publish a checkpoint (any Hugging Face causal LM with a chat template), encode a conversation up
to the assistant's turn, and one batched, left-padded, KV-cached decoding core (rows can join and
leave between steps) with its samplers, used by the serving engine and by PPO's rollouts alike.
It imports only `schemas`, torch and transformers, never `service`, `trainer` or `store`."""
