"""The training loop shared by every job, and device placement, mixed precision and draws."""
