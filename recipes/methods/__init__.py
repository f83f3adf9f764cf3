"""PPO's rivals, each through TRL's maintained trainer and the kit's recipes, reward sources and output folders:
`sft` (SFTTrainer; also RAFT's fine-tuning stage), `dpo` (DPOTrainer), `rloo` (RLOOTrainer), `grpo` (GRPOTrainer),
`raft` (best-of-n fine-tuning with the kit's sampler and the SFT stage); what they share is in `trl_wiring`.
See docs/methods.md."""
