"""Links to a card: PC/SC readers, the in-process virtual SIM, (later) cellular modems."""
