"""The kit's PPO engine: `config` (TRL's PPO fields and the batch arithmetic), `core` (the mathematics, pure
functions), `model` (policy and critic as one trained module), `trainer` (the loop), `checkpoint` (resumable
checkpoints and the trained models), `distributed` (what differs between accelerate's backends)."""
