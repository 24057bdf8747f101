"""What a run leaves on disk: its folder (naming, one run per folder, the advice to continue it), atomic and
durable file writes, checkpoints, and exported peft adapters with their cards (what an adapter needs to be
used alone)."""
