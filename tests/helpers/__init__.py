"""Shared test helpers: a tiny LightningModule and its data (lit), a plain training step (loop), digits (digits)."""
