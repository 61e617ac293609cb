"""The offline side: feedback -> datasets, SFT, reward model, PPO, gates, rounds, the scheduler."""
